"""Writing a feature store: one new version folder per write, its arrays filled clip by clip
(memory-mapped, so a 100,000-track collection never sits in memory), made current by one
atomic rename of ``meta.json``; old versions go once no reader can be using them. The layout
and the reading side are :mod:`deepfusion.io.store`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np

from deepfusion.errors import FeaturesFileError, OutputError
from deepfusion.io.atomic import atomic_write, os_error_reason, remove_stale_temps
from deepfusion.io.lock import exclusive
from deepfusion.io.store import (CLIP_FIELDS, DTYPES, FORMAT, LOCK, META, VERSION, _current_version,
                                 _is_version_folder)
from deepfusion.views import ALL_KEYS, PRETRAINED_KEY


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
