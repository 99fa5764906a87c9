"""A checkpoint as an engine for predict and embed: windows of features in, outputs out.

:class:`TorchEngine` and :class:`deepfusion.inference.onnx_engine.OnnxEngine` answer the same question
(``window_outputs``) from the same un-normalised views, so the library commands do not care
which one runs. Windows are classified through :func:`deepfusion.inference.clips.predict_clips`,
as train and evaluate classify clips: every non-overlapping segment, outputs averaged.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from deepfusion.inference.clips import predict_clips
from deepfusion.io.cache import stamp_or_none
from deepfusion.io.featureset import FeatureSet
from deepfusion.io.model_ids import ModelIds, model_id
from deepfusion.models.checkpoint import read_checkpoint
from deepfusion.runtime.device import inference_precision, resolve_device
from deepfusion.runtime.memory import is_out_of_memory

#: Segments per forward pass on the CPU and on a GPU. On this CPU (2 cores, fp32) a light
#: model ran 2.5-3.5 ms per segment in batches of 8 to 20 against 3.4-6.0 in batches of 40
#: to 64, and resnet18 14.6 ms at 16 against 18.5 at 64: small batches stay in the caches.
#: A GPU wants large ones.
SEGMENT_BATCH = {"cpu": 16}
SEGMENT_BATCH_DEFAULT = 64


class TorchEngine:
    """A ``best.pth`` loaded once, classifying windows on ``device`` in ``precision``
    (``fp32``, or ``amp``: see :func:`deepfusion.runtime.device.inference_precision`), ``batch_size``
    segments at a time (default :data:`SEGMENT_BATCH` for the device). ``ids``: the model
    files' digests known so far (:class:`~deepfusion.io.model_ids.ModelIds`: a checkpoint seen before
    is not hashed again to find its outputs in the cache)."""

    kind = "torch"

    def __init__(self, checkpoint: Path, *, device: str = "auto", batch_size: Optional[int] = None,
                 precision: str = "fp32", ids: Optional[ModelIds] = None):
        self.path = Path(checkpoint)
        stamp = stamp_or_none(self.path)
        self.checkpoint = read_checkpoint(self.path)
        self.class_names = list(self.checkpoint.class_names)
        self.feature_config = self.checkpoint.feature_config
        self.norm = self.checkpoint.normalization
        self.segment_frames = self.checkpoint.segment_frames
        self.device = resolve_device(device)
        # float32 unless asked, whatever the training run used: the same file gives the same
        # answer on every machine (mixed precision would move borderline files)
        self.precision = inference_precision(self.device, precision)
        self._trained_model: Optional[torch.nn.Module] = None   # built when first asked for
        self._adapted: Optional[torch.nn.Module] = None
        # from the checkpoint, whose state load_checkpoint checked against the config: the
        # network (or probe) itself is built only when a window goes through it, and a run
        # whose outputs all come from the cache (deepfusion.io.model_ids) builds none
        self.embedding_dim = self.checkpoint.embedding_dim
        #: the views the model reads (its attention's columns)
        self.keys = self.checkpoint.keys
        # what deepfusion.io.model_ids keeps this model's outputs under (None: nothing kept)
        self.model_id = model_id(self.path, "torch", self.device.type, self.precision,
                                 stamp=stamp, ids=ids) if stamp else None
        self.batch_size = batch_size or SEGMENT_BATCH.get(self.device.type, SEGMENT_BATCH_DEFAULT)
        self._trained = (self.norm, self.model_id)     # what adapt starts from

    @property
    def model(self) -> torch.nn.Module:
        """The network in use: the checkpoint's (built on first use), or the one adapted to
        a collection (:meth:`adapt`)."""
        if self._adapted is not None:
            return self._adapted
        if self._trained_model is None:
            with self._memory_line():
                model = self.checkpoint.build_model().to(self.device)
                if self.device.type != "mps":   # as train runs it (faster CNNs on CPUs and GPUs)
                    model.to(memory_format=torch.channels_last)
            self._trained_model = model
        return self._trained_model

    def adapt(self, mode: str, batches) -> None:
        """Adapt to a collection (:mod:`deepfusion.inference.adapt`): ``batches()`` yields its windows
        as FeatureSets, anew at each call; always from the trained model (``none``: back to
        it). The outputs then depend on the collection, so they are not kept in the cache
        (``model_id`` None)."""
        from deepfusion.inference.adapt import adapt_streaming

        self._adapted = None
        self.norm, self.model_id = self._trained
        if mode == "none":
            return
        with self._memory_line():
            self._adapted, self.norm = adapt_streaming(
                self.model, self.norm, batches(), mode=mode, seg=self.segment_frames,
                device=self.device, again=batches() if mode == "full" else None)
        self.model_id = None

    @contextlib.contextmanager
    def _memory_line(self) -> Iterator[None]:
        """The device running out of memory as one line (a DeviceMemoryError)."""
        try:
            yield
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            from deepfusion.errors import DeviceMemoryError

            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            advice = ("free some memory (other programs)" if self.device.type == "cpu"
                      else "give --device cpu")
            raise DeviceMemoryError(f"{self.path}: out of memory on {self.device} running this "
                                    f"model; {advice}") from None

    def window_outputs(self, views: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per window, the mean over its non-overlapping segments of the model's outputs.

        Parameters
        ----------
        views : dict of np.ndarray [shape=(n, rows, frames)]
            The un-normalised views of ``n`` clip-length windows (the pretrained view's
            frames are its patches).

        Returns
        -------
        dict with ``logits`` [shape=(n, n_classes)], ``attention`` [shape=(n, M)] and
        ``embedding`` [shape=(n, d)], float32.
        """
        n = len(next(iter(views.values())))
        fs = FeatureSet(views, np.full(n, -1, np.int64), self.class_names, [""] * n,
                        np.zeros(n, np.int64))
        seg = min(self.segment_frames, fs.n_frames)
        with self._memory_line():
            pred = predict_clips(self.model, fs, self.norm, np.arange(n), seg=seg,
                                 batch_size=self.batch_size, device=self.device,
                                 amp=self.precision, embeddings=True)
        return {"logits": pred.logits, "attention": pred.attention, "embedding": pred.embeddings}
