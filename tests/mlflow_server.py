"""A real `mlflow server` for tests: bound to 127.0.0.1 on a free port, stopped by its own pid."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# Loopback only: never route test traffic through a proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_answers(
    process: subprocess.Popen, url: str, log_tail: Callable[[], str], timeout_s: float
) -> None:
    """Poll `url` until it answers 200; fail early, with the log's tail, if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_tail()}")
        try:
            with OPENER.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s:\n{log_tail()}")


def group_members(pgid: int) -> list[int]:
    """Live processes in a process group (Linux /proc; zombies count as gone)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp ...
        state, _ppid, pgrp = stat.rpartition(")")[2].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


class MlflowServer:
    """`mlflow server` in its own process group, with its log in a file.

    Args:
        backend_store_uri: the store the server reads and writes, e.g. sqlite:///.../mlflow.db.
        artifacts_destination: where artifacts uploaded through the server (mlflow-artifacts:/)
            go. Experiments whose artifact location is a file URI are served from there instead.
        log_path: the server's stdout and stderr.
        app_name: an MLflow server app, e.g. basic-auth (users, passwords and permissions).
        env: environment variables for the server (the auth app's settings).
    """

    def __init__(
        self,
        backend_store_uri: str,
        artifacts_destination: Path,
        log_path: Path,
        app_name: str | None = None,
        env: Mapping[str, str] | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {
            **os.environ,
            # No calls home from the server, and no background job runner we do not need.
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **(env or {}),
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", backend_store_uri,
            "--artifacts-destination", str(artifacts_destination),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
            *(["--app-name", app_name] if app_name else []),
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            # Own session and process group: the uvicorn worker can be found (and killed) by pgid.
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self.pid = self.process.pid

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Poll /health until the server answers; fail early if it exits."""
        wait_until_answers(self.process, f"{self.url}/health", self.log_tail, timeout_s)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM our pid, SIGKILL after `grace_s`; then make sure no worker of its group lives."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(grace_s)
        # The group id is our pid (start_new_session); anything left in it is an orphaned worker.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not group_members(self.pid):
                return
            os.killpg(self.pid, sig)
            deadline = time.monotonic() + grace_s
            while group_members(self.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        survivors = group_members(self.pid)
        if survivors:
            raise RuntimeError(f"mlflow server processes survived SIGKILL: {survivors}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def get(self, route: str, /, **params: Any) -> bytes:
        """GET a server route (query from keyword arguments) and return the body."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with OPENER.open(f"{self.url}{route}{query}", timeout=30) as response:
            return response.read()

    def api(self, endpoint: str, body: dict[str, Any] | None = None, /, **params: Any) -> Any:
        """Call the REST API (/api/2.0/mlflow/<endpoint>): POST `body` if given, else GET."""
        if body is None:
            return json.loads(self.get(f"/api/2.0/mlflow/{endpoint}", **params))
        request = urllib.request.Request(
            f"{self.url}/api/2.0/mlflow/{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with OPENER.open(request, timeout=30) as response:
            return json.loads(response.read())
