"""Grouped, stratified K-fold cross-validation: every clip tested once, by a model that never
saw its track, its artist (manifest groups) or an identical copy of it.

``train --folds K`` runs :func:`cross_validate`: fold *i* trains into ``model_dir/fold-i/`` on
the other folds (a grouped validation share carved from them, as a normal run does) and is
tested on fold *i*. The per-fold figures go to ``cross_validation.csv`` and every clip's
prediction, exactly once, to ``cross_validation_predictions.csv``. This is GTZAN's 10-fold
protocol and the honest way to measure a small collection.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from deepfusion.config import TrainConfig
from deepfusion.data.splits import make_split
from deepfusion.errors import DatasetError, ParameterError
from deepfusion.io.features_file import load_features
from deepfusion.io.featureset import FeatureSet

FOLD_FIELDS = ("fold", "clips", "clip_accuracy", "balanced_accuracy", "macro_f1", "best_epoch")


def grouped_folds(labels: np.ndarray, groups: np.ndarray, k: int, *, seed: int = 0,
                  names: Optional[list[str]] = None, where: str = "") -> np.ndarray:
    """The fold (0..k-1) of every clip: stratified by genre, each group in one fold.

    Uses scikit-learn's :class:`~sklearn.model_selection.StratifiedGroupKFold` (shuffled,
    seeded). Raises :class:`DatasetError` when there are fewer groups than folds, when no
    genre has ``k`` clips (scikit-learn's condition), or when a fold would leave a genre
    without training clips. ``names``: the genres' names by label; ``where``: the features
    file, named first in those messages.
    """
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    labels, groups = np.asarray(labels), np.asarray(groups)
    prefix = f"{where}: " if where else ""

    def name(label: int) -> str:
        return str(names[label]) if names is not None else str(label)

    if k < 2:
        raise ParameterError(f"--folds {k}: at least 2 folds are needed; give --folds 2 or more")
    n_groups = len(np.unique(groups))
    if n_groups < k:
        raise DatasetError(f"{prefix}--folds {k} needs at least {k} groups of clips (tracks, "
                           f"artists or duplicates), it has {n_groups}; give --folds {n_groups} "
                           "or fewer")
    genres, clips = np.unique(labels, return_counts=True)
    if clips.max() < k:     # scikit-learn refuses: no genre can be spread over k folds
        most = int(np.argmax(clips))
        raise DatasetError(f"{prefix}--folds {k} needs {k} clips of at least one genre, the "
                           f"largest ({name(genres[most])}) has {clips[most]}; give --folds "
                           f"{clips[most]} or fewer")
    fold = np.full(len(labels), -1, np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():   # a genre with fewer clips than folds: some folds lack it
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            fold[test] = f
    for f in range(k):
        left = set(np.unique(labels[fold != f]).tolist())
        lost = sorted(set(np.unique(labels).tolist()) - left)
        if lost:
            genre = "genre" if len(lost) == 1 else "genres"
            raise DatasetError(f"--folds {k}: fold {f + 1} would hold every clip of {genre} "
                               f"{', '.join(map(name, lost))}; give fewer --folds, or add clips "
                               f"of other tracks of {'that genre' if len(lost) == 1 else 'those genres'}")
    return fold


def fold_split(labels: np.ndarray, groups: np.ndarray, fold: np.ndarray, f: int, *,
               val_size: float, seed: int) -> np.ndarray:
    """'test' for fold ``f``; the other clips split into train and a grouped, stratified
    validation share of ``val_size`` of them (at least one group)."""
    split = np.full(len(labels), "test", dtype=object)
    rest = np.flatnonzero(fold != f)
    sub = make_split(labels[rest], groups[rest], val_size=max(val_size, 1e-6), test_size=0.0,
                     seed=seed)
    split[rest] = sub
    return split


@dataclass
class CrossValidation:
    """What :func:`cross_validate` measured."""

    folds: list[dict[str, Any]]            # one row per fold (FOLD_FIELDS)
    predictions: Any                        # pandas DataFrame, one row per clip
    model_dir: Path

    def summary(self, key: str = "clip_accuracy") -> tuple[float, float, float, float]:
        """Mean, standard deviation (ddof 1), min and max over folds."""
        values = np.array([row[key] for row in self.folds], np.float64)
        sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        return float(values.mean()), sd, float(values.min()), float(values.max())

    def table(self) -> str:
        """The folds, their summary and the files written, as aligned text (a legend first)."""
        lines = ["(per fold: its test clips, their clip accuracy, balanced accuracy (mean recall "
                 "over genres) and macro-F1)", "fold  clips  clip acc  balanced acc  macro-F1"]
        for row in self.folds:
            lines.append(f"{row['fold']:4d}  {row['clips']:5d}  {row['clip_accuracy']:8.3f}  "
                         f"{row['balanced_accuracy']:12.3f}  {row['macro_f1']:8.3f}")
        for key, label in (("clip_accuracy", "clip accuracy"),
                           ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1")):
            mean, sd, lo, hi = self.summary(key)
            lines.append(f"{label}: {mean:.3f} +- {sd:.3f} over {len(self.folds)} folds "
                         f"(min {lo:.3f}, max {hi:.3f})")
        lines.append(f"all {len(self.predictions)} clips: accuracy {self.pooled_accuracy:.3f}")
        return "\n".join(lines)

    @property
    def files(self) -> list[Path]:
        """What the run wrote: every fold's run files, then the two tables."""
        from deepfusion.io.run_folder import TRAIN_FILES

        return [self.model_dir / f"fold-{row['fold']}" / name for row in self.folds
                for name in TRAIN_FILES] + [self.model_dir / "cross_validation.csv",
                                            self.model_dir / "cross_validation_predictions.csv"]

    @property
    def pooled_accuracy(self) -> float:
        """Accuracy over all clips (each predicted once, by the model that never saw it)."""
        p = self.predictions
        return float((p["true_genre"] == p["predicted_genre"]).mean())


def cross_validate(features: Path, *, folds: int, model_dir: Path = Path("models"),
                   config: TrainConfig = TrainConfig(), feature_set: Optional[FeatureSet] = None,
                   fold_seed: Optional[int] = None, resume: bool = False, overwrite: bool = False,
                   echo: Callable[[str], None] = print, **train_kwargs: Any) -> CrossValidation:
    """K-fold grouped, stratified cross-validation of a training recipe.

    ``train_kwargs`` go to :func:`deepfusion.train.run.train` (backbone, pretrained, quiet, ...).
    The folds depend on ``fold_seed`` (default ``config.seed``) only, so recipes compared
    with the same seed see the same folds. Writes ``cross_validation.csv`` and
    ``cross_validation_predictions.csv`` into ``model_dir``, which holds one run as
    :func:`deepfusion.train.run.train`'s folder does (``resume`` or ``overwrite`` for a used one).
    """
    import pandas as pd

    from deepfusion.io.atomic import atomic_write
    from deepfusion.io.guard import check_destinations
    from deepfusion.io.run_folder import claim_run_folder, destinations as run_destinations
    from deepfusion.metrics import summary_metrics
    from deepfusion.train.run import train

    features, model_dir = Path(features), Path(model_dir)
    weights = train_kwargs.get("weights_path")
    check_destinations(run_destinations(model_dir, ("cross_validation.csv",
                                                    "cross_validation_predictions.csv")),
                       {features: "the features file",
                        **({Path(weights): "--weights-path"} if weights else {})},
                       overwrite=overwrite or resume,
                       option="--model-dir")
    with claim_run_folder(model_dir, resume=resume, overwrite=overwrite):
        fs = feature_set if feature_set is not None else load_features(features)
        known = fs.labels >= 0
        if not known.all():
            raise DatasetError(f"{features}: {int((~known).sum())} clips have no usable label")
        seed = config.seed if fold_seed is None else fold_seed
        fold = grouped_folds(fs.labels, fs.groups, folds, seed=seed,
                             names=list(fs.class_names), where=str(features))
        rows: list[dict[str, Any]] = []
        tables = []
        n_classes = len(fs.class_names)
        for f in range(folds):
            sub = model_dir / f"fold-{f + 1}"
            split = fold_split(fs.labels, fs.groups, fold, f, val_size=config.val_size, seed=seed)
            echo(f"fold {f + 1}/{folds}: {int((split == 'test').sum())} test clips")
            result = train(features, model_dir=sub, config=replace(config, split_file=None),
                           split=split, feature_set=fs, echo=echo,
                           resume=resume and (sub / "last.pth").is_file(), **train_kwargs)
            pred = result.test_predictions
            truth = fs.labels[pred.clips]
            m = summary_metrics(truth, pred.predicted, n_classes)
            rows.append({"fold": f + 1, "clips": int(len(pred.clips)),
                         "clip_accuracy": round(m["accuracy"], 6),
                         "balanced_accuracy": round(m["balanced_accuracy"], 6),
                         "macro_f1": round(m["macro_f1"], 6), "best_epoch": result.best_epoch})
            probs = pred.probabilities()
            table = pd.DataFrame({"path": [fs.paths[i] for i in pred.clips],
                                  "true_genre": [fs.class_names[c] for c in truth],
                                  "predicted_genre": [fs.class_names[c] for c in pred.predicted]})
            for j, g in enumerate(fs.class_names):
                table[f"p_{g}"] = probs[:, j].round(6)
            table["fold"] = f + 1
            tables.append(table)
        predictions = pd.concat(tables, ignore_index=True)
        with atomic_write(model_dir / "cross_validation.csv", "w") as fh:
            pd.DataFrame(rows, columns=list(FOLD_FIELDS)).to_csv(fh, index=False, lineterminator="\n")
        with atomic_write(model_dir / "cross_validation_predictions.csv", "w") as fh:
            predictions.to_csv(fh, index=False, lineterminator="\n")
        return CrossValidation(rows, predictions, model_dir)
