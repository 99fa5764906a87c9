"""Pure numpy metrics of clip predictions: no torch, no files."""

from __future__ import annotations

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
