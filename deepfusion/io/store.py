"""The feature store: a folder of ``.npy`` arrays that train and evaluate memory-map.

A features pickle must be read whole into RAM (GTZAN's is about 4 GB); a store is mapped, so
the operating system pages clips in as batches need them and can drop them again: collections
larger than RAM train, and worker processes share one copy. Layout::

    features.store/
        meta.json                 what the arrays hold, and which version folder holds them
        v.<pid>.<hex>/            float32 (or float16) arrays (n_clips, rows, frames), one per view:
            mel_spec_orig.npy  mel_spec_harm.npy  mel_spec_perc.npy
            mfcc.npy  chroma.npy  tempogram.npy  [musicnn.npy: (n_clips, rows, patches)]

A write holds an exclusive lock on ``.lock`` (two writers take turns), fills a new version
folder with plain sequential writes (a full disk is an error, not a crash) and then replaces
``meta.json`` with one atomic rename: a reader sees the old store or the new one, never a mix,
and a write killed half-way leaves a folder that the next write removes. A writer only ever
deletes inside a folder that holds nothing but a store.

The store's identity (:func:`open_store`'s ``sha256``) covers what it holds, the clips'
metadata and the arrays' values, not where or when it was written: an identical re-extract
keeps it, so ``--resume`` and evaluate accept it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from deepfusion.errors import FeaturesFileError
from deepfusion.io.atomic import library_text, os_error_reason
from deepfusion.io.featureset import (FeatureSet, checked_feature_config, class_names_of,
                                      group_by_of, merge_groups)
from deepfusion.views import ALL_KEYS, FEATURE_KEYS, MEL_KEYS, PRETRAINED_KEY

FORMAT = "deepfusion-feature-store"
VERSION = 1
META = "meta.json"
LOCK = ".lock"
_VERSION_RE = re.compile(r"v\.\d{1,10}\.[0-9a-f]{8}")
_ARRAY_FILES = {f"{key}.npy" for key in ALL_KEYS}
#: per-clip fields kept in meta.json (the pickle's item keys other than 'features')
CLIP_FIELDS = ("path", "label", "group", "group_by", "duplicate_group", "file_sha", "audio_sha",
               "source_sr", "channels", "source_seconds")
#: What a store may hold its views as: float16 halves the disk and page cache (the model
#: computes in float32 either way; see the README for its effect on accuracy).
DTYPES = ("float32", "float16")
_SCAN_BYTES = 64 << 20          # identity and finiteness are checked this many bytes at a time


def is_store(path: Path) -> bool:
    """Whether ``path`` is a store folder (anything else is read as a features pickle)."""
    return Path(path).is_dir()


def _is_version_folder(path: Path) -> bool:
    return (_VERSION_RE.fullmatch(path.name) is not None and path.is_dir()
            and all(f.name in _ARRAY_FILES and f.is_file() for f in path.iterdir()))


def read_meta(root: Path) -> dict[str, Any]:
    """The validated ``meta.json`` of the store at ``root``.

    Raises
    ------
    FeaturesFileError
        Missing, unreadable or malformed; the message names the folder.
    """
    root = Path(root)
    try:
        with open(root / META, encoding="utf-8") as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise FeaturesFileError(f"{root}: a folder, not a features file or feature store (no "
                                f"{META}); give the --out of deepfusion extract") from None
    except OSError as exc:
        raise FeaturesFileError(f"{root}: cannot read its {META} ({os_error_reason(exc)})") from None
    except ValueError:
        raise FeaturesFileError(f"{root}: damaged feature store ({META} is not JSON); run "
                                "deepfusion extract again") from None

    def bad(why: str) -> FeaturesFileError:
        return FeaturesFileError(f"{root}: not a valid feature store ({why}); run deepfusion "
                                 "extract again")

    def count(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    def scalar(x: Any) -> bool:
        return x is None or (isinstance(x, (str, int, float)) and not isinstance(x, bool))

    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise bad(f"{META} does not describe a {FORMAT}")
    if meta.get("version") != VERSION:
        raise bad(f"version {meta.get('version')!r}; this deepfusion reads version {VERSION}")
    if not isinstance(meta.get("data"), str) or not _VERSION_RE.fullmatch(meta["data"]):
        raise bad("'data' must name a version folder")
    n, frames, rows = meta.get("n_clips"), meta.get("frames"), meta.get("rows")
    if not (count(n) and count(frames)):
        raise bad("'n_clips' and 'frames' must be positive integers")
    if not isinstance(rows, dict) or set(rows) - {PRETRAINED_KEY} != set(FEATURE_KEYS) \
            or not all(map(count, rows.values())):
        raise bad(f"'rows' must give a positive row count for each of {', '.join(FEATURE_KEYS)} "
                  f"(and {PRETRAINED_KEY}, if it is there)")
    if (PRETRAINED_KEY in rows) != ("patches" in meta) or not count(meta.get("patches", 1)):
        raise bad(f"'patches' (a positive integer) goes with the {PRETRAINED_KEY} view's rows")
    if meta.get("dtype", "float32") not in DTYPES:
        raise bad(f"'dtype' must be one of {', '.join(DTYPES)}")
    if len({rows[k] for k in MEL_KEYS}) != 1:
        raise bad("the mel views must have the same number of bands")
    if not (meta.get("feature_config") is None or isinstance(meta["feature_config"], dict)):
        raise bad("'feature_config' must be an object")
    clips = meta.get("clips")
    if not isinstance(clips, list) or len(clips) != n:
        raise bad(f"'clips' must list {n} clips")
    for i, c in enumerate(clips):
        if not (isinstance(c, dict) and isinstance(c.get("path"), str)
                and isinstance(c.get("label"), (str, int)) and not isinstance(c.get("label"), bool)):
            raise bad(f"clip {i + 1} needs a path and a label")
        if not all(scalar(c.get(k)) for k in ("group", "duplicate_group")):
            raise bad(f"clip {i + 1}: 'group' and 'duplicate_group' must be names or numbers")
    return meta


def open_arrays(root: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The views of a store, memory-mapped read-only."""
    root = Path(root)
    arrays = {}
    for key in (k for k in ALL_KEYS if k in meta["rows"]):
        path = root / meta["data"] / f"{key}.npy"
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise FeaturesFileError(f"{root}: damaged feature store ({meta['data']}/{key}.npy is "
                                    "missing); run deepfusion extract again") from None
        except OSError as exc:
            raise FeaturesFileError(f"{root}: {meta['data']}/{key}.npy is unreadable "
                                    f"({os_error_reason(exc)})") from None
        except ValueError as exc:
            raise FeaturesFileError(f"{root}: {meta['data']}/{key}.npy is unreadable "
                                    f"({library_text(exc, 120)}); run deepfusion extract "
                                    "again") from None
        expected = (meta["n_clips"], meta["rows"][key],
                    meta["patches"] if key == PRETRAINED_KEY else meta["frames"])
        dtype = meta.get("dtype", "float32")
        if arr.dtype != np.dtype(dtype) or arr.shape != expected:
            raise FeaturesFileError(f"{root}: {key}.npy holds {arr.dtype} {arr.shape}, "
                                    f"{META} says {dtype} {expected}; run deepfusion extract again")
        arrays[key] = arr
    return arrays


def open_consistent(root: Path, *, attempts: int = 3) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``meta.json`` and the arrays it names, read as one version even while a writer replaces
    the store (a version deleted between the two reads is read again from the new meta)."""
    for attempt in range(attempts):
        meta = read_meta(root)
        try:
            return meta, open_arrays(root, meta)
        except FeaturesFileError:
            if attempt == attempts - 1 or _current_version(Path(root)) == meta["data"]:
                raise
    raise AssertionError("unreachable")


def scan(root: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    """Check that every value is finite and return the store's SHA-256 identity.

    The identity hashes ``meta.json`` without the version folder's name and the path it was
    written to, then each array's values: equal for equal content wherever and whenever it
    was written.

    Raises
    ------
    FeaturesFileError
        A value is NaN or infinite (the message names the clip and the view).
    """
    content = {k: v for k, v in meta.items() if k not in ("data", "source")}
    h = hashlib.sha256(json.dumps(content, sort_keys=True).encode())
    for key in arrays:
        arr = arrays[key]
        step = max(1, _SCAN_BYTES // max(1, arr[0].nbytes))
        for start in range(0, len(arr), step):
            block = arr[start:start + step]
            finite = np.isfinite(block).all(axis=(1, 2))
            if not finite.all():
                i = start + int(np.argmin(finite))
                raise FeaturesFileError(f"{root}: clip {i + 1} ({meta['clips'][i]['path']}): "
                                        f"{key} holds NaN or infinite values; run deepfusion "
                                        "extract again")
            h.update(memoryview(np.ascontiguousarray(block)).cast("B"))
    return h.hexdigest()


def open_store(folder: Path, *, class_names: Optional[list[str]] = None) -> FeatureSet:
    """A FeatureSet over a feature store, its arrays memory-mapped read-only.

    Every value is checked to be finite while the store's identity (``sha256``) is computed,
    in one pass over the arrays.

    Raises
    ------
    FeaturesFileError
        Not a store, damaged, NaN or infinite values, or (without ``class_names``) fewer than
        two classes.
    """
    folder = Path(folder)
    meta, arrays = open_consistent(folder)
    feature_config = checked_feature_config(meta.get("feature_config"), folder)
    clips = meta["clips"]
    names = [str(c["label"]) for c in clips]
    if class_names is None:
        class_names = class_names_of(names, folder)
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index.get(name, -1) for name in names], np.int64)
    sha256 = scan(folder, meta, arrays)
    return FeatureSet(arrays, labels, list(class_names), [c["path"] for c in clips],
                      merge_groups(clips), feature_config, str(folder), names, sha256,
                      group_by_of(clips))


def _current_version(root: Path) -> Optional[str]:
    try:
        with open(root / META, encoding="utf-8") as fh:
            version = json.load(fh).get("data")
    except (OSError, ValueError, AttributeError):
        return None
    return version if isinstance(version, str) else None
