"""A run saved on local disk while its MLflow store is gone, and the command that uploads it later.

    python -m insect_exp.upload SPOOL_DIR [--tracking-uri URI]

When the store stops answering in the middle of a run, training goes on and everything the run
still logs (metrics, params, tags, artifacts, the model, its final status) lands in a spool
directory under the run's output dir instead. Uploading replays it into the same run by id, once
the store is back. An upload can be repeated (after a fault, or by mistake): the run keeps one
logged model and at most one registered version. A spool holding a link is refused whole.

Layout: run.json (ids, URI, the registered model name and the model's epoch if any),
metrics.jsonl, params.json, tags.json, artifacts/, model/ (an MLflow model directory), status
(written last).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from insect_exp import UserError

SPOOL_DIR = "mlflow-spool"  # in a run's output dir
INPUTS_FILE = "dataset/inputs.json"  # a spooled run's dataset inputs, replayed as MLflow inputs


class Spool:
    """The local copy of what a run could not send to its store."""

    def __init__(self, directory: str | Path, run_id: str, tracking_uri: str, experiment_id: str):
        self.dir = Path(directory)
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id

    def open(self) -> None:
        (self.dir / "artifacts").mkdir(parents=True, exist_ok=True)
        info = {"run_id": self.run_id, "tracking_uri": self.tracking_uri}
        info["experiment_id"] = self.experiment_id
        (self.dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")

    def metrics(self, metrics: Iterable[Any]) -> None:
        """Append mlflow.entities.Metric values."""
        with (self.dir / "metrics.jsonl").open("a") as out:
            for m in metrics:
                record = {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                out.write(json.dumps(record) + "\n")

    def _merge(self, name: str, values: Mapping[str, str]) -> None:
        path = self.dir / name
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged.update({k: str(v) for k, v in values.items()})
        path.write_text(json.dumps(merged, indent=2) + "\n")

    def params(self, params: Mapping[str, str]) -> None:
        self._merge("params.json", params)

    def tags(self, tags: Mapping[str, str]) -> None:
        self._merge("tags.json", tags)

    def artifact(self, artifact_file: str) -> Path:
        """Where an artifact file goes (its folders made)."""
        path = self.dir / "artifacts" / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def artifacts(self, local_dir: str | Path, artifact_path: str | None) -> None:
        target = self.dir / "artifacts" / (artifact_path or "")
        shutil.copytree(local_dir, target, dirs_exist_ok=True)

    def register_as(self, name: str) -> None:
        """Register the spooled model under `name` when it is uploaded."""
        self._note({"registered_model_name": name})

    def model_step(self, step: int | None) -> None:
        """The epoch whose weights the spooled model holds (None: the last)."""
        self._note({"model_step": step})

    def _note(self, values: Mapping[str, Any]) -> None:
        path = self.dir / "run.json"
        info = json.loads(path.read_text())
        path.write_text(json.dumps({**info, **values}, indent=2) + "\n")

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    def finish(self, status: str) -> None:
        (self.dir / "status").write_text(status + "\n")


_OFFLINE = "the store failed this run mid-way; the rest of its record is in "


def offline_note(spool: Path) -> str:
    """The error a sweep gives a child whose record is in a spool (upload clears it)."""
    return f"{_OFFLINE}{spool}: upload it with python -m insect_exp.upload {spool}"


def spools_under(directory: str | Path) -> dict[str, Path]:
    """The spools below a directory (a sweep's jobs), by run id."""
    found = {}
    for info in Path(directory).glob(f"**/{SPOOL_DIR}/run.json"):
        try:
            found[json.loads(info.read_text())["run_id"]] = info.parent
        except (OSError, ValueError, KeyError):
            continue  # not a spool
    return found


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
    if client.get_run(run_id).data.tags.get("error", "").startswith(_OFFLINE):
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
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"insect_exp.upload: error: {text}", file=sys.stderr)
        sys.exit(2 if isinstance(err, UserError) else 1)
    print(f"uploaded run {run_id}")


if __name__ == "__main__":
    main()
