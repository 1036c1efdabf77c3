"""A throwaway PostgreSQL cluster for tests: initdb in a temp dir, loopback only, trust auth.

    cluster = PostgresCluster.start()        # raises PostgresUnavailable if it cannot run here
    try:
        cluster.createdb("mlflow")
        uri = cluster.sqlalchemy_uri("mlflow")  # postgresql+psycopg2://postgres@127.0.0.1:PORT/mlflow
    finally:
        cluster.stop()                         # pg_ctl stop, then the temp dir is removed

initdb refuses to run as root: as root the cluster belongs to the `postgres` OS user (Debian's
package creates it) and its server processes run as that user; otherwise as the current user.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mlflow_server import free_port

SUPERUSER = "postgres"  # the cluster's superuser (initdb -U); trust auth, no password
INSTALL_HINT = "`bash .ci/install-postgres.sh` installs them (Debian's postgresql package)"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries, or no unprivileged user to run them as."""


class PostgresCommandError(RuntimeError):
    """A PostgreSQL program (initdb, pg_ctl, createdb) failed; the message holds its output."""


def bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb (Debian), else initdb on PATH."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.parent.name))

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=version)
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).resolve().parent if on_path else None


def _os_user() -> pwd.struct_passwd | None:
    """Whom the cluster runs as: None for the current user, the postgres user when root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable(
            "running as root, and initdb refuses root, but there is no `postgres` OS user to run "
            f"it as: {INSTALL_HINT}"
        ) from None


@dataclass
class PostgresCluster:
    """A running cluster in `base` (data/, the socket, postgres.log), listening on 127.0.0.1."""

    bin: Path
    base: Path
    port: int
    user: pwd.struct_passwd | None

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log_path(self) -> Path:
        return self.base / "postgres.log"

    @classmethod
    def start(cls, timeout_s: float = 60.0) -> PostgresCluster:
        """initdb and start a cluster on a free port; stop and remove it if any step fails."""
        found = bindir()
        if found is None:
            raise PostgresUnavailable(
                f"no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb): {INSTALL_HINT}"
            )
        user = _os_user()
        # Not under pytest's tmp dirs: those are private to the current user (mode 0700), and
        # the postgres user must reach its data dir. A short path also keeps the socket path
        # under its 107-byte limit.
        base = Path(tempfile.mkdtemp(prefix="insect-pg-"))
        if user is not None:
            os.chown(base, user.pw_uid, user.pw_gid)
        cluster = cls(found, base, free_port(), user)
        try:
            cluster._run(
                "initdb", "-D", str(cluster.data), "-U", SUPERUSER, "--auth=trust",
                "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions",
            )  # fmt: skip
            options = " ".join(
                [
                    f"-p {cluster.port}",
                    f"-k {base}",  # the Unix socket, in our dir rather than /var/run/postgresql
                    "-c listen_addresses=127.0.0.1",
                    # A throwaway cluster: durability buys nothing here, speed does.
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                ]
            )
            cluster._run(
                "pg_ctl", "-D", str(cluster.data), "-l", str(cluster.log_path), "-o", options,
                "-w", "-t", str(int(timeout_s)), "start",
            )  # fmt: skip
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def createdb(self, name: str) -> None:
        """Create a database (over TCP as the superuser, like any client would)."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name)

    def sqlalchemy_uri(self, database: str) -> str:
        """The URI MLflow takes for --backend-store-uri, with the psycopg2 driver named.

        A bare postgresql:// means psycopg (3) to SQLAlchemy 2.1 and psycopg2 to earlier ones;
        naming the driver works with every SQLAlchemy MLflow supports.
        """
        return f"postgresql+psycopg2://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str) -> str:
        """A libpq connection string, for psycopg2.connect."""
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={database}"

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the server (immediate shutdown: nothing here needs to be kept) and remove base."""
        try:
            pid_file = self.data / "postmaster.pid"
            if pid_file.is_file():
                postmaster = int(pid_file.read_text().split()[0])
                try:
                    self._run(
                        "pg_ctl", "-D", str(self.data), "-m", "immediate", "-w",
                        "-t", str(int(timeout_s)), "stop",
                    )  # fmt: skip
                except (PostgresCommandError, subprocess.SubprocessError, OSError):
                    # pg_ctl could not stop it: the postmaster is ours, started above.
                    _kill_and_wait(postmaster, timeout_s)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _run(self, program: str, *args: str) -> None:
        """Run a PostgreSQL program as the cluster's OS user; raise with its output if it fails."""
        kwargs = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", "PGTZ": "UTC"}
        if self.user is not None:
            env["HOME"] = self.user.pw_dir
        result = subprocess.run(
            [str(self.bin / program), *args],
            cwd=self.base,  # readable by the postgres user (the caller's cwd may not be)
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            **kwargs,
        )
        if result.returncode != 0:
            raise PostgresCommandError(
                f"{program} exited with {result.returncode}:\n{result.stdout[-2000:]}"
                f"{result.stderr[-3000:]}\n--- {self.log_path} ---\n{self.log_tail()}"
            )


def _kill_and_wait(pid: int, timeout_s: float) -> None:
    """SIGKILL one process we started and wait for it to go (it may not be our child)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def start_or_skip(needs: Mapping[str, str], check: str, *databases: str) -> PostgresCluster:
    """A started cluster holding `databases`, for the test `check` names; skipped where a module
    of `needs` (module -> how to install it) or PostgreSQL is missing, but a failure on CI."""
    try:
        for module, hint in needs.items():
            if importlib.util.find_spec(module) is None:
                raise PostgresUnavailable(f"no {hint}")
        cluster = PostgresCluster.start()
    except PostgresUnavailable as err:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the {check}, but: {err}")
        pytest.skip(str(err))
    try:
        for name in databases:
            cluster.createdb(name)
    except BaseException:
        cluster.stop()
        raise
    return cluster
