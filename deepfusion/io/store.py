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

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np

from deepfusion.config import ALL_KEYS, FEATURE_KEYS, MEL_KEYS, PRETRAINED_KEY
from deepfusion.errors import FeaturesFileError, OutputError
from deepfusion.io.atomic import atomic_write, library_text, os_error_reason, remove_stale_temps
from deepfusion.io.featureset import (FeatureSet, checked_feature_config, class_names_of, group_by_of,
                         merge_groups)
from deepfusion.io.lock import exclusive

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


def check_destination(dest: Path) -> None:
    """Refuse, before any work, a ``dest`` that is a file or a folder holding anything but a
    store (a writer deletes old versions inside it, so it must never be the user's folder).

    Raises
    ------
    OutputError
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"{dest}: a file, but --format store writes a folder; give another "
                          "--out, or --format pickle")
    if not dest.is_dir():
        return
    try:
        # hidden files (.DS_Store, .lock, temporaries) are left alone whatever they are
        foreign = sorted(c.name for c in dest.iterdir() if not (
            c.name == META or c.name.startswith(".") or _is_version_folder(c)))
    except OSError as exc:
        raise OutputError(f"{dest}: cannot read the folder ({os_error_reason(exc)})") from None
    ours = True
    if (dest / META).exists():
        try:
            meta = json.loads((dest / META).read_text(encoding="utf-8"))
            ours = isinstance(meta, dict) and meta.get("format") == FORMAT
        except (OSError, ValueError):
            ours = (dest / LOCK).exists()   # a damaged store's meta.json: a writer was here
    if foreign or not ours:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "") if foreign else META
        raise OutputError(f"{dest}: is a folder holding other files ({shown}), not a feature "
                          "store; give another --out")


def _exclusive(root: Path):
    """Hold the exclusive lock of store ``root``, taking turns with another writer."""
    return exclusive(root / LOCK, wait=True, what="this feature store")


def _current_version(root: Path) -> Optional[str]:
    try:
        with open(root / META, encoding="utf-8") as fh:
            version = json.load(fh).get("data")
    except (OSError, ValueError, AttributeError):
        return None
    return version if isinstance(version, str) else None


def _remove_other_versions(root: Path, keep: Optional[str]) -> None:
    """Delete version folders other than ``keep`` (under the lock: no writer is filling them)."""
    for child in root.iterdir():
        if child.name != keep and _is_version_folder(child):
            shutil.rmtree(child, ignore_errors=True)


class StoreWriter:
    """Write a store clip by clip, holding one clip in memory.

    Use as a context manager: clips go in with :meth:`put` in order ``0 .. n_clips-1``, then
    :meth:`commit` publishes them. Leaving the block without a commit (an error, Ctrl-C)
    removes the half-written version and leaves the previous store as it was.

    Raises
    ------
    OutputError
        The folder cannot be created or written (read-only, a file in the way, disk full), or
        holds other files than a store.
    """

    def __init__(self, dest: Path, *, n_clips: int, rows: dict[str, int], frames: int,
                 patches: Optional[int] = None, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dest = Path(dest)
        self.n_clips, self.frames = int(n_clips), int(frames)
        # the views in model order; the pretrained one (if any) counts patches, not frames
        self.rows = {k: int(rows[k]) for k in ALL_KEYS if k in rows}
        self.keys = tuple(self.rows)
        if (PRETRAINED_KEY in self.rows) != (patches is not None):
            raise ValueError("patches is the pretrained view's width: give it with that view only")
        self.patches = None if patches is None else int(patches)
        self.width = {k: self.patches if k == PRETRAINED_KEY else self.frames for k in self.keys}
        self.dtype = np.dtype(dtype)
        self._header: dict[str, int] = {}      # view -> bytes before the first clip
        self._filled: set[int] = set()
        self.version = f"v.{os.getpid()}.{os.urandom(4).hex()}"
        self.folder: Optional[Path] = None
        self._files: dict[str, Any] = {}
        self._lock: Optional[contextlib.ExitStack] = None
        self._next = 0

    def _fail(self, exc: OSError) -> OutputError:
        return OutputError(f"{self.dest}: cannot write the feature store ({os_error_reason(exc)})")

    def __enter__(self) -> "StoreWriter":
        check_destination(self.dest)
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
            self._lock = contextlib.ExitStack()
            self._lock.enter_context(_exclusive(self.dest))
            check_destination(self.dest)            # as another writer may have left it
            remove_stale_temps(self.dest)           # a meta.json write that was killed
            _remove_other_versions(self.dest, keep=_current_version(self.dest))
            self.folder = self.dest / self.version
            self.folder.mkdir()
            for key in self.keys:
                fh = self._files[key] = open(self.folder / f"{key}.npy", "w+b")
                np.lib.format.write_array_header_1_0(fh, self._header_dict(key, self.n_clips))
                self._header[key] = fh.tell()
                # preallocated (sparse where the file system allows): clips may arrive in any
                # order (put_at), as a cluster's workers finish them
                fh.truncate(self._header[key] + self.n_clips * self._clip_bytes(key))
        except OSError as exc:
            self._abort()
            raise self._fail(exc) from None
        except BaseException:
            self._abort()
            raise
        return self

    def _header_dict(self, key: str, n_clips: int) -> dict[str, Any]:
        return {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                "shape": (n_clips, self.rows[key], self.width[key])}

    def _clip_bytes(self, key: str) -> int:
        return self.rows[key] * self.width[key] * self.dtype.itemsize

    def put(self, features: dict[str, np.ndarray]) -> None:
        """Write the next clip (``put_at`` the first index not yet given)."""
        while self._next in self._filled:
            self._next += 1
        self.put_at(self._next, features)

    def put_at(self, index: int, features: dict[str, np.ndarray]) -> None:
        """Write clip ``index``: its views, padded with their minimum or trimmed to the
        store's frames (patches for the pretrained view), stored in the writer's dtype.

        Raises
        ------
        FeaturesFileError
            A view has the wrong number of rows or holds NaN or infinite values.
        """
        if not 0 <= index < self.n_clips or index in self._filled:
            raise ValueError(f"clip {index}: outside the store's {self.n_clips} clips or given twice")
        self._next = index
        block: dict[str, np.ndarray] = {}
        for key in self.keys:
            a = np.asarray(features[key], dtype=np.float32)
            if a.ndim != 2 or a.shape[0] != self.rows[key] or a.shape[1] == 0:
                raise FeaturesFileError(f"{self.dest}: clip {self._next}: {key} has shape {a.shape}, "
                                        f"the store {self.rows[key]} rows")
            if not np.isfinite(a).all():
                raise FeaturesFileError(f"{self.dest}: clip {self._next}: {key} holds NaN or infinite values")
            out = np.empty((self.rows[key], self.width[key]), self.dtype)
            m = min(self.width[key], a.shape[1])
            out[:, :m] = a[:, :m]
            out[:, m:] = a.min()
            block[key] = out
        try:
            for key in self.keys:
                fh = self._files[key]
                fh.seek(self._header[key] + index * self._clip_bytes(key))
                fh.write(block[key].tobytes())
        except OSError as exc:
            raise self._fail(exc) from None
        self._filled.add(index)

    def keep_only(self, indices: list[int]) -> None:
        """Drop every clip not in ``indices`` (sorted), moving the rest down in place: the
        clips that failed after their slots were allocated. Only the clips after the first
        gap move, one at a time."""
        indices = sorted(indices)
        if indices == list(range(self.n_clips)):
            return
        try:
            for key in self.keys:
                fh, size, start = self._files[key], self._clip_bytes(key), self._header[key]
                for target, source in enumerate(indices):
                    if target != source:
                        fh.seek(start + source * size)
                        data = fh.read(size)
                        fh.seek(start + target * size)
                        fh.write(data)
                fh.truncate(start + len(indices) * size)
                self._rewrite_header(fh, key, len(indices))
        except OSError as exc:
            raise self._fail(exc) from None
        self.n_clips = len(indices)
        self._filled = set(range(self.n_clips))

    def _rewrite_header(self, fh, key: str, n_clips: int) -> None:
        """The ``.npy`` header with a new clip count, padded to the same length (the data
        stays where it is, aligned as numpy wrote it)."""
        length = self._header[key]
        text = repr(self._header_dict(key, n_clips))
        body = text + " " * (length - 10 - len(text) - 1) + "\n"
        fh.seek(0)
        fh.write(b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1"))

    def commit(self, clips: list[dict[str, Any]], *, feature_config: Optional[dict] = None,
               source: str = "") -> None:
        """Publish the clips written so far (one atomic rename of ``meta.json``).

        ``clips`` holds one dict per clip with the fields of :data:`CLIP_FIELDS` it has.
        """
        if len(self._filled) != self.n_clips or len(clips) != self.n_clips:
            raise ValueError(f"{self.n_clips} clips announced, {len(self._filled)} written, "
                             f"{len(clips)} described")
        try:
            for fh in self._files.values():
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
        except OSError as exc:
            raise self._fail(exc) from None
        self._files = {}
        meta = {"format": FORMAT, "version": VERSION, "data": self.version,
                "n_clips": self.n_clips, "frames": self.frames, "rows": self.rows,
                **({} if self.patches is None else {"patches": self.patches}),
                "dtype": self.dtype.name,
                "feature_config": feature_config, "source": source,
                "clips": [{k: c[k] for k in CLIP_FIELDS if c.get(k) is not None} for c in clips]}
        with atomic_write(self.dest / META, "w") as fh:
            json.dump(meta, fh)
        self.folder = None                   # published: no longer ours to remove
        _remove_other_versions(self.dest, keep=self.version)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _abort(self) -> None:
        """Remove the unpublished version and release the lock, whatever fails on the way."""
        try:
            for fh in self._files.values():
                with contextlib.suppress(OSError):   # closing flushes: a full disk fails again
                    fh.close()
            self._files = {}
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
                self.folder = None
        finally:
            self._release()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._abort()


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
        raise bad("the three mel views must have the same number of bands")
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
