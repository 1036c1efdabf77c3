"""Training on several devices or machines with tf.distribute: strategy, cluster, who logs.

- `default`: TensorFlow's default strategy, one device (GPU:0 when there is one, else the CPU).
- `mirrored`: MirroredStrategy over every local GPU or, without one, over the CPU's logical
  devices (`train.logical_cpus`, so that it can be tried on any machine).
- `multi_worker`: MultiWorkerMirroredStrategy over the cluster that TF_CONFIG describes, or over
  the SLURM job step that srun started this process in (SlurmClusterResolver).

`batch_size` is the global batch: each step, N replicas get batch_size / N images each and their
gradients are summed, so steps per epoch and the learning rate are those of one device with the
same batch_size. Only the chief (worker 0) logs to MLflow; the other workers run the same code
with a `tracking.worker.WorkerRun` that logs nothing, because every collective op must run on
every worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from insect_exp import UserError
from insect_exp.config import Strategy, TrainConfig
from insect_exp.errors import first_line

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

# srun sets these in every task of a job step; SlurmClusterResolver reads them.
SLURM_STEP_VARS = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST")
SLURM_PORT_BASE = 8888  # SlurmClusterResolver's default: task i of a node listens on 8888 + i


class WorkerLost(Exception):
    """Another worker of a multi_worker run stopped answering: the run fails."""


@dataclass(frozen=True)
class Distribution:
    """The strategy a run trains under, and this process's place in the cluster."""

    strategy: tf.distribute.Strategy
    kind: Strategy
    devices: tuple[str, ...]  # this worker's devices the replicas run on
    worker: int = 0
    num_workers: int = 1
    is_chief: bool = True

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def describe(self) -> str:
        """One line: the strategy, the devices, and for multi_worker which worker this is."""
        from insect_exp import hardware

        if self.kind is Strategy.default:
            return hardware.describe_devices()
        names = ", ".join(d.rsplit("device:", 1)[-1] for d in self.devices)
        line = f"training on {self.replicas} replica(s), strategy {self.kind.value}: {names}"
        if self.kind is Strategy.multi_worker:
            role = "the chief, logs the run" if self.is_chief else "logs nothing"
            line += f" on each of {self.num_workers} workers; this is worker {self.worker} ({role})"
        return line


def cluster_source(environ: Mapping[str, str] | None = None) -> str:
    """Where multi_worker takes its cluster from: "TF_CONFIG" or "SLURM".

    Raises:
        UserError: neither is set up, or TF_CONFIG is not the JSON TensorFlow expects.
    """
    env = os.environ if environ is None else environ
    if env.get("TF_CONFIG"):
        try:
            spec = json.loads(env["TF_CONFIG"])
            ok = isinstance(spec, dict) and spec.get("cluster") and "type" in spec.get("task", {})
        except json.JSONDecodeError as err:
            raise UserError(f"TF_CONFIG is not valid JSON: {err}") from None
        if not ok:
            raise UserError(
                'TF_CONFIG needs "cluster" and "task" (e.g. {"cluster": {"worker": ["host:port", '
                '...]}, "task": {"type": "worker", "index": 0}})'
            )
        return "TF_CONFIG"
    if all(env.get(name) for name in SLURM_STEP_VARS):
        return "SLURM"
    job = env.get("SLURM_JOB_ID")
    where = f" (in SLURM job {job} but not in a job step: start it with srun)" if job else ""
    raise UserError(
        "train.strategy=multi_worker needs a cluster: set TF_CONFIG on every worker, or start "
        f"one task per node with srun in a SLURM allocation; neither is there{where}"
    )


def is_chief(task_type: str | None, task_id: int | None, cluster: Mapping[str, Any]) -> bool:
    """The chief logs the run: the "chief" task, or worker 0 of a cluster without one."""
    if task_type in (None, "chief"):
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


def per_replica_batch(batch_size: int, replicas: int) -> int:
    """Images each replica gets of a global batch (the last batch of an epoch may have fewer).

    Raises:
        UserError: fewer images in a batch than replicas.
    """
    if batch_size < replicas:
        raise UserError(
            f"batch_size={batch_size} is the global batch, split across {replicas} replicas: "
            f"it must be at least {replicas}"
        )
    return batch_size // replicas


def before_tensorflow(cfg: TrainConfig) -> None:
    """Checks and settings that must come before TensorFlow is imported.

    multi_worker without a cluster fails here, in a second. On CPUs, several replicas run with
    TensorFlow's oneDNN ops off (unless TF_ENABLE_ONEDNN_OPTS is set): when the last batch of an
    epoch has fewer images than there are replicas, a replica gets an empty batch, and oneDNN's
    convolutions fail on it ("input depth must be evenly divisible by filter depth", TF 2.21).
    """
    if cfg.strategy is Strategy.multi_worker:
        cluster_source()
    from insect_exp import hardware

    several = cfg.strategy is Strategy.multi_worker or cfg.logical_cpus > 1
    if cfg.strategy is not Strategy.default and several and not hardware.nvidia_gpu_visible():
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def start(cfg: TrainConfig, batch_size: int, resume: bool = False) -> Distribution:
    """Create the strategy `cfg` names; call it before any other TensorFlow op of the process.

    Raises:
        UserError: multi_worker without a cluster or resuming, logical CPUs asked for too late,
            a batch smaller than the replicas, or workers that did not all come up in time.
    """
    source = cluster_source() if cfg.strategy is Strategy.multi_worker else None
    if source and resume:
        # The other workers would need the chief's checkpoint, which only the chief's run knows.
        raise UserError("resume= cannot continue a train.strategy=multi_worker run")
    _split_cpu(cfg.logical_cpus)
    if cfg.strategy is Strategy.multi_worker:
        dist = _multi_worker(source, cfg.worker_timeout_s)
    elif cfg.strategy is Strategy.mirrored:
        dist = _mirrored()
    else:
        import tensorflow as tf

        dist = Distribution(tf.distribute.get_strategy(), Strategy.default, ())
    per_replica_batch(batch_size, dist.replicas)
    return dist


def _split_cpu(count: int) -> None:
    """Split the CPU into `count` logical devices (0: leave it whole)."""
    if count <= 0:
        return
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError:
        # The runtime had started (an earlier job of an in-process sweep): keep what it has.
        have = len(tf.config.list_logical_devices("CPU"))
        if have != count:
            raise UserError(
                f"train.logical_cpus={count} must be set before TensorFlow starts; this process "
                f"already has {have} CPU device(s) (run it in a process of its own)"
            ) from None


def _mirrored() -> Distribution:
    """MirroredStrategy over every GPU, else over every logical CPU device."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        strategy = tf.distribute.MirroredStrategy()  # every GPU, NCCL all-reduce
    else:
        # Without GPUs MirroredStrategy would take the CPU as one device; NCCL needs GPUs.
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(
            devices=cpus, cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
    devices = tuple(strategy.extended.worker_devices)
    return Distribution(strategy, Strategy.mirrored, devices)


def _multi_worker(source: str | None, timeout_s: float) -> Distribution:
    """MultiWorkerMirroredStrategy on the TF_CONFIG or SLURM cluster, once every worker is up."""
    import tensorflow as tf

    from insect_exp import hardware

    if source == "SLURM":
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=SLURM_PORT_BASE,
            # Its default asks nvidia-smi, which a CPU node lacks.
            gpus_per_node=None if hardware.nvidia_gpu_visible() else 0,
        )
    else:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_s)
    # Creating the strategy waits, inside TensorFlow's C++ runtime (deaf to signals and with no
    # public timeout), until every worker has registered; a watchdog bounds that wait.
    watchdog = _exit_after(
        timeout_s,
        f"not every worker of {resolver.cluster_spec().as_dict()} came up within "
        f"train.worker_timeout_s={timeout_s:g} s (is each one started, with its own task index?)",
    )
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver, communication_options=options
        )
    except RuntimeError as err:
        if "Collective ops must be configured at program startup" in str(err):
            raise UserError(
                "train.strategy=multi_worker must start with the process: not in an in-process "
                "sweep or after another run"
            ) from None
        raise
    except tf.errors.OpError as err:
        raise WorkerLost(f"the cluster did not come up: {first_line(err)}") from None
    finally:
        watchdog.kill()
        watchdog.wait()
    resolver = strategy.cluster_resolver
    cluster = resolver.cluster_spec().as_dict()
    num_workers = sum(len(cluster.get(job, [])) for job in ("chief", "worker"))
    worker = int(resolver.task_id or 0) + (
        1 if resolver.task_type == "worker" and "chief" in cluster else 0
    )
    return Distribution(
        strategy,
        Strategy.multi_worker,
        tuple(strategy.extended.worker_devices),
        worker=worker,
        num_workers=num_workers,
        is_chief=is_chief(resolver.task_type, resolver.task_id, cluster),
    )


def _exit_after(seconds: float, message: str) -> subprocess.Popen:
    """Kill this process after `seconds`, saying `message` in one line, unless the returned
    watcher is killed first.

    The wait it bounds holds the GIL inside TensorFlow's C++ runtime, where neither a Python
    thread nor a signal handler can run: the watcher is a process of its own. No MLflow run is
    open yet when it is used, so nothing is left RUNNING.
    """
    code = (
        "import os, sys, time\n"
        f"time.sleep({float(seconds)!r})\n"
        f"print({('insect_exp: error: ' + message)!r}, file=sys.stderr, flush=True)\n"
        f"os.kill({os.getpid()}, 9)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def peer_failures(dist: Distribution) -> Iterator[None]:
    """Turn the errors a dead or unreachable worker causes into one WorkerLost, on every worker."""
    if dist.kind is not Strategy.multi_worker:
        yield
        return
    import tensorflow as tf

    lost = (
        tf.errors.UnavailableError,
        tf.errors.DeadlineExceededError,
        tf.errors.AbortedError,
        tf.errors.CancelledError,
        tf.errors.FailedPreconditionError,
    )
    try:
        yield
    except lost as err:
        raise WorkerLost(
            f"a worker of the {dist.num_workers}-worker cluster stopped answering "
            f"({type(err).__name__}): {peer_error_reason(str(err))}"
        ) from err


_REASON_WORDS = ("unhealthy", "aborted", "down", "timed out", "deadline", "unavailable", "socket")


def peer_error_reason(message: str) -> str:
    """The line of a collective op's error that says what happened to the peer (one line).

    TensorFlow's message starts with "Graph execution error:" and the Python stack of the op;
    the reason (e.g. "... tasks are unhealthy (stopped sending heartbeats): /job:worker/...") and
    the tasks it names come further down.
    """
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if any(word in line.lower() for word in _REASON_WORDS) and not line.startswith("File "):
            tasks = [t for t in lines[i + 1 : i + 4] if t.startswith("/job:")]
            return " ".join([line, *tasks])[:500]
    return lines[-1][:500] if lines else "no reason given"


def cluster_role(strategy: tf.distribute.Strategy) -> tuple[bool, bool]:
    """(several workers, this is the chief) for the strategy a model was built under."""
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False, True
    resolver = strategy.cluster_resolver
    cluster = resolver.cluster_spec().as_dict()
    return len(cluster) > 1 or sum(map(len, cluster.values())) > 1, is_chief(
        resolver.task_type, resolver.task_id, cluster
    )


class LocalPredictor:
    """`model.predict` on this worker alone, without the strategy's gather across workers.

    For work that one worker does for all (the chief extracting frozen features), which must not
    wait on collective ops the other workers never join.
    """

    def __init__(self, model) -> None:
        import tensorflow as tf

        strategy = model.distribute_strategy

        @tf.function
        def call(images: tf.Tensor) -> tf.Tensor:
            # In replica context, as Keras runs models; no op in it talks to other workers. Local
            # replicas (several GPUs) each compute the batch: take the first one's.
            outputs = strategy.run(lambda x: model(x, training=False), args=(images,))
            return strategy.experimental_local_results(outputs)[0]

        self._call = call

    def predict(self, dataset, verbose: int = 0, callbacks=(), **_: Any):
        import numpy as np

        outputs = []
        for step, batch in enumerate(dataset):
            outputs.append(self._call(batch[0] if isinstance(batch, tuple) else batch).numpy())
            for callback in callbacks or ():
                callback.on_predict_batch_end(step)
        return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)
