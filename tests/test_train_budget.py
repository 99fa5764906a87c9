"""Issue 22, section 2: what train says before it starts, the default backbone per device,
checkpoints written on a time budget (and when interrupted), progress where stderr is no
terminal."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import pytest
import torch

from deepfusion.backbones import default_backbone
from deepfusion.progress import PlainProgress, progress_bar, say_around_bars
from deepfusion.testing import cli_command, subprocess_env
from deepfusion.train.run_writer import RunWriter


def _row(epoch: int) -> dict:
    return {"epoch": epoch, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5,
            "lr": 1e-3, "seconds": 1.0, "val_segment_acc": 0.5}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _epoch(writer: RunWriter, clock: Clock, history: list, weights: torch.Tensor, epoch: int,
           *, best: bool = True, final: bool = False) -> bool:
    clock.now += 4.0                      # every epoch takes 4 s
    history.append(_row(epoch))
    state = {"w": weights}
    return writer.epoch_done(history, best={"epoch": epoch, "model_state": state} if best else None,
                             last={"epoch": epoch, "model_state": state, "history": history},
                             final=final)


def _epoch_of(path) -> int:
    return int(torch.load(path, weights_only=True)["epoch"])


def test_checkpoints_are_written_on_the_time_budget_and_the_log_every_epoch(tmp_path):
    clock, history, w = Clock(), [], torch.zeros(3)
    writer = RunWriter(tmp_path, save_every=10.0, clock=clock)
    assert not _epoch(writer, clock, history, w, 1)            # t = 4 s
    assert not (tmp_path / "last.pth").exists() and not (tmp_path / "best.pth").exists()
    assert len((tmp_path / "training_history.csv").read_text().splitlines()) == 2
    assert not (tmp_path / "training_history.png").exists()    # drawn with the checkpoints
    assert not _epoch(writer, clock, history, w, 2)            # t = 8 s
    assert _epoch(writer, clock, history, w, 3)                # t = 12 s: due
    assert _epoch_of(tmp_path / "last.pth") == 3 == _epoch_of(tmp_path / "best.pth")
    assert (tmp_path / "training_history.png").stat().st_size > 0
    assert not _epoch(writer, clock, history, w, 4)            # 4 s after the write
    assert _epoch_of(tmp_path / "last.pth") == 3
    assert _epoch(writer, clock, history, w, 5, final=True)    # the last epoch: always
    assert _epoch_of(tmp_path / "last.pth") == 5 and writer.saved_epoch == 5
    assert len((tmp_path / "training_history.csv").read_text().splitlines()) == 6


def test_every_epoch_with_a_budget_of_zero(tmp_path):
    clock, history, w = Clock(), [], torch.zeros(3)
    writer = RunWriter(tmp_path, save_every=0.0, clock=clock)
    for epoch in (1, 2):
        assert _epoch(writer, clock, history, w, epoch)
        assert _epoch_of(tmp_path / "last.pth") == epoch


def test_a_held_epoch_is_a_copy_that_later_steps_do_not_change(tmp_path):
    """Training updates the weights in place and appends to the history: what is written
    after an interruption must be the finished epoch, not the weights of the one under way."""
    clock, history, w = Clock(), [], torch.zeros(3)
    writer = RunWriter(tmp_path, save_every=100.0, clock=clock)
    _epoch(writer, clock, history, w, 1)
    w += 7.0                               # the next epoch's steps
    history.append(_row(2))
    writer.on_exit(KeyboardInterrupt(), echo=lambda line: None)
    saved = torch.load(tmp_path / "last.pth", weights_only=True)
    assert saved["epoch"] == 1 and torch.equal(saved["model_state"]["w"], torch.zeros(3))
    assert [r["epoch"] for r in saved["history"]] == [1]
    assert _epoch_of(tmp_path / "best.pth") == 1


def test_the_best_epoch_held_is_written_with_a_later_last_epoch(tmp_path):
    clock, history = Clock(), []
    writer = RunWriter(tmp_path, save_every=10.0, clock=clock)
    _epoch(writer, clock, history, torch.ones(2), 1, best=True)
    _epoch(writer, clock, history, torch.full((2,), 2.0), 2, best=False)
    _epoch(writer, clock, history, torch.full((2,), 3.0), 3, best=False)    # due
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["epoch"] == 1 and torch.equal(best["model_state"]["w"], torch.ones(2))
    assert _epoch_of(tmp_path / "last.pth") == 3


def test_an_interruption_says_where_the_run_goes_on(tmp_path):
    said: list[str] = []
    clock, history = Clock(), []
    writer = RunWriter(tmp_path, save_every=100.0, clock=clock)
    writer.on_exit(KeyboardInterrupt(), echo=said.append)
    assert said == ["interrupted before the first epoch ended: no checkpoint written"]
    assert not (tmp_path / "last.pth").exists()
    _epoch(writer, clock, history, torch.zeros(1), 1)
    _epoch(writer, clock, history, torch.zeros(1), 2)
    writer.on_exit(KeyboardInterrupt(), echo=said.append)
    assert said[1] == (f"interrupted: {tmp_path / 'last.pth'} holds epoch 2; add --resume to "
                       "the same command to continue")
    # another error: the finished epochs are written too, without the line
    _epoch(writer, clock, history, torch.zeros(1), 3)
    writer.on_exit(RuntimeError("diverged"), echo=said.append)
    assert len(said) == 2 and _epoch_of(tmp_path / "last.pth") == 3


def test_the_default_backbone_fits_the_device():
    assert default_backbone("cpu") == "light"
    assert default_backbone("mps") == "light"
    assert default_backbone("cuda") == "resnet50"


def test_progress_where_stderr_is_no_terminal_is_plain_lines(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar = progress_bar(4, desc="extract", unit="clip", quiet=False, every=0.0)
    assert isinstance(bar, PlainProgress)
    with bar:
        for _ in range(4):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and lines[-1].startswith("extract: 100% 4/4 [")
    assert not any("\r" in line or "\x1b" in line for line in lines)
    quiet = progress_bar(4, desc="extract", unit="clip", quiet=True)
    assert quiet.disable


def test_a_line_printed_under_a_live_bar_starts_on_a_line_of_its_own(monkeypatch):
    """A message while a bar is drawn used to land at the end of the bar's line
    ('...| 3/4 [00:02<00:01]Interrupted')."""
    from tqdm import tqdm

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with tqdm(total=4, desc="extract", file=sys.stderr, mininterval=0) as bar:
        bar.update(3)
        with say_around_bars():
            print("skipped a.wav: cannot decode", file=sys.stderr)
        drawn = err.getvalue()
    before = drawn[:drawn.index("skipped")]
    assert "3/4" in before and before.rsplit("\r", 1)[-1].strip() == "", repr(before)
    assert "3/4" in drawn[drawn.index("skipped"):]          # and the bar is drawn again


@pytest.mark.slow
def test_sigterm_mid_run_saves_the_last_finished_epoch_and_resume_goes_on(tiny_features,
                                                                          tmp_path):
    model_dir = tmp_path / "m"
    args = ["train", "--features", tiny_features, "--model-dir", model_dir, "--no-pretrained",
            "--epochs", "60", "--batch-size", "8", "--val-size", "0.2", "--test-size", "0.2",
            "--save-every", "3600"]
    proc = subprocess.Popen(cli_command(*args), env=subprocess_env(PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:             # the plan line, then the epoch table
        lines.append(line)
        if line.startswith("epoch   2 "):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    out = "".join(lines) + out
    assert proc.returncode == 130, err
    assert out.index("training light (auto for cpu)") < out.index("epoch   1 ")
    done = _epoch_of(model_dir / "last.pth")
    assert 2 <= done < 60
    assert f"interrupted: {model_dir / 'last.pth'} holds epoch {done}; add --resume" in out
    assert not list(model_dir.glob(".*.tmp"))
    resumed = subprocess.run(cli_command(*args, "--resume", "--epochs", str(done + 1), "--quiet"),
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {done}" in resumed.stdout
    assert _epoch_of(model_dir / "last.pth") == done + 1
    ckpt = torch.load(model_dir / "best.pth", weights_only=True)
    assert ckpt["model_config"]["backbone"] == "light" and ckpt["epoch"] == done + 1
    assert os.path.getsize(model_dir / "training_history.csv") > 0
