"""The evaluate stage: what a checkpoint does on held-out clips, as a table and report files."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from deepfusion.config import FeatureConfig
from deepfusion.data.splits import read_split_file
from deepfusion.errors import DatasetError, FeaturesFileError
from deepfusion.inference.adapt import adapt as adapt_model, resolve_mode
from deepfusion.io.atomic import atomic_write, check_writable, plural
from deepfusion.io.cache import file_digest
from deepfusion.io.features_file import load_features
from deepfusion.io.featureset import FeatureSet
from deepfusion.io.guard import check_destinations
from deepfusion.io.run_folder import REPORT_FILES, destinations as run_destinations
from deepfusion.metrics import (accuracy_interval, confusion_matrix, per_class_scores,
                                summary_metrics)

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
    ci_method: str = ""                 # how accuracy_ci was computed (Wilson, groups)
    #: what the figures cannot tell (too few clips, too few groups per genre), one line each
    cautions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**(self.info or {}), "split": self.split, "n_clips": self.n_clips,
                "metrics": self.metrics, "accuracy_ci95": list(self.accuracy_ci),
                "accuracy_ci95_method": self.ci_method, "cautions": self.cautions,
                "per_class": self.per_class, "confusion_matrix": self.confusion.tolist(),
                "class_names": self.class_names, "skipped_unknown_labels": self.skipped_labels}

    def table(self) -> str:
        """The report as aligned text."""
        m = self.metrics
        width = max(12, *(len(n) for n in self.class_names))
        lines = [
            f"split {self.split}: {self.n_clips} clips",
            f"clip accuracy      {m['accuracy']:.3f}  (95% CI {self.accuracy_ci[0]:.3f}-"
            f"{self.accuracy_ci[1]:.3f}: {self.ci_method})",
            f"balanced accuracy  {m['balanced_accuracy']:.3f}",
            f"macro-F1           {m['macro_f1']:.3f}",
            f"segment accuracy   {m['segment_accuracy']:.3f}  ({m['n_segments']} segments)",
            "",
            f"{'genre':<{width}}  precision  recall     f1  support",
        ]
        for row in self.per_class:
            lines.append(f"{row['genre']:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  "
                         f"{row['f1']:5.3f}  {row['support']:7d}")
        lines.append("(balanced accuracy: mean recall over genres; segment accuracy: of the "
                     "segments each clip is cut into; precision: of the clips called that "
                     "genre, the share that are; recall: of the genre's clips, the share "
                     "found; support: the genre's clips)")
        return "\n".join(lines)


#: Below these a test set says little, and evaluate says so: clips in all, and groups
#: (artists, albums or tracks; clips when the collection has none) of each genre.
MIN_CLIPS, MIN_GROUPS_PER_GENRE = 30, 5


def reliability_cautions(truth: np.ndarray, groups: np.ndarray, class_names: list[str],
                         group_by: Optional[str]) -> list[str]:
    """What a test set of these clips cannot tell, one line each (empty when it is large and
    varied enough): under :data:`MIN_CLIPS` clips, or a genre with under
    :data:`MIN_GROUPS_PER_GENRE` groups (its accuracy is that of a few artists or tracks)."""
    cautions = []
    if len(truth) < MIN_CLIPS:
        cautions.append(f"only {len(truth)} test clips: one clip moves the accuracy by "
                        f"{1 / max(len(truth), 1):.2f}; read the interval, not the figure")
    what = f"{group_by}s" if group_by else "clips"
    few = []
    for c in sorted(set(truth.tolist())):
        n = len(set(groups[truth == c].tolist()))
        if n < MIN_GROUPS_PER_GENRE:
            few.append(f"{class_names[c]} {n}")
    absent = [g for c, g in enumerate(class_names) if not (truth == c).any()]
    if absent:
        cautions.append(f"no test clip of {', '.join(absent)}: the figures say nothing of "
                        f"{'it' if len(absent) == 1 else 'them'}")
    if few:
        cautions.append(f"few {what} per genre in the test ({', '.join(few)}; under "
                        f"{MIN_GROUPS_PER_GENRE}): each genre's figures are those of a few "
                        f"{what}; evaluate on another collection (--features OTHER.pkl --split all)")
    return cautions


def _select(fs: FeatureSet, saved: Optional[dict], split: str, split_file: Optional[str],
            same_file: bool, *, features: Path, checkpoint: Path) -> np.ndarray:
    """Indices of the clips to evaluate (known labels only; ``saved``: the checkpoint's split)."""
    known = fs.labels >= 0
    if split == "all":
        return np.flatnonzero(known)
    if split_file:
        names = read_split_file(split_file, fs.paths, source=fs.source)
        return np.flatnonzero((names == split) & known)
    if saved["by"] == "index":
        if not same_file:
            raise DatasetError(f"{checkpoint}: its split is recorded by clip index (its features "
                               f"file had no paths), so it does not apply to {features}; give "
                               "--split all, or --split-file FILE")
        chosen = np.zeros(len(fs), bool)
        chosen[np.asarray(saved[split], np.int64)] = True
    else:
        wanted = set(saved[split])
        chosen = np.array([p in wanted for p in fs.paths])
    if not (chosen & known).any():
        raise DatasetError(f"{features}: none of {checkpoint}'s {split} clips is in it; give "
                           f"--split all to evaluate every clip, or --split-file FILE")
    return np.flatnonzero(chosen & known)


def evaluate(checkpoint: Path, *, features: Optional[Path] = None, split: str = "test",
             split_file: Optional[str] = None, out_dir: Optional[Path] = None,
             batch_size: int = 64, device: str = "auto", precision: str = "fp32",
             n_boot: int = 2000, adapt: str = "auto", overwrite: bool = False,
             echo=print, warn=None) -> EvaluationReport:
    """Evaluate a checkpoint on held-out clips and write the report files.

    By default it needs nothing but the checkpoint: the features file and the test split it
    records. ``features`` evaluates another file (cross-collection: clips of genres the model
    does not know are skipped and counted); ``split`` chooses test, val, train or all;
    ``split_file`` imposes another split. Writes into ``out_dir`` (default: the checkpoint's
    folder) evaluation.json, classification_report.csv, predictions.csv,
    confusion_matrix.png and attention.png: an existing file there of another kind is
    refused unless ``overwrite`` (:func:`~deepfusion.io.guard.check_destinations`).

    ``adapt`` (:mod:`deepfusion.inference.adapt`): normalise by the statistics of the collection being
    classified (all clips of the features file, labels unused): ``inputs`` (the views'),
    ``full`` (and the model's own: BatchNorm's, or the probe's), ``none``; ``auto`` (default)
    is ``full`` for another features file than the training one with at least
    :data:`deepfusion.config.ADAPT_MIN_CLIPS` clips, else ``none``.

    ``echo`` says what it does; ``warn`` (default: a line on stderr) the clips it leaves out.

    ``precision``: fp32 (default) classifies in float32 whatever the training run used, so
    the same checkpoint gives the same answer on every machine and train's stored test
    accuracy is reproduced; amp uses autocast where the device computes it natively
    (:func:`~deepfusion.runtime.device.inference_precision`). evaluation.json records the device and
    the precision used.

    Raises
    ------
    CheckpointError, FeaturesFileError, DatasetError, ParameterError
        Before any work: bad checkpoint, features that do not fit, an empty selection, a
        device this machine does not have (:class:`~deepfusion.errors.DeviceError`).
    DeviceMemoryError
        The device ran out of memory (one line: use a smaller ``batch_size``).
    """
    import json

    if warn is None:   # problem lines go to stderr, never among the results on stdout
        def warn(message: str) -> None:
            print(message, file=sys.stderr)
    checkpoint = Path(checkpoint)
    if device in ("auto", "cpu"):       # no device to refuse (else that comes first):
        from deepfusion.models.meta import check_checkpoint_path

        check_checkpoint_path(checkpoint)   # a mistyped path costs no torch import (seconds)
    from deepfusion.inference.clips import predict_clips
    from deepfusion.models.checkpoint import read_checkpoint
    from deepfusion.runtime.device import inference_precision, resolve_device
    from deepfusion.runtime.memory import memory_guard

    dev = resolve_device(device)        # a device this machine lacks: one line, before any work
    used = inference_precision(dev, precision)
    ckpt = read_checkpoint(checkpoint)
    out_dir = Path(out_dir) if out_dir is not None else checkpoint.parent
    check_writable(out_dir / "evaluation.json")
    if features is None:
        features = Path(ckpt.features_file)
        if not features.exists():
            raise FeaturesFileError(f"{features}: features file not found (the one {checkpoint} "
                                    "was trained on); give --features")
    features = Path(features)
    check_destinations(run_destinations(out_dir, REPORT_FILES),
                       {checkpoint: "the checkpoint", features: "the features file",
                        **({Path(split_file): "the --split-file"} if split_file else {})},
                       overwrite=overwrite, option="--out-dir")
    class_names = list(ckpt.class_names)
    fs = load_features(features, class_names=class_names)
    trained = ckpt.feature_config
    if fs.feature_config:
        here = FeatureConfig.from_dict(fs.feature_config)
        # clip lengths change how many segments a clip has, not what a segment holds
        if replace(here, duration=trained.duration, min_duration=trained.min_duration) != trained:
            diff = replace(here, duration=trained.duration, min_duration=trained.min_duration
                           ).differences_text(trained, there="for the model")
            raise FeaturesFileError(f"{features}: extracted with other settings than {checkpoint} "
                                    f"({diff}); extract it with the model's settings")
    rows = fs.rows()
    expected = ckpt.rows
    wrong = [f"{k} has {rows.get(k, 0)} rows, the model expects {expected[k]}"
             for k in expected if rows.get(k, 0) != expected[k]]
    if wrong:
        raise FeaturesFileError(f"{features}: features do not fit the model: {'; '.join(wrong)}")
    features_sha = fs.sha256
    same_file = features_sha == ckpt.features_sha256

    unknown: dict[str, int] = {}
    for name, label in zip(fs.label_names, fs.labels):
        if label < 0:
            unknown[name] = unknown.get(name, 0) + 1
    if unknown:
        warn(f"warning: {plural(int((fs.labels < 0).sum()), 'clip')} left out, of genres "
             f"{checkpoint} does not know: "
             + ", ".join(f"{k} ({v})" for k, v in sorted(unknown.items())))
    idx = _select(fs, ckpt.split, split, split_file, same_file, features=features,
                  checkpoint=checkpoint)
    if len(idx) == 0:
        raise DatasetError(f"{features}: no clip with a genre the model knows in split {split!r}; "
                           f"the model knows {', '.join(class_names)}")

    seg = ckpt.segment_frames_for(fs.n_frames)
    adapted = resolve_mode(adapt, n_clips=len(fs), new_collection=not same_file)
    if adapted != "none":
        echo(f"adapting to {features.name} ({adapted}): normalisation statistics of its "
             f"{len(fs)} clips, no labels (--adapt none: the training statistics)")
    with memory_guard(dev, batch_size=batch_size, training=False):
        model = ckpt.build_model().to(dev)
        model, norm = adapt_model(model, fs, ckpt.normalization, np.arange(len(fs)),
                                  mode=adapted, seg=seg, device=dev)
        pred = predict_clips(model, fs, norm, idx, seg=seg,
                             batch_size=batch_size, device=dev, amp=used)
    truth, guess = fs.labels[idx], pred.predicted
    n_classes = len(class_names)
    metrics = summary_metrics(truth, guess, n_classes)
    metrics["segment_accuracy"] = pred.segment_correct / max(pred.segment_total, 1)
    metrics["n_segments"] = pred.segment_total
    grouped = fs.groups[idx] if fs.group_by else None     # only identical audio is grouped else
    *ci, ci_method = accuracy_interval(truth == guess, grouped, n_boot=n_boot)
    cautions = reliability_cautions(truth, fs.groups[idx], class_names, fs.group_by)
    cm = confusion_matrix(truth, guess, n_classes)
    scores = per_class_scores(cm)
    per_class = [{"genre": g, "precision": float(scores["precision"][i]), "recall": float(scores["recall"][i]),
                  "f1": float(scores["f1"][i]), "support": int(scores["support"][i])}
                 for i, g in enumerate(class_names)]
    info = {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": file_digest(checkpoint),
            "features_file": str(features.resolve()), "features_sha256": features_sha,
            "split_source": split_file or ("checkpoint" if split != "all" else "all clips"),
            "device": str(dev), "precision": used, "adapt": adapted,
            "clips": [fs.paths[i] for i in idx]}
    report = EvaluationReport(split, len(idx), metrics, tuple(ci), per_class, cm, class_names, unknown,
                              out_dir, info, ci_method, cautions)

    import pandas as pd  # here: a refused run never waits for pandas and matplotlib

    from deepfusion.plots import plot_attention, plot_confusion

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
