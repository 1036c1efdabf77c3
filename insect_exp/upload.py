"""Upload a run saved on local disk while its MLflow store was gone (tracking/spool.py):

    python -m insect_exp.upload SPOOL_DIR [--tracking-uri URI]

Uploading replays the spool into the same run by id, once the store is back. An upload can be
repeated (after a fault, or by mistake): the run keeps one logged model and at most one
registered version. A spool holding a link is refused whole.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from insect_exp import UserError
from insect_exp.errors import exit_with, first_line
from insect_exp.tracking.spool import INPUTS_FILE, OFFLINE_NOTE


def upload(directory: str | Path, tracking_uri: str | None = None) -> str:
    """Replay a spool into its run; return the run id. The spool is left in place.

    Safe to repeat: what the store holds already is not sent twice (metrics, params and tags are
    the same rows again; the model, and its registered version, are made once per run), and a
    model that an interrupted upload or the run itself left unfinished is replaced.

    Raises:
        UserError: the spool holds a link, which is not followed out of it; nothing is sent.
        StoreError: the store's server refused the user's login or the write (one line).
    """
    import mlflow

    from insect_exp import tracking

    spool = Path(directory)
    _refuse_links(spool)
    info = json.loads((spool / "run.json").read_text())
    uri = tracking_uri or info["tracking_uri"]
    # MLflow's registry looks a models:/ source up in the process's store: this one.
    mlflow.set_tracking_uri(tracking.with_busy_timeout(uri))
    with tracking.refusals_named(uri, f"write to run {info['run_id']}"):
        _replay(spool, info, tracking.open_client(uri))
    return info["run_id"]


def _replay(spool: Path, info: dict[str, Any], client: Any) -> None:
    """Send what the spool holds to its run, and end the run with the spool's status."""
    from mlflow.entities import Metric, Param, RunTag

    from insect_exp import tracking
    from insect_exp.tracking.lineage import SplitRecord

    run_id = info["run_id"]
    # fails here, before anything is sent, if the store is still gone
    if client.get_run(run_id).data.tags.get("error", "").startswith(OFFLINE_NOTE):
        client.delete_tag(run_id, "error")  # the spool holds its true ending
    params = _read_json(spool / "params.json")
    tags = _read_json(spool / "tags.json")
    metrics = []
    if (spool / "metrics.jsonl").is_file():
        for line in (spool / "metrics.jsonl").read_text().splitlines():
            m = json.loads(line)
            metrics.append(Metric(m["key"], m["value"], m["timestamp"], m["step"]))
    params_ = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(params_), 100):  # MLflow's limits per log_batch call
        client.log_batch(run_id, params=params_[start : start + 100])
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    if any((spool / "artifacts").iterdir()):
        client.log_artifacts(run_id, str(spool / "artifacts"))
    inputs = spool / "artifacts" / INPUTS_FILE
    if inputs.is_file():  # the run's datasets, as MLflow inputs (the file stays an artifact)
        records = [SplitRecord(**r) for r in json.loads(inputs.read_text())]
        datasets = [r.to_input() for r in records]
        tracking.retry_if_raced(lambda: client.log_inputs(run_id, datasets=datasets))
    if (spool / "model" / "MLmodel").is_file():
        _upload_model(client, spool, info)
    status = (spool / "status").read_text().strip() if (spool / "status").is_file() else "KILLED"
    client.set_terminated(run_id, status)


def _upload_model(client: Any, spool: Path, info: Mapping[str, Any]) -> None:
    """The spooled model as the run's logged model, unless the run has a finished one already."""
    from insect_exp.tracking import logged_model

    run_id, name = info["run_id"], "model"
    experiment_id = client.get_run(run_id).info.experiment_id
    found = logged_model.finished_model(client, experiment_id, run_id, name)
    if found is None:
        model_id = client.create_logged_model(experiment_id, name, source_run_id=run_id).model_id
        model_dir: Path | None = spool / "model"
    else:  # sent by an earlier upload, or by the run before its store failed
        model_id, model_dir = found.model_id, None
    logged_model.complete(
        client, run_id, model_id, model_dir, info.get("model_step"),
        info.get("registered_model_name"),
    )  # fmt: skip


def _refuse_links(spool: Path) -> None:
    """A spool holds plain files only: a link in it could send any file of this machine."""
    links = []
    for folder, dirs, files in os.walk(spool):
        links += [Path(folder, n) for n in [*dirs, *files] if Path(folder, n).is_symlink()]
    if links:
        named = ", ".join(str(p.relative_to(spool)) for p in sorted(links)[:5])
        more = f" and {len(links) - 5} more" if len(links) > 5 else ""
        raise UserError(
            f"{spool} holds links ({named}{more}), which an upload does not follow out of the "
            "spool: nothing was sent; replace them with the files themselves, or remove them"
        )


def _read_json(path: Path) -> dict[str, str]:
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m insect_exp.upload",
        description="Upload a run saved locally while its MLflow store was unreachable.",
    )
    parser.add_argument("spool", help="the spool directory the run printed")
    parser.add_argument("--tracking-uri", help="upload to this store instead of the run's own")
    args = parser.parse_args(argv)
    try:
        run_id = upload(args.spool, args.tracking_uri)
    except Exception as err:  # the store is still gone or refuses us, or the spool is not one
        # The whole first line: a refused spool's names its links and what to do with them.
        message = f"error: {first_line(err, limit=None)}"
        exit_with("insect_exp.upload", message, 2 if isinstance(err, UserError) else 1)
    print(f"uploaded run {run_id}")


if __name__ == "__main__":
    main()
