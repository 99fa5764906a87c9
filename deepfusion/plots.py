"""Every matplotlib figure deepfusion draws (Agg backend, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .fileio import atomic_write  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_write(Path(path)) as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_history(history: Sequence[dict], path: Path) -> None:
    """Loss and accuracy curves, train against validation, one point per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train (segments)")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation (clips)")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], "o-", label="train (segments)")
    ax_acc.plot(epochs, [h["val_acc"] for h in history], "o-", label="validation (clips)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)
