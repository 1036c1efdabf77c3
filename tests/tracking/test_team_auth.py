"""A team server that lets in only its team: `mlflow server --app-name basic-auth` on PostgreSQL.

Runs, sweeps and uploads log as the user in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
A missing or wrong login, or a user without EDIT on the experiment, stops the command at start-up
with one line naming the server and the user (never the password), exit 2: no traceback, no
offline spool, no image decoded.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from insect_exp.tracking.spool import Spool
from tests.conftest import make_image_folder
from tests.mlflow_server import MlflowServer
from tests.postgres import PostgresCluster, start_or_skip
from tests.sweeps import TINY

pytestmark = pytest.mark.slow

ADMIN = "admin"
# Passwords MLflow's policy accepts (12 characters at least); random, so that a test finding
# one in a command's output cannot be a coincidence.
PASSWORDS = {name: f"pw-{name}-{secrets.token_hex(8)}" for name in (ADMIN, "alice", "bob", "carol")}
TEAM_EXPERIMENT = "alices-experiment"  # alice's; the others may read it (default_permission = READ)
HANG_S = 120  # a generous bound against a hang; a refusal takes seconds


@dataclass
class TeamServer:
    server: MlflowServer
    root: Path
    folder: Path
    experiment_id: str  # TEAM_EXPERIMENT's

    @property
    def url(self) -> str:
        return self.server.url


@contextlib.contextmanager
def login(user: str) -> Iterator[None]:
    """A client of the server's REST API that logs in as `user` (MLflow reads the environment)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", user)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORDS[user])
        yield


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    """A throwaway cluster with a database for the runs and one for users and permissions."""
    needs = {
        "psycopg2": 'psycopg2: `pip install -e ".[postgres]"` installs it',
        "flask_wtf": 'Flask-WTF: `pip install -e ".[auth]"` installs it',
    }
    cluster = start_or_skip(needs, "team-server check", "mlflow", "mlflow_auth")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def team(
    postgres: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TeamServer]:
    """The auth server, users alice, bob and carol, and alice's experiment."""
    root = tmp_path_factory.mktemp("team_auth")
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {postgres.sqlalchemy_uri('mlflow_auth')}\n"
        f"admin_username = {ADMIN}\n"
    )
    server = MlflowServer(
        postgres.sqlalchemy_uri("mlflow"),
        root / "artifacts",
        root / "server.log",
        app_name="basic-auth",
        env={
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            # The first admin's password: from the environment, so it is in no file.
            "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORDS[ADMIN],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        },
    )
    try:
        server.wait_ready()
        from mlflow.server.auth.client import AuthServiceClient

        with login(ADMIN):
            users = AuthServiceClient(server.url)
            for name in ("alice", "bob", "carol"):
                users.create_user(name, PASSWORDS[name])
        with login("alice"):
            experiment_id = MlflowClient(server.url).create_experiment(TEAM_EXPERIMENT)
        folder = make_image_folder(root / "insects")
        yield TeamServer(server, root, folder, experiment_id)
    finally:
        server.stop()


def _environment(root: Path, user: str | None, password: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    }
    env |= {
        "INSECT_EXP_CACHE_DIR": str(root / "data"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # Loopback traffic never goes through a proxy from the environment.
        "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"])),
    }
    if user is not None:
        env["MLFLOW_TRACKING_USERNAME"] = user
    if password is not None:
        env["MLFLOW_TRACKING_PASSWORD"] = password
    return env


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    seconds: float

    @property
    def last_line(self) -> str:
        lines = self.err.strip().splitlines()
        return lines[-1] if lines else ""


def _command(
    args: list[str], cwd: Path, user: str | None, password: str | None, root: Path
) -> Outcome:
    """`python -m ...ARGS` in cwd as `user` (None: no login given), to its end."""
    cwd.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=_environment(root, user, password),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return Outcome(done.returncode, done.stdout, done.stderr, time.monotonic() - began)


def _train(team: TeamServer, cwd: Path, user: str | None, password: str | None, *extra: str):
    """A tiny training run (or sweep, with -m in extra) on the team server."""
    flags = [a for a in extra if a.startswith("-")]  # Hydra's flags go before the overrides
    overrides = [a for a in extra if not a.startswith("-")]
    args = [
        "insect_exp", *flags, *TINY, f"dataset.root={team.folder}",
        f"mlflow.tracking_uri={team.url}", *overrides,
    ]  # fmt: skip
    return _command(args, cwd, user, password, team.root)


def _assert_refused_at_start(outcome: Outcome, cwd: Path, *named: str) -> None:
    """Exit 2 in one line that names `named`, within seconds; no traceback, spool or decoding."""
    assert outcome.code == 2, outcome.err[-3000:]
    assert outcome.last_line.startswith("insect_exp: error: "), outcome.err[-3000:]
    for text in named:
        assert text in outcome.last_line, outcome.last_line
    assert "Traceback" not in outcome.err, outcome.err[-3000:]
    assert outcome.seconds < HANG_S
    assert not list(cwd.rglob("mlflow-spool")), "a refusal is not a lost server: nothing to upload"
    assert "decoded" not in outcome.out + outcome.err  # the data loader's line: no image was used


def _runs(team: TeamServer) -> list:
    with login(ADMIN):
        return MlflowClient(team.url).search_runs([team.experiment_id], max_results=100)


def test_a_run_without_a_login_is_refused_in_one_line_naming_the_server(team, tmp_path):
    # Given a team server and no MLFLOW_TRACKING_USERNAME / _PASSWORD in the environment
    # When a run starts on it
    outcome = _train(team, tmp_path, None, None)

    # Then it stops at start-up with one line naming the server and the settings to set
    _assert_refused_at_start(outcome, tmp_path, team.url, "401", "MLFLOW_TRACKING_USERNAME")
    assert "no user" in outcome.last_line and "cannot reach" not in outcome.last_line


def test_a_wrong_password_is_refused_naming_the_user_and_never_the_password(team, tmp_path):
    # Given alice's name with a password that is not hers
    wrong = f"not-{PASSWORDS['alice']}"

    # When she starts a run with it
    outcome = _train(team, tmp_path, "alice", wrong)

    # Then one line names the server and alice, and the password appears nowhere
    _assert_refused_at_start(outcome, tmp_path, team.url, "'alice'", "401")
    assert wrong not in outcome.out + outcome.err
    assert "cannot reach" not in outcome.last_line


def test_a_reader_cannot_write_to_a_teammates_experiment_until_granted_edit(team, tmp_path):
    # Given bob, who may only read alice's experiment (the server's default permission)
    bob = ("bob", PASSWORDS["bob"])
    experiment = f"mlflow.experiment_name={TEAM_EXPERIMENT}"
    before = {r.info.run_id for r in _runs(team)}

    # When he starts a run in it, and then a sweep
    single = _train(team, tmp_path / "run", *bob, experiment)
    sweep = _train(team, tmp_path / "sweep", *bob, "-m", experiment, "seed=1,2")

    # Then each stops at start-up with one line naming bob and the experiment; nothing is written
    for outcome, cwd in ((single, tmp_path / "run"), (sweep, tmp_path / "sweep")):
        _assert_refused_at_start(outcome, cwd, team.url, "'bob'", repr(TEAM_EXPERIMENT), "403")
        assert PASSWORDS["bob"] not in outcome.out + outcome.err
    assert {r.info.run_id for r in _runs(team)} == before

    # When alice's admin grants him EDIT on it, and he starts the sweep again
    from mlflow.server.auth.client import AuthServiceClient

    with login(ADMIN):
        users = AuthServiceClient(team.url)
        users.grant_user_permission("bob", "experiment", team.experiment_id, "EDIT")
    granted = _train(team, tmp_path / "granted", *bob, "-m", experiment, "seed=1,2")

    # Then the sweep logs as bob: a parent and its two jobs, FINISHED
    assert granted.code == 0, granted.err[-3000:]
    runs = [r for r in _runs(team) if r.info.run_id not in before]
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3, [r.info for r in runs]


def test_an_upload_logs_as_the_user_and_a_wrong_login_is_one_line(team, tmp_path):
    # Given a run of alice's saved offline (a spool) while the server was away
    with login("alice"):
        run_id = MlflowClient(team.url).create_run(team.experiment_id).info.run_id
    spool = Spool(tmp_path / "mlflow-spool", run_id, team.url, team.experiment_id)
    spool.open()
    spool.params({"learning_rate": "0.001"})
    spool.finish("FINISHED")
    upload = ["insect_exp.upload", str(spool.dir)]

    # When it is uploaded with a wrong password, and by carol, who may only read her experiment
    wrong = _command(upload, tmp_path, "alice", "wrong-password-1234", team.root)
    reader = _command(upload, tmp_path, "carol", PASSWORDS["carol"], team.root)

    # Then each is refused in one line naming the server and the user, exit 2
    for outcome, user in ((wrong, "'alice'"), (reader, "'carol'")):
        assert outcome.code == 2, outcome.err[-3000:]
        assert outcome.last_line.startswith("insect_exp.upload: error: the MLflow server ")
        assert team.url in outcome.last_line and user in outcome.last_line, outcome.last_line
        assert "Traceback" not in outcome.err and "password-1234" not in outcome.err

    # When alice uploads it with her own login
    mine = _command(upload, tmp_path, "alice", PASSWORDS["alice"], team.root)

    # Then her run is complete on the server
    assert mine.code == 0, mine.err[-3000:]
    with login(ADMIN):
        found = MlflowClient(team.url).get_run(run_id)
    assert found.info.status == "FINISHED"
    assert found.data.params == {"learning_rate": "0.001"}
