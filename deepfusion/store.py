"""The feature store: a folder of ``.npy`` arrays that train and evaluate memory-map.

A features pickle must be read whole into RAM (GTZAN's is about 4 GB); a store is mapped, so
the operating system pages clips in as batches need them and can drop them again: collections
larger than RAM train, and worker processes share one copy. Layout::

    features.store/
        meta.json                 what the arrays hold, and which version folder holds them
        v.<pid>.<hex>/            float32 arrays (n_clips, rows, frames), one per view:
            mel_spec_orig.npy  mel_spec_harm.npy  mel_spec_perc.npy
            mfcc.npy  chroma.npy  tempogram.npy

A write fills a new version folder with plain sequential writes (a full disk is an error, not a
crash) and then replaces ``meta.json`` with one atomic rename: a reader sees the old store or
the new one, never a mix, and a write killed half-way leaves a folder that the next write
removes. Version folders of writers that still run are left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .config import FEATURE_KEYS, MEL_KEYS
from .errors import FeaturesFileError, OutputError
from .fileio import atomic_write, os_error_reason, pid_alive, remove_stale_temps

FORMAT = "deepfusion-feature-store"
VERSION = 1
META = "meta.json"
_VERSION_RE = re.compile(r"^v\.(\d+)\.[0-9a-f]{8}$")
#: per-clip fields kept in meta.json (the pickle's item keys other than 'features')
CLIP_FIELDS = ("path", "label", "group", "duplicate_group", "file_sha", "audio_sha",
               "source_sr", "channels", "source_seconds")


def is_store(path: Path) -> bool:
    """Whether ``path`` is a store folder (anything else is read as a features pickle)."""
    return Path(path).is_dir()


_WRITING: set[str] = set()   # version folders this process is writing now


def _remove_dead_versions(root: Path, keep: Optional[str]) -> None:
    """Delete version folders other than ``keep`` that no writer is filling any more."""
    for child in root.iterdir():
        match = _VERSION_RE.match(child.name)
        if not match or child.name == keep or child.name in _WRITING or not child.is_dir():
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or not pid_alive(pid):
            shutil.rmtree(child, ignore_errors=True)


def _current_version(root: Path) -> Optional[str]:
    try:
        with open(root / META, encoding="utf-8") as fh:
            version = json.load(fh).get("data")
    except (OSError, ValueError, AttributeError):
        return None
    return version if isinstance(version, str) else None


class StoreWriter:
    """Write a store clip by clip, holding one clip in memory.

    Use as a context manager: clips go in with :meth:`put` in order ``0 .. n_clips-1``, then
    :meth:`commit` publishes them. Leaving the block without a commit (an error, Ctrl-C)
    removes the half-written version and leaves the previous store as it was.

    Raises
    ------
    OutputError
        The folder cannot be created or written (read-only, a file in the way, disk full).
    """

    def __init__(self, dest: Path, *, n_clips: int, rows: dict[str, int], frames: int):
        self.dest = Path(dest)
        self.n_clips, self.rows, self.frames = int(n_clips), dict(rows), int(frames)
        self.version = f"v.{os.getpid()}.{os.urandom(4).hex()}"
        self.folder = self.dest / self.version
        self._files: dict[str, Any] = {}
        self._next = 0

    def _fail(self, exc: OSError) -> OutputError:
        return OutputError(f"{self.dest}: cannot write the feature store ({os_error_reason(exc)})")

    def __enter__(self) -> "StoreWriter":
        if self.dest.exists() and not self.dest.is_dir():
            raise OutputError(f"{self.dest}: is a file, not a feature store folder; "
                              "choose another --out or --format pickle")
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.dest)            # a meta.json write that was killed
            _remove_dead_versions(self.dest, keep=_current_version(self.dest))
            self.folder.mkdir()
            _WRITING.add(self.version)
            for key in FEATURE_KEYS:
                fh = self._files[key] = open(self.folder / f"{key}.npy", "wb")
                np.lib.format.write_array_header_1_0(fh, {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                    "fortran_order": False,
                    "shape": (self.n_clips, self.rows[key], self.frames)})
        except OSError as exc:
            self._abort()
            raise self._fail(exc) from None
        except BaseException:
            self._abort()
            raise
        return self

    def put(self, features: dict[str, np.ndarray]) -> None:
        """Append the next clip: the six views, padded with their minimum or trimmed to
        ``frames`` frames.

        Raises
        ------
        FeaturesFileError
            A view has the wrong number of rows or holds NaN or infinite values.
        """
        if self._next >= self.n_clips:
            raise ValueError(f"store holds {self.n_clips} clips; one more was given")
        block: dict[str, np.ndarray] = {}
        for key in FEATURE_KEYS:
            a = np.asarray(features[key], dtype=np.float32)
            if a.ndim != 2 or a.shape[0] != self.rows[key] or a.shape[1] == 0:
                raise FeaturesFileError(f"{self.dest}: clip {self._next}: {key} has shape {a.shape}, "
                                        f"the store {self.rows[key]} rows")
            if not np.isfinite(a).all():
                raise FeaturesFileError(f"{self.dest}: clip {self._next}: {key} holds NaN or infinite values")
            out = np.empty((self.rows[key], self.frames), np.float32)
            m = min(self.frames, a.shape[1])
            out[:, :m] = a[:, :m]
            out[:, m:] = a.min()
            block[key] = out
        try:
            for key in FEATURE_KEYS:
                self._files[key].write(block[key].tobytes())
        except OSError as exc:
            raise self._fail(exc) from None
        self._next += 1

    def commit(self, clips: list[dict[str, Any]], *, feature_config: Optional[dict] = None,
               source: str = "") -> None:
        """Publish the clips written so far (one atomic rename of ``meta.json``).

        ``clips`` holds one dict per clip with the fields of :data:`CLIP_FIELDS` it has.
        """
        if self._next != self.n_clips or len(clips) != self.n_clips:
            raise ValueError(f"{self.n_clips} clips announced, {self._next} written, "
                             f"{len(clips)} described")
        try:
            for fh in self._files.values():
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
        except OSError as exc:
            raise self._fail(exc) from None
        meta = {"format": FORMAT, "version": VERSION, "data": self.version,
                "n_clips": self.n_clips, "frames": self.frames, "rows": self.rows,
                "feature_config": feature_config, "source": source,
                "clips": [{k: c[k] for k in CLIP_FIELDS if c.get(k) is not None} for c in clips]}
        with atomic_write(self.dest / META, "w") as fh:
            json.dump(meta, fh)
        self._files = {}
        _WRITING.discard(self.version)
        self.folder = None
        _remove_dead_versions(self.dest, keep=self.version)

    def _abort(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files = {}
        _WRITING.discard(self.version)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.folder is not None:
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
        raise FeaturesFileError(f"{root}: a folder without {META}, not a feature store") from None
    except (OSError, ValueError) as exc:
        raise FeaturesFileError(f"{root}: unreadable {META} ({exc})") from None

    def bad(why: str) -> FeaturesFileError:
        return FeaturesFileError(f"{root}: not a valid feature store ({why})")

    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise bad(f"{META} does not describe a {FORMAT}")
    if meta.get("version") != VERSION:
        raise bad(f"version {meta.get('version')!r}; this deepfusion reads version {VERSION}")
    if not isinstance(meta.get("data"), str) or not _VERSION_RE.match(meta["data"]):
        raise bad("'data' must name a version folder")
    n, frames, rows = meta.get("n_clips"), meta.get("frames"), meta.get("rows")
    if not (isinstance(n, int) and n > 0 and isinstance(frames, int) and frames > 0):
        raise bad("'n_clips' and 'frames' must be positive integers")
    if not isinstance(rows, dict) or set(rows) != set(FEATURE_KEYS) or \
            not all(isinstance(r, int) and r > 0 for r in rows.values()):
        raise bad(f"'rows' must give a positive row count for each of {', '.join(FEATURE_KEYS)}")
    if len({rows[k] for k in MEL_KEYS}) != 1:
        raise bad("the three mel views must have the same number of bands")
    clips = meta.get("clips")
    if not isinstance(clips, list) or len(clips) != n or not all(
            isinstance(c, dict) and isinstance(c.get("path"), str)
            and isinstance(c.get("label"), (str, int)) and not isinstance(c.get("label"), bool)
            for c in clips):
        raise bad(f"'clips' must list {n} clips, each with a path and a label")
    return meta


def open_arrays(root: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The six views of a store, memory-mapped read-only."""
    root = Path(root)
    arrays = {}
    for key in FEATURE_KEYS:
        path = root / meta["data"] / f"{key}.npy"
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise FeaturesFileError(f"{root}: {meta['data']}/{key}.npy is missing (the store "
                                    "changed while it was read, or was damaged; run extract again)") from None
        except (OSError, ValueError) as exc:
            raise FeaturesFileError(f"{root}: {meta['data']}/{key}.npy is unreadable ({exc})") from None
        expected = (meta["n_clips"], meta["rows"][key], meta["frames"])
        if arr.dtype != np.float32 or arr.shape != expected:
            raise FeaturesFileError(f"{root}: {key}.npy holds {arr.dtype} {arr.shape}, "
                                    f"{META} says float32 {expected}")
        arrays[key] = arr
    return arrays


def digest(root: Path) -> str:
    """SHA-256 over ``meta.json`` and the arrays it names: the store's identity."""
    from .cache import file_digest

    root = Path(root)
    meta = read_meta(root)
    h = hashlib.sha256()
    h.update(file_digest(root / META).encode())
    for key in FEATURE_KEYS:
        path = root / meta["data"] / f"{key}.npy"
        try:
            h.update(file_digest(path).encode())
        except OSError as exc:
            raise FeaturesFileError(f"{root}: {meta['data']}/{key}.npy is unreadable "
                                    f"({os_error_reason(exc)})") from None
    return h.hexdigest()
