"""The features file: deepfusion's (and the original project's) pickle of a list of clips.

Written atomically by extract; read without running code (:mod:`deepfusion.io.unpickle`) and
validated item by item into a :class:`~deepfusion.io.featureset.FeatureSet`.
:func:`load_features` is the one entry point of every stage: it reads a pickle or opens a store.
"""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np

from deepfusion.errors import FeaturesFileError
from deepfusion.io.atomic import atomic_write
from deepfusion.io.cache import file_digest
from deepfusion.io.featureset import (FeatureSet, checked_feature_config, class_names_of,
                                      group_by_of, label_name, merge_groups, what_it_is)
from deepfusion.io.unpickle import safe_pickle_load
from deepfusion.views import FEATURE_KEYS, MEL_KEYS, PRETRAINED_KEY, view_keys


def write_features_file(path: Path, items: list[dict[str, Any]]) -> None:
    """Write the features file atomically: a plain pickle of a list of dicts."""
    with atomic_write(Path(path)) as fh:
        pickle.dump(items, fh, protocol=pickle.HIGHEST_PROTOCOL)


def read_features_file(path: Path) -> list[dict[str, Any]]:
    """Load a features file without running code in it (see :func:`safe_pickle_load`)."""
    return safe_pickle_load(Path(path))


def load_features(path: Path, *, class_names: Optional[list[str]] = None) -> FeatureSet:
    """A features pickle (read into memory) or a feature store folder (memory-mapped).

    See :func:`load_feature_set` and :func:`~deepfusion.io.store.open_store`; both raise :class:`FeaturesFileError`.
    """
    from deepfusion.io.guard import require_regular_file
    from deepfusion.io.store import is_store, open_store

    require_regular_file(path, what="the features file", error=FeaturesFileError)
    if is_store(path):
        return open_store(path, class_names=class_names)
    return load_feature_set(path, class_names=class_names)



#: Features files up to this size are read by :func:`preload` before the heavy imports.
PRELOAD_BYTES = 64 * 2**20


def preload(path: Path) -> Optional[FeatureSet]:
    """``load_features(path)`` when that is cheap (a file up to :data:`PRELOAD_BYTES`, or a
    path that is missing or not a file), else None (the caller loads it later). A command
    calls it before importing torch, so a mistake (a pickled number, a WAV, a CSV given as
    the features) costs a second, not a start-up; a large file is left until the run's other
    checks (its outputs, say) have passed.

    Raises
    ------
    FeaturesFileError
    """
    path = Path(path)
    try:
        big = path.is_file() and path.stat().st_size > PRELOAD_BYTES
    except OSError:
        big = False
    if big or path.is_dir():
        return None
    return load_features(path)


def _clip(path: Path, index: int, item: Any) -> str:
    """``<file>: clip N (its path)`` for a message, counting clips from 1."""
    name = item.get("path") if isinstance(item, dict) else None
    return f"{path}: clip {index + 1}" + (f" ({name})" if isinstance(name, str) and name else "")


def load_feature_set(path: Path, *, class_names: Optional[list[str]] = None) -> FeatureSet:
    """Read and validate a features file (deepfusion's or the original project's format).

    Each item needs ``features`` (the six views, 2-D numeric arrays with the same rows in
    every item) and ``label`` (genre name or integer). Clips whose frame count differs from the
    most common one (GTZAN clips run 29.9-30.6 s) are trimmed or padded with their minimum.
    Items are freed as they are stacked, so the peak memory is about one copy of the features.

    Parameters
    ----------
    class_names : list of str, optional
        Fix the label order (a checkpoint's); by default the sorted distinct labels.

    Raises
    ------
    FeaturesFileError
        Unreadable or unsafe file, empty, missing keys, wrong shapes, non-finite values, or
        (without ``class_names``) fewer than two classes. The message names the file and item.
    """
    path = Path(path)
    try:
        sha256 = file_digest(path)
    except OSError:
        sha256 = ""          # read_features_file reports the missing or unreadable file
    items = read_features_file(path)
    if not isinstance(items, list):
        raise FeaturesFileError(f"{path}: not a deepfusion features file ({what_it_is(items)}, "
                                "where extract writes a list of clips)")
    if not items:
        raise FeaturesFileError(f"{path}: holds no clips")
    # the pretrained view is there for every clip or for none (a file of one extract run)
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("features"), dict):
            raise FeaturesFileError(f"{_clip(path, i, item)}: needs features (named arrays) "
                                    "and a label")
    has = [PRETRAINED_KEY in it["features"] for it in items]
    if any(has) and not all(has):
        odd = has.index(not has[0])
        raise FeaturesFileError(f"{_clip(path, odd, items[odd])}: "
                                f"{'has' if not has[0] else 'lacks'} the {PRETRAINED_KEY} view, "
                                f"clip 1 {'has' if has[0] else 'lacks'} it; extract them together")
    keys = view_keys(bool(has[0]))
    rows: dict[str, int] = {}
    frames: dict[str, list[int]] = {k: [] for k in keys}
    names: list[str] = []
    for i, item in enumerate(items):
        where = _clip(path, i, item)
        if not isinstance(item, dict) or "features" not in item or "label" not in item:
            raise FeaturesFileError(f"{where}: needs features (named arrays) and a label")
        feats = item["features"]
        if not isinstance(feats, dict):
            raise FeaturesFileError(f"{where}: its features must be named arrays")
        missing = [k for k in keys if k not in feats]
        if missing:
            raise FeaturesFileError(f"{where}: missing feature(s) {', '.join(missing)}")
        t = None
        for k in keys:
            a = feats[k]
            if not isinstance(a, np.ndarray) or a.ndim != 2 or a.dtype.kind not in "fiu" or min(a.shape) == 0:
                shape = getattr(a, "shape", None)
                raise FeaturesFileError(f"{where}: {k} must be a non-empty 2-D numeric array, got shape {shape}")
            expected = rows.setdefault(k, a.shape[0])
            if a.shape[0] != expected:
                raise FeaturesFileError(f"{where}: {k} has {a.shape[0]} rows, other clips {expected}")
            if k in FEATURE_KEYS:      # the pretrained view counts patches, not frames
                if t is not None and a.shape[1] != t:
                    raise FeaturesFileError(f"{where}: {k} has {a.shape[1]} frames, {FEATURE_KEYS[0]} {t}")
                t = a.shape[1]
            frames[k].append(a.shape[1])
        names.append(label_name(item["label"], where))
        for key in ("group", "duplicate_group"):
            value = item.get(key)
            if not (value is None or isinstance(value, (str, int, float, np.integer, np.floating))) \
                    or isinstance(value, (bool, np.bool_)):
                raise FeaturesFileError(f"{where}: its {key} is {what_it_is(value)}, neither a "
                                        "name nor a number")
    if len({rows[k] for k in MEL_KEYS}) != 1:
        raise FeaturesFileError(f"{path}: the mel views must have the same number of bands")

    if class_names is None:
        class_names = class_names_of(names, path)
    index = {name: i for i, name in enumerate(class_names)}

    n = len(items)
    width = {k: Counter(frames[k]).most_common(1)[0][0] for k in keys}
    _check_expansion(path, items, n * sum(rows[k] * width[k] for k in keys) * 4)
    arrays = {k: np.empty((n, rows[k], width[k]), np.float32) for k in keys}
    for i, item in enumerate(items):
        for k in keys:
            a = item["features"][k]
            if not np.isfinite(a).all():
                raise FeaturesFileError(f"{path}: item {i}: {k} holds NaN or infinite values")
            t = width[k]
            m = min(t, a.shape[1])
            arrays[k][i, :, :m] = a[:, :m]
            if m < t:
                arrays[k][i, :, m:] = a.min()
        item["features"] = None   # free this clip's copy as soon as it is stacked

    labels = np.array([index.get(name, -1) for name in names], np.int64)
    paths = [str(it.get("path") or it.get("original_file") or "") for it in items]
    groups = merge_groups(items)
    feature_config = checked_feature_config(
        next((it.get("feature_config") for it in items if it.get("feature_config")), None), path)
    return FeatureSet(arrays, labels, list(class_names), paths, groups, feature_config, str(path),
                      names, sha256, group_by_of(items))


#: A features file may take this many times its size in memory (float16 data doubles), plus
#: a fixed allowance; beyond that its items must share arrays through the pickle memo.
MAX_EXPANSION, EXPANSION_SLACK = 4, 64 << 20


def _check_expansion(path: Path, items: list[dict[str, Any]], needed: int) -> None:
    """Refuse, before allocating, a file whose stacked arrays would dwarf it.

    A pickle can name one array many times (its memo), so a few MB may describe gigabytes.

    Raises
    ------
    FeaturesFileError
    """
    try:
        size = path.stat().st_size
    except OSError:
        return
    if needed <= MAX_EXPANSION * size + EXPANSION_SLACK:
        return
    distinct = len({id(a) for it in items for a in it["features"].values()})
    total = sum(len(it["features"]) for it in items)
    raise FeaturesFileError(
        f"{path}: refused, its {len(items)} clips would take {needed / 2**30:.1f} GB in memory "
        f"from a {size / 2**20:.1f} MB file ({distinct} distinct arrays for {total} views: "
        "items share arrays); write each clip's own arrays")
