"""A non-chief worker's run: it logs nothing (only the chief logs a multi-worker run)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from insect_exp.tracking.interface import MetricSink, Opened


class WorkerRun:
    """What a non-chief worker logs to: nothing. It keeps the metrics it is given, so that the
    job returns its final metric like the chief does; any log_*/set_* call does nothing."""

    run_id = None
    experiment_id = None

    def __init__(self) -> None:
        self._metrics: dict[str, dict[int, float]] = {}

    def opened(self) -> Opened:
        raise RuntimeError("a worker's run is not opened: only the chief (worker 0) logs")

    def sink(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._metrics.setdefault(key, {})[step] = float(value)

    def resumed_sink(self, keys: Iterable[str]) -> MetricSink:
        return self.sink

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.sink(metrics, step or 0)

    def metric_history(self, keys: Iterable[str]) -> dict[str, list[float]]:
        return {k: [v for _, v in sorted(self._metrics.get(k, {}).items())] for k in keys}

    def log_tf_model(
        self,
        artifacts: Mapping[str, str | Path],
        requirements: Sequence[str],
        name: str = "model",
        **kwargs: Any,
    ) -> str:
        return "(not logged: only the chief logs)"

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """What the chief's run draws and logs in its logging process: nothing here."""
        done: Future = Future()
        done.set_result(None)
        return done

    # Logged by the chief only.
    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_dict(self, data: Any, artifact_file: str) -> None:
        pass

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        pass

    def flush(self, raise_errors: bool = True) -> None:
        pass

    def end(self, status: str) -> None:
        pass

    def put_back(self) -> None:
        pass
