"""Sweep groups: children grouped by every override but the seed, each group's final metrics as a
mean with its Student's t interval, failed children counted apart."""

from __future__ import annotations

import json

import pytest

from insect_exp.stats import mean_interval
from insect_exp.sweep.groups import GROUP_TAG, group_children, group_of, table
from insect_exp.tracking import RunRecord

LR = "optimizer.learning_rate=0.01"
STATS = ("mean", "std", "low", "high")


def _child(job: int, overrides: list[str], status: str, val: float | None) -> RunRecord:
    """A child as the store gives it back, tagged with its group as a job tags it; job 2 stopped
    early, after one epoch of two."""
    metrics = {} if val is None else {"val_accuracy": val, "test_accuracy": val - 0.1}
    history = {} if val is None else {"val_accuracy": [val / 2, val][: 1 if job == 2 else 2]}
    return RunRecord(
        run_id=f"id{job}",
        name=f"job{job}",
        status=status,
        tags={
            "sweep.job_num": str(job),
            "sweep.overrides": json.dumps(overrides),
            GROUP_TAG: group_of(overrides),
        },
        metrics=metrics,
        history=history,
    )


@pytest.mark.parametrize(
    ("overrides", "group"),
    [
        (["seed=5", "optimizer.learning_rate=0.01", "model=cnn"], f"model=cnn,{LR}"),
        (["model=cnn", "seed=6", "optimizer.learning_rate=0.01"], f"model=cnn,{LR}"),
        (["seed=7"], "default"),
        (["++seed=7", "optimizer=sgd"], "optimizer=sgd"),
        ([], "default"),
    ],
)  # fmt: skip
def test_a_group_is_every_override_but_the_seed_in_key_order(overrides, group):
    assert group_of(overrides) == group


def test_groups_hold_the_mean_and_t_interval_of_their_finished_childrens_final_metrics():
    # Given two configurations of three replicates each, one replicate of the second failed
    adam, sgd = ["optimizer=adam"], ["optimizer=sgd"]
    children = [
        _child(0, [*adam, "seed=1"], "FINISHED", 0.5),
        _child(1, [*sgd, "seed=1"], "FINISHED", 0.8),
        _child(2, [*adam, "seed=2"], "FINISHED", 0.6),
        _child(3, [*sgd, "seed=2"], "FAILED", None),
        _child(4, [*adam, "seed=3"], "FINISHED", 0.9),
        _child(5, [*sgd, "seed=3"], "FINISHED", 0.7),
    ]

    # When they are grouped
    groups = group_children(children, "val_accuracy")
    columns, rows = table(groups)

    # Then there is one row per configuration, in job order, the failed child counted apart
    assert [(r["group"], r["n"], r["failed"]) for r in rows] == [
        ("optimizer=adam", 3, 0),
        ("optimizer=sgd", 2, 1),
    ]
    # And each metric's mean, std and interval are those of the finished children's values
    for row, values in zip(rows, ([0.5, 0.6, 0.9], [0.8, 0.7]), strict=True):
        expected = mean_interval(values)
        got = [row[f"val_accuracy_{s}"] for s in STATS]
        assert got == pytest.approx([expected.mean, expected.std, expected.low, expected.high])
        assert row["test_accuracy_mean"] == pytest.approx(expected.mean - 0.1)
    assert columns[:7] == ["group", "n", "failed", *(f"val_accuracy_{s}" for s in STATS)]
    # And each group's curve has one point per epoch over the children that reached it
    adam_curve = groups[0].curve()
    assert [p.n for p in adam_curve] == [3, 2]
    assert adam_curve[0].mean == pytest.approx((0.25 + 0.3 + 0.45) / 3)


def test_a_group_whose_children_all_failed_is_listed_with_no_statistics():
    # Given a group whose only child failed
    failed = [_child(0, ["optimizer=sgd"], "FAILED", None)]

    # When it is grouped
    columns, rows = table(group_children(failed, "val_accuracy"))

    # Then its row counts it, with no statistics
    assert rows == [{"group": "optimizer=sgd", "n": 0, "failed": 1}]
    assert columns == ["group", "n", "failed"]
