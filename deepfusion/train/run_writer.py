"""When a training run's files are written: the checkpoints on a time budget, the log every epoch.

``best.pth`` and ``last.pth`` of a large model are big (a ResNet-50 run's ``last.pth``, with
AdamW's two moments per weight, is about 0.9 GB): written after every epoch they cost tens of
GB of writes a run. :class:`RunWriter` writes them when ``save_every`` seconds have passed
since its last write, after the run's final epoch, and when the run is interrupted (Ctrl-C;
the CLI turns SIGTERM into the same). Between writes it holds the newest finished epoch's
states as a CPU copy, so an interruption saves the last finished epoch and a ``kill -9`` loses
at most ``save_every`` seconds of training. Every write is atomic (best first, then last: a
kill between the two leaves a ``last.pth`` whose record of the best epoch is older, which
resume reads). ``training_history.csv`` is small and rewritten after every epoch, its plot
``training_history.png`` with the checkpoints (drawing it costs about as much as an epoch of
the light model on a small collection); a resumed run rewrites both from ``last.pth``'s history.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from deepfusion.io.atomic import write_csv
from deepfusion.models.checkpoint import save_checkpoint, to_cpu

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds",
                  "val_segment_acc")


def write_log(model_dir: Path, history: list[dict], *, plot: bool = True) -> None:
    """``training_history.csv`` of ``history``, and (``plot``) ``training_history.png``."""
    write_csv(model_dir / "training_history.csv", HISTORY_FIELDS,
              ([row[k] for k in HISTORY_FIELDS] for row in history))
    if plot:
        from deepfusion.plots import plot_history

        plot_history(history, model_dir / "training_history.png")


class RunWriter:
    """The files of one run in ``model_dir`` (rank 0's; see the module docstring)."""

    def __init__(self, model_dir: Path, save_every: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model_dir, self.save_every, self._clock = Path(model_dir), float(save_every), clock
        self._written_at = clock()
        self._best: Optional[dict] = None   # payloads not yet on disk
        self._last: Optional[dict] = None
        #: the epoch the ``last.pth`` on disk holds (None: none written by this run)
        self.saved_epoch: Optional[int] = None

    def epoch_done(self, history: list[dict], *, best: Optional[dict], last: dict,
                   final: bool) -> bool:
        """After an epoch: the log now; the checkpoints now when they are due (``final``, or
        ``save_every`` seconds since the last write), else a copy is held. ``best``: the
        epoch's payload for ``best.pth`` when it becomes the best one. Returns whether the
        checkpoints were written."""
        due = final or self._clock() - self._written_at >= self.save_every
        if best is not None:
            self._best = best if due else to_cpu(best, copy=True)
        self._last = last if due else to_cpu(last, copy=True)
        if due:
            self.flush()
        write_log(self.model_dir, history, plot=due)
        return due

    def flush(self) -> Optional[int]:
        """Write what is held (best first, then last); returns the epoch ``last.pth`` holds.
        What is held is let go first: a write that fails (a full disk) is not tried again on
        the way out."""
        best, last, self._best, self._last = self._best, self._last, None, None
        if best is not None:
            save_checkpoint(self.model_dir / "best.pth", best)
        if last is not None:
            save_checkpoint(self.model_dir / "last.pth", last)
            self.saved_epoch = int(last["epoch"])
        self._written_at = self._clock()
        return self.saved_epoch

    def on_exit(self, exc: BaseException, echo: Callable[[str], None],
                history: Optional[list[dict]] = None) -> None:
        """The run ends with ``exc`` (an interruption, an error) between checkpoint writes: the
        finished epochs held are written (and the plot of ``history``), and an interruption
        says where the run can go on."""
        try:
            saved = self.flush()   # what is held, if anything; the epoch on disk
            if history:
                write_log(self.model_dir, history)
        except Exception:   # noqa: BLE001 - a failed save must not hide why the run ended
            if not isinstance(exc, KeyboardInterrupt):
                return
            raise
        if isinstance(exc, KeyboardInterrupt):
            echo(f"interrupted: {self.model_dir / 'last.pth'} holds epoch {saved}; add --resume "
                 "to the same command to continue" if saved is not None else
                 "interrupted before the first epoch ended: no checkpoint written")

    @property
    def pending(self) -> bool:
        """Whether finished epochs are held that are not on disk yet."""
        return self._last is not None
