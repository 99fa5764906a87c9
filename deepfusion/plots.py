"""Every matplotlib figure deepfusion draws (Agg backend, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from deepfusion.io.atomic import atomic_write  # noqa: E402


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


def plot_confusion(cm, class_names: Sequence[str], path: Path, *, title: str = "") -> None:
    """Confusion matrix as counts and row-normalised, genre names on both axes."""
    import numpy as np

    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    n = len(class_names)
    size = max(4.5, 0.55 * n + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.5, size), layout="constrained")
    for ax, data, fmt, label in ((axes[0], cm, "d", "counts"), (axes[1], norm, ".2f", "row-normalised")):
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), class_names, rotation=45, ha="right")
        ax.set_yticks(range(n), class_names)
        ax.set(xlabel="predicted genre", ylabel="true genre", title=label)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, format(data[i, j], fmt), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=axes, fraction=0.025)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_attention(attention, labels, class_names: Sequence[str], path: Path) -> None:
    """Mean modality attention per true genre: which of the inputs (six views, or seven with
    the pretrained one: the attention's columns) each genre leans on."""
    import numpy as np

    from deepfusion.views import ALL_KEYS

    attention, labels = np.asarray(attention), np.asarray(labels)
    keys = ALL_KEYS[:attention.shape[1]]
    present = [i for i in range(len(class_names)) if (labels == i).any()]
    mean = np.array([attention[labels == i].mean(axis=0) for i in present])
    names = [class_names[i] for i in present]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 2))
    im = ax.imshow(mean, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(keys)), [k.replace("mel_spec_", "mel ") for k in keys],
                  rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(keys)):
            # attention sits near 1/M everywhere, so judge darkness on the colour scale
            # (viridis is dark at its low end), not against the largest value
            ax.text(j, i, f"{mean[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if im.norm(mean[i, j]) < 0.5 else "black")
    ax.set(title="mean modality attention per genre", xlabel="modality", ylabel="true genre")
    fig.colorbar(im, ax=ax, fraction=0.04)
    _save(fig, path)
