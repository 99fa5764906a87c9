"""Pure numpy metrics of clip predictions: no torch, no files."""

from __future__ import annotations

from typing import Optional

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``logits`` [shape=(n, n_classes)]."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_loss(probabilities: np.ndarray, truth: np.ndarray) -> float:
    """Mean cross-entropy of ``probabilities`` [shape=(n, n_classes)] against ``truth`` (n,)."""
    p = probabilities[np.arange(len(truth)), truth]
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]``, shape (n_classes, n_classes)."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (truth, predicted), 1)
    return cm


def per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix.

    A class never predicted has precision 0 (and F1 0), as does a class without support.
    """
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def summary_metrics(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over classes present) and macro-F1 (same classes)."""
    cm = confusion_matrix(truth, predicted, n_classes)
    scores = per_class_scores(cm)
    present = scores["support"] > 0
    return {"accuracy": float((truth == predicted).mean()) if len(truth) else float("nan"),
            "balanced_accuracy": float(scores["recall"][present].mean()),
            "macro_f1": float(scores["f1"][present].mean())}


def bootstrap_interval(correct: np.ndarray, *, n_boot: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``correct`` (0/1 per clip)."""
    correct = np.asarray(correct, np.float64)
    if len(correct) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(n_boot, len(correct)))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def wilson_interval(successes: float, n: float, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (``n`` may be an effective
    count): unlike the normal or the percentile-bootstrap interval, it does not collapse to a
    point at 0 or 1 for a small ``n`` (8 of 8 right: 0.68-1.00)."""
    from statistics import NormalDist

    if n <= 0:
        return float("nan"), float("nan")
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def accuracy_interval(correct: np.ndarray, groups: Optional[np.ndarray] = None, *,
                      n_boot: int = 2000, level: float = 0.95, seed: int = 0
                      ) -> tuple[float, float, str]:
    """A confidence interval of an accuracy that stays honest when the clips are few or come
    in groups (excerpts of one track, one artist: they are right or wrong together).

    Without groups (or all of one clip): the Wilson interval over the clips. With groups: the
    union of the Wilson interval over the groups (the effective number of independent
    observations) and a percentile bootstrap that resamples whole groups. Returns ``(low,
    high, how)``, ``how`` saying which (for the report).
    """
    correct = np.asarray(correct, np.float64)
    n = len(correct)
    if n == 0:
        return float("nan"), float("nan"), "no clips"
    p = float(correct.mean())
    if groups is None:
        low, high = wilson_interval(p * n, n, level=level)
        return low, high, f"Wilson, {n} clips"
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(inverse.max()) + 1
    if n_groups == n:
        low, high = wilson_interval(p * n, n, level=level)
        return low, high, f"Wilson, {n} clips"
    low, high = wilson_interval(p * n_groups, n_groups, level=level)
    right = np.bincount(inverse, weights=correct, minlength=n_groups)
    size = np.bincount(inverse, minlength=n_groups).astype(np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_groups, size=(n_boot, n_groups))
    means = right[picks].sum(axis=1) / size[picks].sum(axis=1)
    alpha = (1 - level) / 2
    b_low, b_high = np.quantile(means, [alpha, 1 - alpha])
    return (min(low, float(b_low)), max(high, float(b_high)),
            f"Wilson over {n_groups} groups and a bootstrap of whole groups")
