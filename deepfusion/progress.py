"""Progress: the one bar style of every stage, and the time estimates train prints.

On a terminal the bar is tqdm's, on stderr; lines printed while it is live go through
:func:`say_around_bars` so that they never land on the bar's line. When stderr is not a
terminal (a CI log, a file, a pipe) there is no bar; a long task writes a plain line with
tqdm's counters instead, every :data:`PLAIN_EVERY` seconds.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterator

#: Seconds between the plain progress lines written where stderr is not a terminal.
PLAIN_EVERY = 60.0


def progress_bar(total: int, *, desc: str, unit: str, quiet: bool, leave: bool = True,
                 every: float = PLAIN_EVERY):
    """A tqdm bar showing count, rate and ETA on a terminal; :class:`PlainProgress` lines
    when stderr is not one; nothing with ``quiet``."""
    if not quiet and not sys.stderr.isatty():
        return PlainProgress(total, desc=desc, unit=unit, every=every)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, smoothing=0.1,
                dynamic_ncols=True, disable=quiet, file=sys.stderr)


class PlainProgress:
    """The bar's interface for a stderr that is no terminal: every ``every`` seconds (none
    for a task that ends sooner) one line of tqdm's own meter, e.g. ``extract: 40/80 clips
    [00:12<00:12, 3.3 clips/s]``."""

    disable = False

    def __init__(self, total: int, *, desc: str, unit: str, every: float) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n, self.postfix = 0, ""
        self._start = self._shown = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._shown >= self.every:
            self._shown = now
            from tqdm import tqdm

            line = tqdm.format_meter(self.n, self.total, now - self._start, prefix=self.desc,
                                     unit=self.unit, postfix=self.postfix or None, ncols=0)
            print(line, file=sys.stderr, flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        pass

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def say_around_bars() -> Iterator[None]:
    """Clear the live bars (if tqdm runs any) while a line is printed, then draw them again."""
    tqdm_module = sys.modules.get("tqdm")   # no bar was ever made without it: nothing to clear
    if tqdm_module is None:
        yield
        return
    with tqdm_module.tqdm.external_write_mode(file=sys.stderr):
        yield


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def epoch_seconds(step: float, n_batches: int, n_val_segments: int, batch_size: int) -> float:
    """Seconds one epoch will take at ``step`` seconds per training batch. A validation
    segment is counted as 0.25 of a training sample: inference has no backward pass
    (``benchmarks/train_speed.py``: 0.21-0.36 of a training step's time per sample)."""
    return step * (n_batches + 0.25 * n_val_segments / batch_size)


def plan_line(model: str, config: Any, *, auto: list[str], parameters: int, where: str,
              batches: int, epochs: tuple[int, int], segment_seconds: float, step: float,
              total: float) -> str:
    """The line train prints before its first epoch: what will run, and about how long.

    ``config``: the resolved :class:`~deepfusion.config.TrainConfig`; ``auto``: which of its
    fields were filled per backbone; ``epochs``: the first and last epoch to run;
    ``step``: seconds per training batch, timed; ``total``: the run's estimated seconds."""
    first, last = epochs
    span = f"{last - first + 1} epochs" + (f" ({first}-{last} of {config.epochs})" if first > 1
                                           else "")
    stop = ("no early stop" if config.patience >= config.epochs else
            f"early stop after {config.patience} epochs without a better validation "
            + ("accuracy" if config.select == "val_acc" else "loss"))
    made = f"; {', '.join(f.replace('_', ' ') for f in auto)} auto for this backbone" if auto \
        else ""
    return (f"training {model}, {parameters / 1e6:.2f} M parameters, on {where}: {span} of "
            f"{batches} batch{'es' if batches != 1 else ''} of {config.batch_size} segments of "
            f"{segment_seconds:.3g} s, lr {config.lr:g}, {stop}{made}; about "
            f"{duration_text(total)} ({step:.2f} s a batch, timed before the first epoch)")


def epoch_legend(select: str, save_every: float = 0.0) -> str:
    """The line before train's epoch table: what its columns and its ``*`` mean, and when the
    checkpoints are written."""
    chosen = {"val_acc": "accuracy", "val_loss": "loss"}.get(select)
    star = (f"* = best validation {chosen} so far: best.pth's weights" if chosen
            else "* = best.pth's weights (the last epoch's)")
    when = (f"every {duration_text(save_every)} of training, " if save_every > 0
            else "after every epoch, ")
    return ("(per epoch: loss and clip accuracy on the training and validation clips, segment "
            f"accuracy on validation, seconds; {star}; best.pth and last.pth are written "
            f"{when}at the end and when interrupted)")
