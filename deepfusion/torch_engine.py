"""A checkpoint as an engine for predict and embed: windows of features in, outputs out.

:class:`TorchEngine` and :class:`deepfusion.onnx_engine.OnnxEngine` answer the same question
(``window_outputs``) from the same un-normalised views, so the library commands do not care
which one runs. Windows are classified through :func:`deepfusion.inference.predict_clips`,
as train and evaluate classify clips: every non-overlapping segment, outputs averaged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import feature_config_of, load_checkpoint, model_from_checkpoint, normalization_of
from .config import TrainConfig
from .data import segment_frames
from .inference import predict_clips
from .io.featureset import FeatureSet
from .runtime import inference_precision, resolve_device


class TorchEngine:
    """A ``best.pth`` loaded once, classifying windows on ``device`` in ``precision``
    (``fp32``, or ``amp``: see :func:`deepfusion.runtime.inference_precision`)."""

    kind = "torch"

    def __init__(self, checkpoint: Path, *, device: str = "auto", batch_size: int = 64,
                 precision: str = "fp32"):
        self.path = Path(checkpoint)
        self.ckpt = load_checkpoint(self.path)
        self.class_names = list(self.ckpt["class_names"])
        self.feature_config = feature_config_of(self.ckpt)
        self.norm = normalization_of(self.ckpt)
        train_config = TrainConfig.from_dict(self.ckpt["train_config"])
        self.segment_frames = segment_frames(train_config.segment_seconds, self.feature_config,
                                             self.feature_config.n_frames)
        self.device = resolve_device(device)
        # float32 unless asked, whatever the training run used: the same file gives the same
        # answer on every machine (mixed precision would move borderline files)
        self.precision = inference_precision(self.device, precision)
        self.model = model_from_checkpoint(self.ckpt).to(self.device)
        if self.device.type != "mps":   # as train runs it (faster CNNs on CPUs and GPUs)
            self.model.to(memory_format=torch.channels_last)
        self.embedding_dim = int(self.model.classifier.in_features)
        self.batch_size = batch_size

    def window_outputs(self, views: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per window, the mean over its non-overlapping segments of the model's outputs.

        Parameters
        ----------
        views : dict of np.ndarray [shape=(n, rows, frames)]
            The six un-normalised views of ``n`` clip-length windows.

        Returns
        -------
        dict with ``logits`` [shape=(n, n_classes)], ``attention`` [shape=(n, 6)] and
        ``embedding`` [shape=(n, d)], float32.
        """
        n = len(next(iter(views.values())))
        fs = FeatureSet(views, np.full(n, -1, np.int64), self.class_names, [""] * n,
                        np.zeros(n, np.int64))
        seg = min(self.segment_frames, fs.n_frames)
        pred = predict_clips(self.model, fs, self.norm, np.arange(n), seg=seg,
                             batch_size=self.batch_size, device=self.device, amp=self.precision,
                             embeddings=True)
        return {"logits": pred.logits, "attention": pred.attention, "embedding": pred.embeddings}
