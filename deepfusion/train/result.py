"""What a training run gives back (:class:`TrainResult`) and what each of its checkpoints
holds besides the weights and the epoch (:func:`base_payload`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from deepfusion.config import FeatureConfig, ModelConfig, RuntimeConfig, TrainConfig
from deepfusion.data.splits import split_lists
from deepfusion.inference.clips import ClipPredictions
from deepfusion.io.features_file import FeatureSet
from deepfusion.models.checkpoint import library_versions


@dataclass
class TrainResult:
    """What a training run produced."""

    model_dir: Path
    best_epoch: int
    best_val_acc: float
    epochs_run: int
    seconds: float
    test_acc: Optional[float] = None
    history: list[dict] = field(default_factory=list)
    #: the best checkpoint's outputs on the test clips (None without a test split)
    test_predictions: Optional[ClipPredictions] = None


def base_payload(fs: FeatureSet, features: Path, split: np.ndarray, norm: dict, *,
                  model_config: ModelConfig, feature_config: FeatureConfig, config: TrainConfig,
                  runtime: RuntimeConfig, pretrained_source: str) -> dict[str, Any]:
    """What every checkpoint of a run holds besides its weights and epoch."""
    return {
        "model_config": model_config.to_dict(), "class_names": list(fs.class_names),
        "feature_config": feature_config.to_dict(),
        "normalization": {k: {s: torch.from_numpy(v) for s, v in d.items()} for k, d in norm.items()},
        "split": split_lists(fs, split), "train_config": config.to_dict(),
        "runtime_config": runtime.to_dict(),
        "features_file": str(features.resolve()), "features_sha256": fs.sha256,
        "pretrained_source": pretrained_source, "versions": library_versions(),
    }
