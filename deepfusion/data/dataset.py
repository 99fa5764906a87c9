"""Training data from a loaded features file: splits, normalisation, segments, augmentation
and the torch Dataset.

A :class:`~deepfusion.io.featureset.FeatureSet` (read by :mod:`deepfusion.io`) holds every
clip's views; the datasets here index into its arrays and copy nothing per epoch or worker.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import numpy as np

from deepfusion.config import MEL_KEYS, PRETRAINED_KEY, FeatureConfig
from deepfusion.errors import DatasetError
from deepfusion.io.atomic import library_text, os_error_reason
from deepfusion.io.featureset import FeatureSet
from deepfusion.features.pretrained.view import patch_span

SPLITS = ("train", "val", "test")

#: Split files shipped with deepfusion, by alias.
SPLIT_ALIASES = {"gtzan-fault-filtered": "gtzan_fault_filtered.csv"}


# ------------------------------------------------------------------------------------- splits

def make_split(labels: np.ndarray, groups: np.ndarray, *, val_size: float, test_size: float,
               seed: int) -> np.ndarray:
    """Assign each clip to train/val/test, stratified by genre, keeping each group on one side.

    Groups are shuffled (seeded) within each genre (a group's genre is its first clip's) and
    dealt to test and val until each holds its share of the genre's clips; the rest is train.

    Returns
    -------
    np.ndarray [shape=(n_clips,)] of str: 'train', 'val' or 'test'
    """
    rng = np.random.default_rng(seed)
    split = np.full(len(labels), "train", dtype=object)
    group_label: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    for i, (label, group) in enumerate(zip(labels.tolist(), groups.tolist())):
        group_label.setdefault(group, label)
        members.setdefault(group, []).append(i)
    for label in sorted(set(group_label.values())):
        gs = [g for g, lab in group_label.items() if lab == label]
        gs = [gs[i] for i in rng.permutation(len(gs))]
        total = sum(len(members[g]) for g in gs)
        want = {"test": test_size * total, "val": val_size * total}
        for name in ("test", "val"):
            have = 0
            # deal groups while that brings the count closer to the target, keeping one for train
            while gs and len(gs) > 1 and want[name] > 0 and (
                    have == 0 or abs(have + len(members[gs[0]]) - want[name]) < abs(have - want[name])):
                g = gs.pop(0)
                split[members[g]] = name
                have += len(members[g])
    return split


def resolve_split_file(spec: str | Path) -> Path:
    """A split file path, or a shipped one by alias (``gtzan-fault-filtered``)."""
    if str(spec) in SPLIT_ALIASES:
        return Path(str(resources.files("deepfusion") / "splits" / SPLIT_ALIASES[str(spec)]))
    from deepfusion.io.guard import require_regular_file

    path = Path(spec)
    if path.is_dir():
        raise DatasetError(f"{path}: a folder, not a split file; give a CSV with path,split "
                           "columns")
    require_regular_file(path, what="the split file", error=DatasetError)
    if not path.is_file():
        aliases = ", ".join(SPLIT_ALIASES)
        raise DatasetError(f"{path}: split file not found; give a CSV with path,split columns, "
                           f"or a shipped split: {aliases}")
    return path


def read_split_file(spec: str | Path, paths: list[str], *, source: str = "") -> np.ndarray:
    """Splits of ``paths`` from a ``path,split`` CSV; clips it does not list get ''.
    ``source``: the features file the paths come from (for the message of no overlap).

    Raises
    ------
    DatasetError
        Malformed file, unknown split names, paths leaving the dataset root, or no overlap.
    """
    from deepfusion.audio import resolve_inside

    path = resolve_split_file(spec)
    if not any(paths):
        raise DatasetError(f"{path}: the features file records no clip paths to match")
    wanted: dict[str, str] = {}
    first_line: dict[str, int] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:   # a BOM is allowed
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"path", "split"} <= set(reader.fieldnames):
                raise DatasetError(f"{path}: needs 'path' and 'split' columns")
            for line, row in enumerate(reader, start=2):
                name = (row["split"] or "").strip()
                rel = (row["path"] or "").strip()
                if name not in SPLITS:
                    raise DatasetError(f"{path}: line {line}: split must be train, val or test, got {name!r}")
                resolve_inside(Path("/dataset-root"), rel, source=f"{path}: line {line}",
                               show_root=False)
                if rel in first_line:
                    raise DatasetError(f"{path}: line {line}: {rel!r} is listed again (first on "
                                       f"line {first_line[rel]}); list each clip once")
                first_line[rel] = line
                wanted[rel] = name
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read split file ({os_error_reason(exc)})") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not a UTF-8 text CSV (byte 0x{exc.object[exc.start]:02x} "
                           f"at position {exc.start}); save it as CSV UTF-8") from None
    except csv.Error as exc:
        raise DatasetError(f"{path}: not a readable CSV ({library_text(exc, 120)})") from None
    split = np.array([wanted.get(p, "") for p in paths], dtype=object)
    if not (split != "").any():
        features = source or "the features file"
        listed = next(iter(wanted), None)
        example = next((p for p in paths if p), "")
        detail = (f" (it lists {listed}; {features} has paths like {example}, relative to the "
                  "audio folder)" if listed is not None else " (it lists no clip)")
        raise DatasetError(f"{path}: none of its paths is a clip of {features}{detail}")
    return split


def check_split(split: np.ndarray, groups: np.ndarray, *, paths: Optional[list[str]] = None,
                split_file: Any = None) -> None:
    """Raise :class:`DatasetError` if a group (duplicate or track) spans two splits; the
    message names two of its clips when ``paths`` are given, and ``split_file``."""
    seen: dict[Any, tuple[str, int]] = {}
    for i, (s, g) in enumerate(zip(split.tolist(), groups.tolist())):
        if s == "":
            continue
        first, j = seen.setdefault(g, (s, i))
        if first != s:
            where = f"{split_file}: " if split_file is not None else ""
            if paths is not None and paths[j] and paths[i]:
                raise DatasetError(f"{where}{paths[j]} and {paths[i]} are one group (identical "
                                   "audio, or one track, album or artist) but in "
                                   f"{first} and {s}; put them in one split")
            raise DatasetError(f"{where}a group of identical or same-track clips spans {first} "
                               f"and {s}; put its clips in one split")


# ------------------------------------------------------------------------------ normalisation

#: Per view, the smallest standard deviation a row is normalised by, as a fraction of the
#: view's mean row deviation. The pretrained view's rows include tags that are near zero on a
#: whole collection (deviation 1e-4 or less): divided by that, the slightest change on another
#: recording (another codec, say) became hundreds of deviations and swung the network's
#: answer; floored, it is a few. The hand-made views keep their plain floor (1e-5).
RELATIVE_STD_FLOOR = {PRETRAINED_KEY: 0.1}


class RunningNormalization:
    """Per-row sums of each view over the clips (or windows) added so far: the statistics of
    :func:`fit_normalization`, gathered a batch at a time (a library larger than memory)."""

    def __init__(self):
        self.total: dict[str, np.ndarray] = {}
        self.sq: dict[str, np.ndarray] = {}
        self.count: dict[str, int] = {}

    def add(self, views: dict[str, np.ndarray]) -> None:
        """Add clips: ``{key: (n, rows, frames)}`` or one clip ``{key: (rows, frames)}``."""
        for k, arr in views.items():
            x = np.asarray(arr, np.float64)
            x = x.reshape(-1, *x.shape[-2:]).transpose(1, 0, 2).reshape(x.shape[-2], -1)
            if k not in self.total:
                self.total[k] = np.zeros(x.shape[0], np.float64)
                self.sq[k] = np.zeros(x.shape[0], np.float64)
                self.count[k] = 0
            self.total[k] += x.sum(axis=1)
            self.sq[k] += (x * x).sum(axis=1)
            self.count[k] += x.shape[1]

    def result(self) -> dict[str, dict[str, np.ndarray]]:
        """``{key: {'mean': (rows,), 'std': (rows,)}}`` (float32; std floored at 1e-5, and at
        :data:`RELATIVE_STD_FLOOR` of the view's mean row deviation)."""
        stats = {}
        for k, total in self.total.items():
            count = max(1, self.count[k])
            mean = total / count
            std = np.sqrt(np.maximum(self.sq[k] / count - mean * mean, 0.0))
            floor = max(1e-5, RELATIVE_STD_FLOOR.get(k, 0.0) * float(std.mean()) if std.size else 0.0)
            stats[k] = {"mean": mean.astype(np.float32),
                        "std": np.maximum(std, floor).astype(np.float32)}
        return stats


def fit_normalization(fs: FeatureSet, indices: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Per-row mean and standard deviation of each view over the clips ``indices`` only.

    Returns ``{key: {'mean': (rows,), 'std': (rows,)}}`` (float32; std floored at 1e-5).
    """
    running = RunningNormalization()
    for i in indices:                    # one clip at a time: no copy of the train set
        running.add({k: arr[i] for k, arr in fs.arrays.items()})
    if not len(indices):
        running.add({k: arr[:0] for k, arr in fs.arrays.items()})
    return running.result()


def split_lists(fs: FeatureSet, split: np.ndarray) -> dict[str, Any]:
    """The split as saved with a run: relative paths per split (indices when paths are absent)."""
    use_paths = all(fs.paths) and len(set(fs.paths)) == len(fs.paths)
    out: dict[str, Any] = {"by": "path" if use_paths else "index"}
    for name in ("train", "val", "test"):
        idx = np.flatnonzero(split == name)
        out[name] = [fs.paths[i] for i in idx] if use_paths else idx.tolist()
    return out


def split_summary(fs: FeatureSet, indices) -> str:
    """One line: clips, genres and the clips of each split (``indices``: train, val, test),
    and, when the clips carry groups, what they are and how many each split holds."""
    counts = ", ".join(f"{n} {len(i)}" for n, i in zip(SPLITS, indices))
    line = f"{len(fs)} clips, {len(fs.class_names)} genres ({', '.join(fs.class_names)}); split: {counts}"
    if fs.group_by:
        per = "/".join(str(len(set(fs.groups[i].tolist()))) for i in indices)
        line += f"; each {fs.group_by} on one side ({per} {fs.group_by}s)"
    return line


def ungrouped_warning(fs: FeatureSet) -> Optional[str]:
    """The line train says before a split it makes of clips that carry no groups (no artist,
    album or track: only identical audio is kept together), else None."""
    if fs.group_by is not None:
        return None
    return ("warning: the clips carry no artist, album or track, so test clips may be excerpts "
            "of recordings in the training clips, and the test accuracy then measures the "
            "recording, not the genre; give extract a metadata table with an artist, album or "
            "track_id column (a manifest.csv at the collection root, or --manifest), or train "
            "with a --split-file")


def feature_config_of(fs: FeatureSet) -> FeatureConfig:
    """The FeatureConfig of a features file; guessed from shapes for original-format files."""
    if fs.feature_config:
        return FeatureConfig.from_dict(fs.feature_config)
    rows = fs.rows()
    base = FeatureConfig()
    duration = (fs.n_frames - 1) * base.hop_length / base.sample_rate
    return FeatureConfig(n_mels=rows["mel_spec_orig"], n_mfcc=rows["mfcc"], n_chroma=rows["chroma"],
                         tempogram_win_length=rows["tempogram"], duration=round(duration, 3),
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
    (:func:`deepfusion.features.pretrained.view.patch_span`)."""
    out = {}
    for k, arr in arrays.items():
        if k == PRETRAINED_KEY:
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
    the MFCC (what another microphone, room or master EQ does to a recording). ``freq_mask``
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
        for k in MEL_KEYS:
            out[k] = views[k] + ramp[:, None]
        n_mfcc = views["mfcc"].shape[0]
        if n_mfcc <= n_mels:
            out["mfcc"] = views["mfcc"] + dct(ramp, type=2, norm="ortho")[:n_mfcc, None]
        return out

    def mask(self, x: dict[str, np.ndarray], rng: np.random.Generator) -> None:
        """SpecAugment masks on normalised views (0 is the training mean), in place."""
        frames = x[MEL_KEYS[0]].shape[1]
        if self.time_mask > 0:
            for _ in range(2):
                w = int(rng.integers(0, int(self.time_mask * frames) + 1))
                t0 = int(rng.integers(0, frames - w + 1))
                for k in x:
                    if k != PRETRAINED_KEY:     # frames, not patches
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
