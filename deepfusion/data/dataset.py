"""Training data from a loaded features file: segments, augmentation and the torch Dataset
(splits are :mod:`deepfusion.data.splits`, normalisation :mod:`deepfusion.data.normalize`).

A :class:`~deepfusion.io.featureset.FeatureSet` (read by :mod:`deepfusion.io`) holds every
clip's views; the datasets here index into its arrays and copy nothing per epoch or worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from deepfusion.config import FeatureConfig
from deepfusion.io.featureset import FeatureSet
from deepfusion.patches import patch_span
from deepfusion.views import BY_NAME, FEATURE_KEYS, MEL_KEYS, PATCHES


def feature_config_of(fs: FeatureSet) -> FeatureConfig:
    """The FeatureConfig of a features file; guessed from shapes for original-format files."""
    if fs.feature_config:
        return FeatureConfig.from_dict(fs.feature_config)
    rows = fs.rows()
    base = FeatureConfig()
    duration = (fs.n_frames - 1) * base.hop_length / base.sample_rate
    # each hand-made view's rows are the setting its row names (n_mels, n_mfcc, ...)
    settings = {BY_NAME[k].rows: rows[k] for k in FEATURE_KEYS if isinstance(BY_NAME[k].rows, str)}
    return FeatureConfig(**settings, duration=round(duration, 3),
                         pretrained_view=base.pretrained_view if fs.has_pretrained else None)


def segment_frames(segment_seconds: Optional[float], feature_config: FeatureConfig, n_frames: int) -> int:
    """Frames per training segment; the whole clip when ``segment_seconds`` is None or longer."""
    if segment_seconds is None:
        return n_frames
    frames = int(round(segment_seconds * feature_config.sample_rate / feature_config.hop_length))
    return max(1, min(frames, n_frames))


def segments_per_clip(n_frames: int, seg: int) -> int:
    """Non-overlapping segments of ``seg`` frames that evaluation takes from a clip."""
    return max(1, n_frames // seg)


def eval_segments(indices: np.ndarray, n_frames: int, seg: int) -> tuple[np.ndarray, np.ndarray]:
    """All non-overlapping segments of each clip: (clip index, start frame) arrays."""
    per_clip = segments_per_clip(n_frames, seg)
    clips = np.repeat(np.asarray(indices, np.int64), per_clip)
    starts = np.tile(np.arange(per_clip, dtype=np.int64) * seg, len(indices))
    return clips, starts


def crop_views(arrays: dict[str, np.ndarray], clip: int, start: int, seg: int,
               n_frames: int) -> dict[str, np.ndarray]:
    """Frames ``[start, start + seg)`` of clip ``clip`` of every view; for the pretrained view
    (whose time axis is patches) the patches those frames cover
    (:func:`deepfusion.patches.patch_span`)."""
    out = {}
    for k, arr in arrays.items():
        if BY_NAME[k].axis == PATCHES:
            first, count = patch_span(start, seg, n_frames, arr.shape[-1])
            out[k] = arr[clip, :, first:first + count]
        else:
            out[k] = arr[clip, :, start:start + seg]
    return out


@dataclass(frozen=True)
class Augment:
    """Random changes to a training segment's views, drawn from the segment's own generator.

    ``tilt_db``: a spectral tilt of up to +-``tilt_db`` dB from the lowest to the highest mel
    band, added to the three dB mel views and, through the same DCT librosa's MFCC uses, to
    the MFCC (what another microphone, room or master EQ does to a recording; each view's
    ``tilt`` in :data:`deepfusion.views.VIEWS`). ``freq_mask``
    and ``time_mask`` (SpecAugment, Park et al. 2019): two bands of up to that fraction of the
    mel bands set to the mean in each mel view, and two spans of up to that fraction of the
    frames set to the mean in every view.
    """

    tilt_db: float = 0.0
    freq_mask: float = 0.0
    time_mask: float = 0.0

    @property
    def active(self) -> bool:
        return self.tilt_db > 0 or self.freq_mask > 0 or self.time_mask > 0

    def apply(self, views: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Views (raw, before normalisation) with a random tilt; new arrays, inputs untouched."""
        if self.tilt_db <= 0:
            return views
        from scipy.fft import dct

        tilt = rng.uniform(-self.tilt_db, self.tilt_db)
        n_mels = views[MEL_KEYS[0]].shape[0]
        ramp = (tilt * np.linspace(-0.5, 0.5, n_mels)).astype(np.float32)
        out = dict(views)
        for k in views:
            tilt, rows = BY_NAME[k].tilt, views[k].shape[0]
            if tilt == "bands":
                out[k] = views[k] + ramp[:, None]
            elif tilt == "dct" and rows <= n_mels:
                out[k] = views[k] + dct(ramp, type=2, norm="ortho")[:rows, None]
        return out

    def mask(self, x: dict[str, np.ndarray], rng: np.random.Generator) -> None:
        """SpecAugment masks on normalised views (0 is the training mean), in place."""
        frames = x[MEL_KEYS[0]].shape[1]
        if self.time_mask > 0:
            for _ in range(2):
                w = int(rng.integers(0, int(self.time_mask * frames) + 1))
                t0 = int(rng.integers(0, frames - w + 1))
                for k in x:
                    if BY_NAME[k].axis != PATCHES:      # frames, not patches
                        x[k][:, t0:t0 + w] = 0.0
        if self.freq_mask > 0:
            for k in MEL_KEYS:
                bands = x[k].shape[0]
                for _ in range(2):
                    w = int(rng.integers(0, int(self.freq_mask * bands) + 1))
                    f0 = int(rng.integers(0, bands - w + 1))
                    x[k][f0:f0 + w, :] = 0.0


class SegmentDataset:
    """Normalised segments of clips: ``(views, label, clip index)`` per item.

    A map-style dataset (all torch's DataLoader needs is ``__len__`` and ``__getitem__``),
    defined at module level so that worker processes started by spawn can unpickle it.
    """

    def __init__(self, fs: FeatureSet, norm: dict, clips: np.ndarray, *, seg: int,
                 starts: Optional[np.ndarray] = None, seed: int = 0,
                 augment: Optional[Augment] = None):
        self.fs, self.norm, self.clips, self.seg = fs, norm, clips, seg
        self.starts, self.seed = starts, seed
        self.augment = augment if augment is not None and augment.active else None

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key):
        import torch

        i, epoch = key if isinstance(key, tuple) else (key, 0)
        c, seg = int(self.clips[i]), self.seg
        rng = None
        if self.starts is not None:
            s = int(self.starts[i])
        else:
            rng = np.random.default_rng([self.seed, epoch, i])
            span = self.fs.n_frames - seg
            s = int(rng.integers(0, span + 1)) if span > 0 else 0
        # the views the normalisation knows: a model trained without the pretrained view
        # reads features that have it
        views = crop_views({k: a for k, a in self.fs.arrays.items() if k in self.norm}, c, s, seg,
                           self.fs.n_frames)
        if self.augment is not None and rng is not None:
            views = self.augment.apply(views, rng)
        x = {}
        for k, view in views.items():
            m, sd = self.norm[k]["mean"], self.norm[k]["std"]
            x[k] = (view - m[:, None]) / sd[:, None]
        if self.augment is not None and rng is not None:
            self.augment.mask(x, rng)
        return {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in x.items()}, \
            int(self.fs.labels[c]), c


def make_torch_dataset(fs: FeatureSet, norm: dict, clips: np.ndarray, *, seg: int,
                       starts: Optional[np.ndarray] = None, seed: int = 0,
                       augment: Optional[Augment] = None) -> SegmentDataset:
    """A dataset of normalised segments (see :class:`SegmentDataset`).

    With ``starts`` item ``i`` is the fixed segment ``starts[i]`` of ``clips[i]`` (evaluation).
    Without, items are indexed by ``(i, epoch)`` pairs (see :func:`make_train_loader`) and are
    a random crop of ``seg`` frames drawn from ``(seed, epoch, i)`` alone, so that crops do not
    depend on worker processes and a resumed run sees the same ones.
    """
    return SegmentDataset(fs, norm, clips, seg=seg, starts=starts, seed=seed, augment=augment)


def epoch_order(n: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The training order of epoch ``epoch`` over ``n`` items: a permutation drawn from
    ``(seed, epoch)`` alone, of which process ``rank`` of ``world_size`` takes its share
    (:func:`deepfusion.runtime.ddp.epoch_share`: the same number of items on every process)."""
    import torch

    from deepfusion.runtime.ddp import epoch_share

    g = torch.Generator().manual_seed(seed * 1_000_033 + epoch)
    return epoch_share(torch.randperm(n, generator=g).tolist(), rank, world_size)


def make_train_loader(fs: FeatureSet, norm: dict, clips: np.ndarray, *, seg: int,
                      batch_size: int, seed: int, num_workers: int = 0, pin_memory: bool = False,
                      augment: Optional[Augment] = None, rank: int = 0, world_size: int = 1):
    """The training DataLoader: shuffled random crops, reproducible per epoch.

    Call ``loader.sampler.set_epoch(epoch)`` before each epoch: the order and the crops of
    epoch *e* depend on ``(seed, e)`` only. Under torchrun each process (``rank`` of
    ``world_size``) iterates its share of that order (:func:`epoch_order`), ``batch_size``
    segments per batch. Worker processes persist across epochs (restarting them every epoch
    costs more than they save on small machines).
    """
    import torch

    share = -(-len(clips) // world_size)    # items per process and epoch

    class EpochSampler(torch.utils.data.Sampler):
        def __init__(self, n: int):
            self.n, self.epoch = n, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __len__(self) -> int:
            return share

        def __iter__(self):
            epoch = self.epoch
            order = epoch_order(self.n, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
            return iter([(i, epoch) for i in order])

    dataset = make_torch_dataset(fs, norm, clips, seg=seg, seed=seed, augment=augment)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=EpochSampler(len(clips)),
        num_workers=num_workers, persistent_workers=num_workers > 0,
        drop_last=share > batch_size, pin_memory=pin_memory)
