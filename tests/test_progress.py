"""Progress of long work: a bar with rate and ETA on a terminal, a few log lines otherwise."""

from __future__ import annotations

import io
import logging

from insect_exp import progress
from insect_exp.progress import Progress
from tests.conftest import make_image_folder, run_cli
from tests.sweeps import TINY


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_one_line_is_redrawn_with_rate_and_eta(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = _Terminal()
    with Progress(1000, "decoding train", stream=out) as bar:
        for _ in range(10):
            clock.now += 1.0
            bar.update(100)
            if bar.done == 500:
                assert out.getvalue().rsplit("\r", 1)[-1].startswith("[============>")
                assert "500/1000 images, 100 images/s, ETA 0:05" in out.getvalue()
    assert out.getvalue().endswith("took 0:10\x1b[K\n")
    assert out.getvalue().count("\n") == 1


def test_without_a_terminal_it_logs_a_first_line_then_one_a_quarter_and_one_at_the_end(
    monkeypatch, caplog
):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="insect_exp.progress")
    with Progress(10_000, "backbone features", stream=io.StringIO()) as bar:
        for _ in range(100):
            clock.now += 0.5
            bar.update(100)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5  # after 2 s, 25%, 50%, 75%, done
    assert lines[0] == "backbone features: 400/10000 images, 200 images/s, ETA 0:48"
    assert lines[1] == "backbone features: 2500/10000 images, 200 images/s, ETA 0:37"
    assert lines[-1].endswith("took 0:50")


def test_quick_work_logs_nothing(caplog):
    caplog.set_level(logging.INFO, logger="insect_exp.progress")
    with Progress(10, "decoding test", stream=io.StringIO()) as bar:
        bar.update(10)
    assert caplog.records == []


def test_training_into_a_file_or_pipe_writes_one_line_per_epoch_not_a_bar(tmp_path):
    # Given a run whose standard output is a pipe, as a SLURM .out file or `> run.log` is
    folder = make_image_folder(tmp_path / "insects")

    # When it trains for two epochs
    out = run_cli(*TINY, "epochs=2", f"dataset.root={folder}", cwd=tmp_path)

    # Then the output holds one header and one summary line per epoch, as Keras's verbose=2 writes
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert [line for line in lines if line.startswith("Epoch ")] == ["Epoch 1/2", "Epoch 2/2"]
    assert len([line for line in lines if " - loss: " in line]) == 2, out.stdout
    # And none of the progress bar's per-batch redraws
    assert "\r" not in out.stdout and "ETA" not in out.stdout and "[=" not in out.stdout


def test_keras_draws_its_bar_only_on_a_terminal():
    assert progress.keras_verbosity(_Terminal()) == 1
    assert progress.keras_verbosity(io.StringIO()) == 2
