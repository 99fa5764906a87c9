"""The in-memory form of a features file or store: all clips, stacked per view.

The features of all clips are held once, as one C-contiguous float32 array per view of shape
``(n_clips, rows, frames)``: read into memory from a features pickle
(:mod:`deepfusion.io.features_file`), or memory-mapped from a feature store folder
(:mod:`deepfusion.io.store`, for collections larger than RAM). Datasets index into these
arrays; nothing is copied per epoch or per worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from deepfusion.config import FeatureConfig
from deepfusion.errors import DeepFusionError, FeaturesFileError
from deepfusion.views import ALL_KEYS, FEATURE_KEYS, PRETRAINED_KEY


@dataclass(frozen=True)
class _MappedFile:
    """A memory-mapped ``.npy`` array by name, as a FeatureSet is pickled for a worker."""

    filename: str
    shape: tuple
    dtype: str

    def open(self, source: str) -> np.ndarray:
        try:
            arr = np.load(self.filename, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            arr = None
        if arr is None or arr.shape != tuple(self.shape) or arr.dtype.str != self.dtype:
            raise FeaturesFileError(f"{source}: {self.filename} changed while in use "
                                    "(rewritten, perhaps by another extract); run the command "
                                    "again when that is done")
        return arr


@dataclass
class FeatureSet:
    """All clips of a features file, stacked per view."""

    arrays: dict[str, np.ndarray]        # key -> (n_clips, rows, frames or patches) float32
    labels: np.ndarray                   # (n_clips,) int64 index into class_names
    class_names: list[str]               # in logit order (sorted)
    paths: list[str]                     # relative paths ('' when the file has none)
    groups: np.ndarray                   # (n_clips,) int64; clips of one group share a split
    feature_config: Optional[dict[str, Any]] = None
    source: str = ""
    label_names: list[str] = field(default_factory=list)   # each clip's label as written
    sha256: str = ""                     # identity of the file or store it came from
    #: what the clips' groups are (artist, album, track, group: the metadata column extract
    #: took them from), or None when the clips carry none (only identical audio is grouped)
    group_by: Optional[str] = None

    def __post_init__(self) -> None:
        # the settings a file records and the views it holds must agree: a model trained on it
        # is rebuilt from the settings
        if self.feature_config is not None and (
                (self.feature_config.get("pretrained_view") is not None)
                != (PRETRAINED_KEY in self.arrays)):
            says = self.feature_config.get("pretrained_view") or "no pretrained view"
            raise FeaturesFileError(
                f"{self.source}: its feature_config says {says} but its clips "
                f"{'have' if PRETRAINED_KEY in self.arrays else 'lack'} the {PRETRAINED_KEY} "
                "view; extract the collection again")

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes started by spawn (macOS, Windows) receive the dataset pickled: an
        # array that is a whole memory-mapped .npy file travels as its file name and is mapped
        # again, not copied. Slices and in-memory arrays travel by value.
        import mmap

        state = dict(self.__dict__)
        state["arrays"] = {
            k: _MappedFile(a.filename, a.shape, a.dtype.str)
            if isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and a.filename else a
            for k, a in self.arrays.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["arrays"] = {k: a.open(state.get("source", "")) if isinstance(a, _MappedFile) else a
                           for k, a in state["arrays"].items()}
        self.__dict__.update(state)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_frames(self) -> int:
        return self.arrays[FEATURE_KEYS[0]].shape[-1]

    @property
    def keys(self) -> tuple[str, ...]:
        """The views this set holds, in model order."""
        return tuple(k for k in ALL_KEYS if k in self.arrays)

    @property
    def has_pretrained(self) -> bool:
        """Whether the set holds the pretrained view."""
        return PRETRAINED_KEY in self.arrays

    @property
    def n_patches(self) -> Optional[int]:
        """Patches per clip of the pretrained view (None without it)."""
        return self.arrays[PRETRAINED_KEY].shape[-1] if self.has_pretrained else None

    def rows(self) -> dict[str, int]:
        return {k: v.shape[1] for k, v in self.arrays.items()}

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def label_name(label: Any, where: str) -> str:
    if isinstance(label, (str, int, np.integer)) and not isinstance(label, bool):
        return str(label)
    if isinstance(label, (float, np.floating)):
        raise FeaturesFileError(f"{where}: label {label:g} is neither a name nor a whole number")
    raise FeaturesFileError(f"{where}: its label is {what_it_is(label)}, neither a name nor a "
                            "whole number")


def what_it_is(value: Any) -> str:
    """A value of a features file in words, never a Python type name ("a list", "none")."""
    if value is None:
        return "none"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, np.ndarray):
        return "an array"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    return "an object"


def class_names_of(names: list[str], source: Path) -> list[str]:
    """Distinct labels in logit order: numbers numerically, then names alphabetically."""
    distinct = sorted(set(names), key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    if len(distinct) < 2:
        raise FeaturesFileError(f"{source}: only one genre ({distinct[0]}); need at least two")
    return distinct


def checked_feature_config(config: Any, source: Path) -> Optional[dict[str, Any]]:
    """``config`` if it is None or a valid :class:`FeatureConfig` dict; else one clear error."""
    if config is None:
        return None
    try:
        if not isinstance(config, dict):
            raise TypeError(f"{what_it_is(config)}, not a mapping of settings")
        FeatureConfig.from_dict(config)
    except (DeepFusionError, TypeError, ValueError) as exc:
        raise FeaturesFileError(f"{source}: invalid feature_config ({exc})") from None
    return config


def _group_key(value: Any) -> str:
    """A group value as a string key: numbers hash predictably (``k * (2**61 - 1)`` all
    collide), so a file of such ids would make a dict of them quadratic; strings hash with a
    per-process secret. Equal numbers (``5``, ``5.0``, ``np.int64(5)``) stay one group."""
    if isinstance(value, str):
        return "s" + value
    number = float(value) if not isinstance(value, (int, np.integer)) else int(value)
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    return f"n{number!r}"


def group_by_of(items: list[dict]) -> Optional[str]:
    """What the clips' ``group`` values are (``artist``, ...), from the first clip that has
    one; ``group`` for files written before extract recorded it; None without groups."""
    for it in items:
        if it.get("group") is not None:
            by = it.get("group_by")
            return by if isinstance(by, str) and by.isidentifier() else "group"
    return None


def merge_groups(items: list[dict]) -> np.ndarray:
    """Group ids such that clips sharing a duplicate group or a track/artist group coincide."""
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key in ("duplicate_group", "group"):
        first: dict[str, int] = {}
        for i, it in enumerate(items):
            value = it.get(key)
            if value is None:
                continue
            j = first.setdefault(_group_key(value), i)
            parent[find(i)] = find(j)
    roots = [find(i) for i in range(len(items))]
    ids: dict[int, int] = {}
    return np.array([ids.setdefault(r, len(ids)) for r in roots], np.int64)


