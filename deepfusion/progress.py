"""Progress: the one bar style of every stage (tqdm on stderr, silent when not a terminal),
and the time estimates train prints."""

from __future__ import annotations

import sys


def progress_bar(total: int, *, desc: str, unit: str, quiet: bool, leave: bool = True):
    """A tqdm bar showing count, rate and ETA; disabled with ``quiet`` or a non-terminal stderr."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, smoothing=0.1,
                dynamic_ncols=True, disable=quiet or not sys.stderr.isatty())


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def epoch_estimate(batch_ends: list[float], n_batches: int, n_val_segments: int,
                   batch_size: int) -> float:
    """Seconds one epoch will take, from the end times of its first training batches.

    The first batch pays for warm-up (oneDNN builds its kernels; about 10x a later batch for
    resnet50 in bf16 here), so the rate comes from the batches after it when there are any.
    A validation segment is counted as 0.25 of a training sample: inference has no backward
    pass (``benchmarks/train_speed.py``: 0.21-0.36 of a training step's time per sample).
    """
    if len(batch_ends) > 1:
        per_batch = (batch_ends[-1] - batch_ends[0]) / (len(batch_ends) - 1)
    else:
        per_batch = batch_ends[0]
    return per_batch * (n_batches + 0.25 * n_val_segments / batch_size)


def epoch_legend(select: str) -> str:
    """The line before train's epoch table: what its columns and its ``*`` mean."""
    chosen = {"val_acc": "accuracy", "val_loss": "loss"}.get(select)
    star = (f"* = best validation {chosen} so far, saved as best.pth" if chosen
            else "* = saved as best.pth (the last epoch's model)")
    return ("(per epoch: loss and clip accuracy on the training and validation clips, segment "
            f"accuracy on validation, seconds; {star})")
