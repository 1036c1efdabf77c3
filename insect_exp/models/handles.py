"""Where pretrained weights come from: TF Hub handles and labels files, resolved to local files.

A handle is a URL, a local SavedModel directory, or a module already in TFHUB_CACHE_DIR. Offline,
a download fails within its timeout with a message naming the setting to change, never hangs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from insect_exp import UserError
from insect_exp.errors import first_line

EXPORT_COMMAND = "python -m insect_exp.models.export_untrained DIR"


class HubHandleError(UserError):
    """A TF Hub handle or labels file cannot be loaded (offline, missing, not a SavedModel)."""


class Setting(NamedTuple):
    """Where the user sets a handle, for error messages: config key, env var, export subdir."""

    key: str
    env: str
    export_path: str


FEATURES_SETTING = Setting("model.handle", "INSECT_EXP_HUB_HANDLE", "DIR/feature_vector")
CLASSIFIER_SETTING = Setting(
    "model.preview.handle", "INSECT_EXP_HUB_CLASSIFIER_HANDLE", "DIR/classifier"
)
LABELS_SETTING = Setting("model.preview.labels", "INSECT_EXP_IMAGENET_LABELS", "DIR/labels.txt")


def is_remote(handle: str) -> bool:
    return handle.startswith(("http://", "https://", "gs://"))


def _offline_error(what: str, source: str, reason: str, setting: Setting) -> HubHandleError:
    return HubHandleError(
        f"cannot download {what} {source!r} ({reason}). Without network, set "
        f"{setting.key}=/local/path (or export {setting.env}=/local/path); for a smoke run, "
        f"export an UNTRAINED (random-weight) MobileNetV2 with `{EXPORT_COMMAND}` and set "
        f"{setting.key}={setting.export_path}"
    )


def probe(url: str, timeout_s: float) -> str | None:
    """None if `url` answers an HTTP HEAD within timeout_s, else why not (never blocks longer)."""
    outcome: list[str | None] = []

    def run() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout_s):
                outcome.append(None)
        except urllib.error.HTTPError as err:
            # The server answered: the network is up. A missing handle is the resolver's to report.
            outcome.append(f"HTTP {err.code}" if err.code in (404, 410) else None)
        except Exception as err:  # any other failure means unreachable: report why
            reason = getattr(err, "reason", err)
            outcome.append(f"{type(reason).__name__}: {reason}".strip(": "))

    # urlopen's timeout does not cover DNS lookups, which can stall for minutes: wait in a daemon
    # thread and give up on it rather than hang the run.
    thread = threading.Thread(target=run, daemon=True, name="weights-probe")
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """A default socket timeout while downloading with a library that sets none.

    It is process-wide, but only for the download: clients that set their own timeouts (MLflow's
    REST calls do) are unaffected.
    """
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def hub_cache_dir() -> Path:
    """Where tensorflow_hub keeps downloaded modules: $TFHUB_CACHE_DIR, else its temp default."""
    return Path(os.environ.get("TFHUB_CACHE_DIR") or Path(tempfile.gettempdir()) / "tfhub_modules")


def _is_saved_model(path: Path) -> bool:
    return (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()


def check_reachable(handle: str, timeout_s: float, setting: Setting = FEATURES_SETTING) -> None:
    """Raise what `resolve_handle` would, short of downloading: a local path that is no
    SavedModel, or a URL that is not cached and does not answer within timeout_s.

    Without TensorFlow: made before a run opens, so a handle offline leaves no FAILED run.
    """
    if not is_remote(handle):
        resolve_handle(handle, timeout_s, setting)  # a local handle: stats only
        return
    if _is_saved_model(hub_cache_dir() / hashlib.sha1(handle.encode("utf8")).hexdigest()):
        return
    probe_url = "https://storage.googleapis.com/" if handle.startswith("gs://") else handle
    reason = probe(probe_url, timeout_s)
    if reason is not None:
        raise _offline_error("TF Hub model", handle, reason, setting)


def resolve_handle(handle: str, timeout_s: float, setting: Setting = FEATURES_SETTING) -> Path:
    """The local SavedModel directory behind `handle`: a path, a TFHUB_CACHE_DIR module, a download.

    Offline, a download fails within about timeout_s instead of hanging.

    Raises:
        HubHandleError: with a one-line message saying which setting to change and how.
    """
    if not is_remote(handle):
        path = Path(handle.removeprefix("file://")).expanduser()
        if _is_saved_model(path):
            return path.resolve()
        if path.is_dir():
            inner = sorted(p.name for p in path.iterdir() if _is_saved_model(p))
            # An export_untrained output dir holds several models: suggest the one this key wants.
            wanted = Path(setting.export_path).name
            guess = wanted if wanted in inner else (inner[0] if inner else None)
            hint = f"; did you mean {path / guess}?" if guess else ""
            raise HubHandleError(f"{setting.key}={handle!r} is not a SavedModel directory{hint}")
        raise HubHandleError(
            f"{setting.key}={handle!r} is neither a URL nor an existing SavedModel directory "
            f"(export an UNTRAINED one for offline runs with `{EXPORT_COMMAND}`)"
        )
    # tensorflow_hub caches downloads under sha1(handle); use one without touching the network.
    cached = hub_cache_dir() / hashlib.sha1(handle.encode("utf8")).hexdigest()
    if _is_saved_model(cached):
        return cached
    probe_url = "https://storage.googleapis.com/" if handle.startswith("gs://") else handle
    reason = probe(probe_url, timeout_s)
    if reason is not None:
        raise _offline_error("TF Hub model", handle, reason, setting)
    import tensorflow as tf
    import tensorflow_hub as hub

    try:
        # tensorflow_hub's urlopen has no timeout; a stalled download would otherwise hang.
        with socket_timeout(timeout_s):
            return Path(hub.resolve(handle))
    except (OSError, ValueError, tf.errors.OpError) as err:
        raise _offline_error("TF Hub model", handle, first_line(err, limit=None), setting) from err


def read_labels(source: str, timeout_s: float) -> list[str]:
    """Class names, one a line, from a local file or a URL (failing fast when offline)."""
    if not is_remote(source):
        path = Path(source.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise HubHandleError(
                f"{LABELS_SETTING.key}={source!r} is not a file (a URL or a path to a labels "
                f"file, one class name a line; `{EXPORT_COMMAND}` writes placeholder ones)"
            )
        return path.read_text().splitlines()
    reason = probe(source, timeout_s)
    if reason is None:
        try:
            with urllib.request.urlopen(source, timeout=timeout_s) as response:
                return response.read().decode("utf8").splitlines()
        except (OSError, ValueError) as err:
            reason = str(getattr(err, "reason", err))
    raise _offline_error("labels", source, reason, LABELS_SETTING)


def resolve_preview(handle: str, labels: str, timeout_s: float) -> tuple[Path, list[str]]:
    """The ImageNet preview's classifier (a local SavedModel) and its class names.

    Both are checked before either fails: offline, each needs a setting of its own, and one
    message names both rather than the labels only once the classifier is fixed.

    Raises:
        HubHandleError: one line naming every setting that must change.
    """
    found: list[Any] = []
    problems = []
    for load in (
        lambda: resolve_handle(handle, timeout_s, CLASSIFIER_SETTING),
        lambda: read_labels(labels, timeout_s),
    ):
        try:
            found.append(load())
        except HubHandleError as err:
            problems.append(str(err).rstrip("."))
    if len(problems) == 2:
        raise HubHandleError(
            "the ImageNet preview (model.preview.enabled=true) can load neither its classifier "
            f"nor its labels. Classifier: {problems[0]}. Labels: {problems[1]}. Or turn the "
            "preview off: model.preview.enabled=false"
        )
    if problems:
        raise HubHandleError(problems[0])
    return found[0], found[1]
