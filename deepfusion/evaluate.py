"""Running a model over clips, and the metrics reported on them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .data import FeatureSet, eval_segments, make_torch_dataset


@dataclass
class ClipPredictions:
    """Per-clip outputs of a model over all non-overlapping segments of each clip."""

    clips: np.ndarray           # (n,) clip indices into the FeatureSet
    logits: np.ndarray          # (n, n_classes) mean of segment logits
    attention: np.ndarray       # (n, 6) mean modality attention
    segment_correct: int
    segment_total: int

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    def probabilities(self) -> np.ndarray:
        z = self.logits - self.logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def autocast_dtype(device: torch.device) -> Optional[str]:
    """The reduced precision deepfusion uses on ``device``: bf16 on CPUs and recent GPUs,
    fp16 on older GPUs, none on MPS."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" else None


def autocast_for(device: torch.device, enabled: bool):
    """The autocast context deepfusion uses on ``device`` (see :func:`autocast_dtype`)."""
    import contextlib

    name = autocast_dtype(device) if enabled else None
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if name == "bf16" else torch.float16)


@torch.inference_mode()
def predict_clips(model: torch.nn.Module, fs: FeatureSet, norm: dict, clips: np.ndarray, *,
                  seg: int, batch_size: int = 64, device: torch.device = torch.device("cpu"),
                  amp: bool = False, labels: Optional[np.ndarray] = None) -> ClipPredictions:
    """Mean logits and attention over all non-overlapping segments of each clip.

    ``labels`` (default the FeatureSet's) only serve the segment-level accuracy.
    """
    labels = fs.labels if labels is None else labels
    seg_clips, starts = eval_segments(clips, fs.n_frames, seg)
    ds = make_torch_dataset(fs, norm, seg_clips, seg=seg, starts=starts)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    position = {int(c): i for i, c in enumerate(clips)}
    n_classes = model.classifier.out_features
    logit_sum = np.zeros((len(clips), n_classes), np.float64)
    att_sum = np.zeros((len(clips), 6), np.float64)
    count = np.zeros(len(clips), np.int64)
    correct = total = 0
    model.eval()
    for x, _, c in loader:
        x = {k: v.to(device, non_blocking=True) for k, v in x.items()}
        with autocast_for(device, amp):
            out = model(x)
        logits = out["logits"].float().cpu().numpy()
        att = out["attention"].float().cpu().numpy()
        rows = np.array([position[int(i)] for i in c])
        np.add.at(logit_sum, rows, logits)
        np.add.at(att_sum, rows, att)
        np.add.at(count, rows, 1)
        truth = labels[c.numpy()]
        known = truth >= 0
        correct += int((logits.argmax(1)[known] == truth[known]).sum())
        total += int(known.sum())
    count = np.maximum(count, 1)[:, None]
    return ClipPredictions(np.asarray(clips), (logit_sum / count).astype(np.float32),
                           (att_sum / count).astype(np.float32), correct, total)


def clip_loss(pred: ClipPredictions, labels: np.ndarray) -> float:
    """Cross-entropy of the mean clip logits."""
    p = pred.probabilities()
    truth = labels[pred.clips]
    return float(-np.log(np.clip(p[np.arange(len(truth)), truth], 1e-12, None)).mean())


# ------------------------------------------------------------------------------------ metrics

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


# --------------------------------------------------------------------------- the evaluate stage

@dataclass
class EvaluationReport:
    """Everything ``evaluate`` measured; ``to_dict`` is what evaluation.json holds."""

    split: str
    n_clips: int
    metrics: dict[str, float]
    accuracy_ci: tuple[float, float]
    per_class: list[dict]
    confusion: np.ndarray
    class_names: list[str]
    skipped_labels: dict[str, int]
    out_dir: Optional[Path] = None
    info: Optional[dict] = None

    def to_dict(self) -> dict:
        return {**(self.info or {}), "split": self.split, "n_clips": self.n_clips,
                "metrics": self.metrics, "accuracy_ci95": list(self.accuracy_ci),
                "per_class": self.per_class, "confusion_matrix": self.confusion.tolist(),
                "class_names": self.class_names, "skipped_unknown_labels": self.skipped_labels}

    def table(self) -> str:
        """The report as aligned text."""
        m = self.metrics
        width = max(12, *(len(n) for n in self.class_names))
        lines = [
            f"split {self.split}: {self.n_clips} clips",
            f"clip accuracy      {m['accuracy']:.3f}  (95% bootstrap CI {self.accuracy_ci[0]:.3f}-{self.accuracy_ci[1]:.3f})",
            f"balanced accuracy  {m['balanced_accuracy']:.3f}",
            f"macro-F1           {m['macro_f1']:.3f}",
            f"segment accuracy   {m['segment_accuracy']:.3f}  ({m['n_segments']} segments)",
            "",
            f"{'genre':<{width}}  precision  recall     f1  support",
        ]
        for row in self.per_class:
            lines.append(f"{row['genre']:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  "
                         f"{row['f1']:5.3f}  {row['support']:7d}")
        return "\n".join(lines)


def _select(fs: FeatureSet, ckpt: dict, split: str, split_file: Optional[str], same_file: bool) -> np.ndarray:
    """Indices of the clips to evaluate (known labels only)."""
    from .data import read_split_file
    from .errors import DatasetError

    known = fs.labels >= 0
    if split == "all":
        return np.flatnonzero(known)
    if split_file:
        names = read_split_file(split_file, fs.paths)
        return np.flatnonzero((names == split) & known)
    saved = ckpt["split"]
    if saved["by"] == "index":
        if not same_file:
            raise DatasetError("the checkpoint's split is recorded by clip index (its features file had "
                               "no paths): evaluate its own features file, or use --split all / --split-file")
        chosen = np.zeros(len(fs), bool)
        chosen[np.asarray(saved[split], np.int64)] = True
    else:
        wanted = set(saved[split])
        chosen = np.array([p in wanted for p in fs.paths])
    if not (chosen & known).any():
        raise DatasetError(f"no clip of the checkpoint's {split} split is in this features file; "
                           "use --split all for another collection, or --split-file")
    return np.flatnonzero(chosen & known)


def evaluate(checkpoint: Path, *, features: Optional[Path] = None, split: str = "test",
             split_file: Optional[str] = None, out_dir: Optional[Path] = None,
             batch_size: int = 64, device: str = "auto", n_boot: int = 2000,
             echo=print) -> EvaluationReport:
    """Evaluate a checkpoint on held-out clips and write the report files.

    By default it needs nothing but the checkpoint: the features file and the test split it
    records. ``features`` evaluates another file (cross-collection: clips of genres the model
    does not know are skipped and counted); ``split`` chooses test, val, train or all;
    ``split_file`` imposes another split. Writes into ``out_dir`` (default: the checkpoint's
    folder) evaluation.json, classification_report.csv, predictions.csv,
    confusion_matrix.png and attention.png.
    """
    import json

    import pandas as pd

    from .cache import file_digest
    from .checkpoint import load_checkpoint, model_from_checkpoint, normalization_of
    from .config import AUX_KEYS, MEL_KEYS, FeatureConfig, TrainConfig
    from .data import load_features, segment_frames
    from .errors import DatasetError, FeaturesFileError
    from .fileio import atomic_write, check_writable
    from .plots import plot_attention, plot_confusion
    from .train import resolve_device, use_amp

    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    out_dir = Path(out_dir) if out_dir is not None else checkpoint.parent
    check_writable(out_dir / "evaluation.json")
    features = Path(features) if features is not None else Path(ckpt["features_file"])
    class_names = list(ckpt["class_names"])
    fs = load_features(features, class_names=class_names)
    rows = fs.rows()
    mc = ckpt["model_config"]
    expected = {**{k: mc["n_mels"] for k in MEL_KEYS}, **dict(zip(AUX_KEYS, mc["aux_rows"]))}
    wrong = [f"{k} has {rows[k]} rows, the model expects {expected[k]}" for k in expected if rows[k] != expected[k]]
    if wrong:
        raise FeaturesFileError(f"{features}: features do not fit the model: {'; '.join(wrong)}")
    if fs.feature_config and fs.feature_config != ckpt["feature_config"]:
        echo(f"warning: {features} was extracted with other feature settings than the model was trained on")
    features_sha = fs.sha256
    same_file = features_sha == ckpt.get("features_sha256")

    unknown: dict[str, int] = {}
    for name, label in zip(fs.label_names, fs.labels):
        if label < 0:
            unknown[name] = unknown.get(name, 0) + 1
    if unknown:
        echo(f"skipped {int((fs.labels < 0).sum())} clips of genres the model does not know: "
             + ", ".join(f"{k} ({v})" for k, v in sorted(unknown.items())))
    idx = _select(fs, ckpt, split, split_file, same_file)
    if len(idx) == 0:
        raise DatasetError(f"{features}: no clip with a genre the model knows in split {split!r}")

    train_config = TrainConfig.from_dict(ckpt["train_config"])
    dev = resolve_device(device)
    seg = segment_frames(train_config.segment_seconds, FeatureConfig.from_dict(ckpt["feature_config"]), fs.n_frames)
    model = model_from_checkpoint(ckpt).to(dev)
    pred = predict_clips(model, fs, normalization_of(ckpt), idx, seg=seg, batch_size=batch_size,
                         device=dev, amp=use_amp(train_config, dev))
    truth, guess = fs.labels[idx], pred.predicted
    n_classes = len(class_names)
    metrics = summary_metrics(truth, guess, n_classes)
    metrics["segment_accuracy"] = pred.segment_correct / max(pred.segment_total, 1)
    metrics["n_segments"] = pred.segment_total
    ci = bootstrap_interval(truth == guess, n_boot=n_boot)
    cm = confusion_matrix(truth, guess, n_classes)
    scores = per_class_scores(cm)
    per_class = [{"genre": g, "precision": float(scores["precision"][i]), "recall": float(scores["recall"][i]),
                  "f1": float(scores["f1"][i]), "support": int(scores["support"][i])}
                 for i, g in enumerate(class_names)]
    info = {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": file_digest(checkpoint),
            "features_file": str(features.resolve()), "features_sha256": features_sha,
            "split_source": split_file or ("checkpoint" if split != "all" else "all clips"),
            "clips": [fs.paths[i] for i in idx]}
    report = EvaluationReport(split, len(idx), metrics, ci, per_class, cm, class_names, unknown, out_dir, info)

    with atomic_write(out_dir / "evaluation.json", "w") as fh:
        json.dump(report.to_dict(), fh, indent=2)
    with atomic_write(out_dir / "classification_report.csv", "w") as fh:
        pd.DataFrame(per_class).to_csv(fh, index=False, lineterminator="\n")
    probs = pred.probabilities()
    table = pd.DataFrame({"path": [fs.paths[i] for i in idx],
                          "true_genre": [fs.label_names[i] for i in idx],
                          "predicted_genre": [class_names[j] for j in guess]})
    for j, g in enumerate(class_names):
        table[f"p_{g}"] = probs[:, j].round(6)
    with atomic_write(out_dir / "predictions.csv", "w") as fh:
        table.to_csv(fh, index=False, lineterminator="\n")
    plot_confusion(cm, class_names, out_dir / "confusion_matrix.png",
                   title=f"{split} split: {len(idx)} clips, accuracy {metrics['accuracy']:.3f}")
    plot_attention(pred.attention, truth, class_names, out_dir / "attention.png")
    return report
