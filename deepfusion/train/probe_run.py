"""train --model probe: the linear-probe baseline fitted and saved in the network's checkpoint
format, so that evaluate, predict and export take either."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from deepfusion.config import FeatureConfig, ModelConfig, RuntimeConfig, TrainConfig
from deepfusion.data.normalize import fit_normalization
from deepfusion.data.splits import split_summary
from deepfusion.inference.clips import clip_loss, predict_clips
from deepfusion.io.features_file import FeatureSet
from deepfusion.models.checkpoint import save_checkpoint
from deepfusion.train.recipe import resolve_recipe
from deepfusion.train.result import TrainResult, base_payload
from deepfusion.train.run_writer import write_log
from deepfusion.views import AUX_KEYS, PRETRAINED_KEY


def train_probe(fs: FeatureSet, features: Path, split: np.ndarray, indices, *,
                 config: TrainConfig, feature_config: FeatureConfig, model_dir: Path,
                 echo: Callable[[str], None], t_start: float,
                 ungrouped: Optional[str] = None) -> TrainResult:
    """Fit the linear probe (logistic regression on time-pooled statistics of the views,
    :mod:`deepfusion.models.probe`) and save it as ``best.pth`` in the network's checkpoint format."""
    from deepfusion.models.probe import fit_probe

    train_idx, val_idx, test_idx = indices
    config = replace(resolve_recipe(config, "light", False), segment_seconds=None, epochs=1,
                     ema=0.0, mixup=0.0, freq_mask=0.0, time_mask=0.0, tilt_db=0.0)
    norm = fit_normalization(fs, train_idx)
    rows = fs.rows()
    model_config = ModelConfig(n_classes=len(fs.class_names), n_mels=rows["mel_spec_orig"],
                               aux_rows=tuple(rows[k] for k in AUX_KEYS), kind="probe",
                               backbone="light", pretrained_view_rows=rows.get(PRETRAINED_KEY, 0))
    echo(split_summary(fs, indices))
    echo(f"model: linear probe (logistic regression, C={config.probe_c:g}) on the mean and "
         "standard deviation over time of every row of the "
         + ("six views and the pretrained view" if fs.has_pretrained else "six views"))
    if ungrouped:
        echo(ungrouped)
    t0 = time.perf_counter()
    model = fit_probe(fs, norm, train_idx, n_mels=model_config.n_mels,
                      aux_rows=model_config.aux_rows,
                      pretrained_view_rows=model_config.pretrained_view_rows, C=config.probe_c,
                      seed=config.seed)
    seg = fs.n_frames
    tr = predict_clips(model, fs, norm, train_idx, seg=seg)
    val = predict_clips(model, fs, norm, val_idx, seg=seg)
    val_acc = float((val.predicted == fs.labels[val_idx]).mean())
    row = {"epoch": 1, "train_loss": round(clip_loss(tr, fs.labels), 6),
           "train_acc": round(float((tr.predicted == fs.labels[train_idx]).mean()), 6),
           "val_loss": round(clip_loss(val, fs.labels), 6), "val_acc": round(val_acc, 6),
           "lr": 0.0, "seconds": round(time.perf_counter() - t0, 2),
           "val_segment_acc": round(val_acc, 6)}
    metrics: dict[str, Any] = {"val": row}
    test, test_acc = None, None
    if len(test_idx):
        test = predict_clips(model, fs, norm, test_idx, seg=seg)
        test_acc = float((test.predicted == fs.labels[test_idx]).mean())
        metrics["test"] = {"clip_acc": test_acc, "n_clips": int(len(test_idx)), "segment_acc": test_acc}
    payload = base_payload(fs, features, split, norm, model_config=model_config,
                            feature_config=feature_config, config=config,
                            runtime=RuntimeConfig(device="cpu", amp=False),
                            pretrained_source="not used")
    save_checkpoint(model_dir / "best.pth", {**payload, "model_state": model.state_dict(),
                                             "epoch": 1, "metrics": metrics})
    write_log(model_dir, [row])
    echo(f"probe: train accuracy {row['train_acc']:.3f}, validation accuracy {val_acc:.3f}")
    if test_acc is not None:
        echo(f"test: clip accuracy {test_acc:.3f} on {len(test_idx)} clips")
    return TrainResult(model_dir, 1, val_acc, 1, time.perf_counter() - t_start, test_acc, [row],
                       test)
