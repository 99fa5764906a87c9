"""Adaptation to the collection being classified: its own normalisation statistics, no labels.

A model trained on one collection meets another with other recordings, levels and productions:
every view's rows sit elsewhere. Re-estimating, on the collection being classified, what the
model normalises by removes much of that shift without a single label:

- ``inputs``: each view's per-row mean and standard deviation (what
  :func:`deepfusion.data.normalize.fit_normalization` computed on the training clips) are the
  collection's own;
- ``full``: that, and the statistics the model itself normalises by, re-estimated on the
  collection: the running mean and variance of every BatchNorm layer of the network over the
  collection's segments (AdaBN, Li et al. 2016), or for the linear probe the standardisation
  of its pooled statistics.

A prediction then depends on the other files classified with it (their statistics). ``auto``
applies :data:`AUTO_MODE` to a collection the model was not trained on with at least
:data:`~deepfusion.config.ADAPT_MIN_CLIPS` clips (fewer, and one file weighs too much);
``inputs`` and ``full`` apply whatever the size. The measurement behind the default is in the
README (the cross-source protocol, ``benchmarks/cross_source.py``).

Both stages use the same steps: :func:`adapt` on a loaded collection (evaluate), and
:class:`Adapter` fed batches of windows as they come from the cache (predict, any size).
"""

from __future__ import annotations

import copy
from typing import Iterable, Optional

import numpy as np

from deepfusion.config import ADAPT_MIN_CLIPS, ADAPT_MODES
from deepfusion.errors import ParameterError
from deepfusion.io.featureset import FeatureSet

#: Segments per batch of the BatchNorm pass: fixed, not the caller's inference batch, because
#: in training mode a layer's output depends on its batch (evaluate and predict must agree).
BATCH_SEGMENTS = 64
#: What ``auto`` does on a collection of at least ADAPT_MIN_CLIPS clips that the model was not
#: trained on (chosen with the cross-source protocol, see the README).
AUTO_MODE = "full"


def resolve_mode(mode: str, *, n_clips: int, new_collection: bool) -> str:
    """The adaptation to apply: ``auto`` becomes :data:`AUTO_MODE` for a collection the model
    was not trained on with at least ``ADAPT_MIN_CLIPS`` clips, ``none`` otherwise.

    Raises
    ------
    ParameterError
        An unknown mode.
    """
    if mode not in ADAPT_MODES:
        raise ParameterError(f"--adapt {mode}: give {', '.join(ADAPT_MODES[:-1])} or "
                             f"{ADAPT_MODES[-1]}")
    if mode != "auto":
        return mode
    return AUTO_MODE if new_collection and n_clips >= ADAPT_MIN_CLIPS else "none"


def _is_probe(model) -> bool:
    return getattr(model, "stat_mean", None) is not None


class Adapter:
    """The second step of ``full``: a copy of ``model`` whose own statistics are re-estimated
    on the collection (normalised by the collection's ``norm``, the first step).

    Feed every batch of clips with :meth:`add`, then take :meth:`model`. ``seg``: frames per
    segment, as the model classifies (the probe: whole clips). For the network, the segments
    go through it in batches of :data:`BATCH_SEGMENTS` in the order they were added, whatever batches
    they were added in, BatchNorm layers in training mode (dropout off); each layer's new
    running mean and variance are those of all the values it saw (per channel), not an average
    over batches: the same collection in the same order gives the same model in evaluate and
    in predict.
    """

    def __init__(self, model, norm: dict, *, seg: int, device=None):
        import torch

        self.norm, self.seg = norm, seg
        self.device = device or torch.device("cpu")
        self._model = copy.deepcopy(model)
        self._model.eval()
        self._stats = None                              # the probe: sums of pooled statistics
        self._count = 0                                 # and the clips they sum over
        self._pending: list[dict] = []                  # segments waiting for a full batch
        self._layers = [m for m in self._model.modules()
                        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self._sums: dict[int, list] = {}
        self._hooks = [m.register_forward_pre_hook(self._gather) for m in self._layers]
        for m in self._layers:
            m.train()                                   # normalise by the batch, as in training

    def _gather(self, module, inputs) -> None:
        import torch

        # summed in float64 on the CPU (MPS has no float64): exact whatever the batching
        x = inputs[0].detach().to("cpu", dtype=torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]   # every position of every channel
        part = [x.sum(dim=dims), (x * x).sum(dim=dims), x.numel() // x.shape[1]]
        mine = self._sums.get(id(module))
        self._sums[id(module)] = part if mine is None else [mine[0] + part[0], mine[1] + part[1],
                                                            mine[2] + part[2]]

    def add(self, fs: FeatureSet, clips: np.ndarray) -> None:
        """Clips ``clips`` of ``fs`` (a collection, or a batch of a library's windows)."""
        from deepfusion.data.dataset import eval_segments, make_torch_dataset

        clips = np.asarray(clips, np.int64)
        if _is_probe(self._model):
            from deepfusion.models.probe import clip_stats

            stats = clip_stats(fs, self.norm, clips, self._model.keys)
            part = np.stack([stats.sum(axis=0), (stats * stats).sum(axis=0)])
            self._stats = (part if self._stats is None else self._stats + part)
            self._count += len(clips)
            return
        if not self._layers:
            return
        seg = min(self.seg, fs.n_frames)
        seg_clips, starts = eval_segments(clips, fs.n_frames, seg)
        ds = make_torch_dataset(fs, self.norm, seg_clips, seg=seg, starts=starts)
        for i in range(len(ds)):
            self._pending.append(ds[i][0])
            if len(self._pending) == BATCH_SEGMENTS:
                self._forward()

    def _forward(self) -> None:
        import torch

        from deepfusion.runtime.device import to_device

        if not self._pending:
            return
        x = {k: torch.stack([p[k] for p in self._pending]) for k in self._pending[0]}
        self._pending = []
        with torch.no_grad():
            self._model({k: to_device(v, self.device) for k, v in x.items()})

    def model(self):
        """The adapted copy, in eval mode."""
        import torch

        if _is_probe(self._model) and self._stats is not None:
            mean = self._stats[0] / self._count
            std = np.sqrt(np.maximum(self._stats[1] / self._count - mean * mean, 0.0))
            with torch.no_grad():
                self._model.stat_mean.copy_(torch.from_numpy(mean))
                self._model.stat_scale.copy_(torch.from_numpy(np.maximum(std, 1e-8)))
        self._forward()
        for hook in self._hooks:
            hook.remove()
        with torch.no_grad():
            for m in self._layers:
                sums = self._sums.get(id(m))
                if sums is not None and sums[2] > 1:
                    mean = sums[0] / sums[2]
                    var = (sums[1] / sums[2] - mean * mean).clamp_min(0) * sums[2] / (sums[2] - 1)
                    m.running_mean.copy_(mean.to(m.running_mean.device, m.running_mean.dtype))
                    m.running_var.copy_(var.to(m.running_var.device, m.running_var.dtype))
        self._hooks, self._sums = [], {}
        return self._model.eval()


def adapt(model, fs: FeatureSet, norm: dict, clips: np.ndarray, *, mode: str, seg: int,
          device=None) -> tuple[object, dict]:
    """The model and normalisation to classify ``clips`` of ``fs`` with, adapted by ``mode``.

    Parameters
    ----------
    model : MultiModalNet or LinearProbe
        Not changed: ``full`` adapts a copy.
    fs : FeatureSet
        The collection (labels unused).
    norm : dict
        The checkpoint's normalisation
        (:attr:`~deepfusion.models.checkpoint.Checkpoint.normalization`).
    clips : array of int
        The clips whose statistics are the collection's.
    mode : "none", "inputs" or "full" (see the module docstring; resolve ``auto`` first)
    seg : int
        Frames per segment, as the model is evaluated.

    Returns
    -------
    (model, norm)
    """
    from deepfusion.data.normalize import fit_normalization

    if mode not in ("none", "inputs", "full"):
        raise ParameterError(f"--adapt {mode}: give none, inputs or full")
    if mode == "none" or len(clips) == 0:
        return model, norm
    own = fit_normalization(fs, np.asarray(clips, np.int64))
    norm = {k: own[k] for k in norm}          # the model's views only
    if mode == "inputs":
        return model, norm
    adapter = Adapter(model, norm, seg=seg, device=device)
    adapter.add(fs, clips)
    return adapter.model(), norm


def adapt_streaming(model, norm: dict, batches: Iterable[FeatureSet], *, mode: str, seg: int,
                    device=None, again: Optional[Iterable[FeatureSet]] = None
                    ) -> tuple[object, dict]:
    """:func:`adapt` over a collection read in batches (``FeatureSet`` s of windows): one pass
    for the views' statistics and, for ``full``, a second over ``again`` (the same batches
    read anew)."""
    from deepfusion.data.normalize import RunningNormalization

    if mode not in ("none", "inputs", "full"):
        raise ParameterError(f"--adapt {mode}: give none, inputs or full")
    if mode == "none":
        return model, norm
    running = RunningNormalization()
    for fs in batches:
        running.add({k: fs.arrays[k] for k in norm})
    if not running.total:
        return model, norm
    norm = running.result()
    if mode == "inputs":
        return model, norm
    adapter = Adapter(model, norm, seg=seg, device=device)
    for fs in again or ():
        adapter.add(fs, np.arange(len(fs)))
    return adapter.model(), norm
