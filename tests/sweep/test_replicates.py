"""replicates=N: each configuration trained N times with seeds seed, seed+1, ..., grouped on the
sweep's parent with intervals."""

from __future__ import annotations

import csv

import pytest
from hydra import compose, initialize_config_dir

import insect_exp
from insect_exp import UserError
from insect_exp.config import register_configs
from insect_exp.stats import mean_interval
from insect_exp.sweep.groups import GROUP_TAG
from tests.conftest import CONF_DIR, run_cli
from tests.sweeps import run_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _hydra_node(*overrides: str) -> tuple[str, dict]:
    """The run mode and the sweeper's params that Hydra composes for these overrides."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        return str(cfg.hydra.mode), dict(cfg.hydra.sweeper.params or {})


def test_replicates_make_a_multirun_over_seeds_from_the_configured_seed():
    # Given replicates=N and the seed the config composes to (7 here), or the config's own seed
    # Then the run is a multirun sweeping seed over N seeds from the configured one
    # (and without replicates, a plain run with no sweep of its own)
    assert _hydra_node("replicates=3", "seed=7") == ("RunMode.MULTIRUN", {"seed": "7,8,9"})
    mode, params = _hydra_node("replicates=2", "experiment=reference_cnn")
    assert mode == "RunMode.MULTIRUN" and params == {"seed": "123,124"}
    assert _hydra_node() == ("None", {})


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["seed=1,2"], "replicates=3 and a sweep over seed (seed=1,2) both set the seeds"),
        (["hparams_search=optuna"], "replicates=3 needs Hydra's basic sweeper"),
        (
            ["seed=7"],
            "would train seed 7 alone (the command line's seed replaces the seed sweep): "
            "give the seeds as a sweep instead, seed=7,8,9",
        ),
    ],
)
def test_replicates_with_seeds_set_elsewhere_stop_with_one_line_before_any_run(
    tmp_path, given, message
):
    # Given replicates=3 with a seed sweep or one seed on the command line, or with Optuna's
    # search (which would search the seed)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    # When the command starts
    done = run_cli("replicates=3", *given, f"mlflow.tracking_uri={uri}", cwd=tmp_path)

    # Then it stops with exit 2 and one error line, before the store is touched
    assert done.returncode == 2, done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("insect_exp: error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory):
    """Two learning rates x 3 replicates: `python -m insect_exp optimizer.learning_rate=0.001,0.01
    replicates=3`, no -m needed (replicates=N makes the command a multirun)."""
    root = tmp_path_factory.mktemp("replicates")
    return run_sweep(root, "optimizer.learning_rate=0.001,0.01", "replicates=3", flags=())


def test_two_configurations_with_three_replicates_give_two_groups_of_three(replicated, tmp_path):
    # Given a finished sweep of 2 learning rates x 3 replicates
    assert replicated.returncode == 0, replicated.output
    children = replicated.children

    # Then there are 6 FINISHED children, each configuration with seeds 123, 124, 125
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
    groups: dict[str, list] = {}
    for child in children:
        groups.setdefault(child.data.tags[GROUP_TAG], []).append(child)
    assert sorted(groups) == [f"optimizer.learning_rate={lr}" for lr in ("0.001", "0.01")]
    for members in groups.values():
        assert sorted(c.data.params["seed"] for c in members) == ["123", "124", "125"]

    # And the parent's groups.csv holds each group's n and the t interval of its children's
    # final metrics, as read from the store
    parent = replicated.parent.info.run_id
    table = replicated.download(parent, "summary/groups.csv", tmp_path)
    rows = {r["group"]: r for r in csv.DictReader(table.open())}
    assert set(rows) == set(groups)
    for name, members in groups.items():
        row = rows[name]
        assert (row["n"], row["failed"]) == ("3", "0")
        for metric in ("val_accuracy", "test_accuracy", "val_loss"):
            expected = mean_interval([c.data.metrics[metric] for c in members])
            got = [float(row[f"{metric}_{s}"]) for s in ("mean", "low", "high")]
            assert got == pytest.approx([expected.mean, expected.low, expected.high])
    assert (
        "| optimizer.learning_rate=0.01 | 3 | 0 |"
        in replicated.download(parent, "summary/groups.md", tmp_path).read_text()
    )
    # And the group plots are PNGs
    for name in ("group_curves", "group_final"):
        plot = replicated.download(parent, f"plots/{name}.png", tmp_path)
        assert plot.read_bytes()[:8] == PNG_MAGIC


def test_train_from_python_refuses_replicates_as_it_returns_one_run(tmp_path, monkeypatch):
    # Given the Python API's train, which returns one run, asked for 3 replicates
    monkeypatch.chdir(tmp_path)  # Hydra's output dir lands here

    # Then it refuses before anything trains, naming the call that does it
    with pytest.raises(UserError, match=r"call insect_exp.sweep\(grid, replicates=3\)"):
        insect_exp.train(replicates=3, mlflow__tracking_uri=f"sqlite:///{tmp_path / 'db'}")
    assert not (tmp_path / "db").exists()
