"""The one on-disk cache: per-clip features (extract fills it, every stage reuses it) and, beside
them, per-file outputs of each model (predict and embed run a network only on files it has
not seen).

Cache layout::

    CACHE_DIR/features-<fingerprint>/config.json      the FeatureConfig, for humans
    CACHE_DIR/features-<fingerprint>/ab/abcdef....npz one clip: its views + metadata
    CACHE_DIR/features-<fingerprint>/outputs/<model id>/ab/abcdef...-<windows>.npz
                                                      one file's sums of one model's outputs
    CACHE_DIR/model-ids.json                          model files' digests (io/model_ids.py)

Every entry has one format (:class:`Entries`): a zip of named float arrays and a JSON
``__meta__``, written atomically; and one validation: an entry that does not load, holds other
arrays or metadata, arrays of other shapes or values that are not finite reads as damaged, is
computed again and replaced.

``<fingerprint>`` hashes the :class:`FeatureConfig` and the feature-code version; the entry
name is the SHA-256 of the audio file's bytes. So the key is everything a result depends on:
renaming or copying a file reuses its entry, changing a parameter or the feature code starts a
new namespace, and identical files are computed once. Entries are written atomically, so an
interrupted run never leaves a corrupt one. An entry damaged later (a full disk, a killed
copy, bit rot: the zip's CRC-32 covers every array) or written by other code under the key
(other arrays, shapes or dtypes, values that are not finite) reads as damaged: every reader
computes it again and replaces it atomically (:meth:`FeatureCache.check`).

An outputs entry holds what :mod:`deepfusion.inference.library` averages for one file: the sums over
its windows of one model's logits, modality attention and embedding, and the frames per
window (in ``__meta__``). The model id (:func:`~deepfusion.io.model_ids.model_id`) names the
model file's SHA-256, the engine, the device kind and the precision, so another model, device
kind or precision never reads an entry it did not write. No torch here: the onnx engine uses
it too.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from deepfusion.config import FeatureConfig
from deepfusion.errors import OutputError
from deepfusion.io.atomic import atomic_write, remove_stale_temps

_META = "__meta__"
_META_KEYS = {"audio_sha", "source_sr", "channels", "source_seconds"}
#: What :meth:`FeatureCache.check` says of an entry.
MISSING, VALID, DAMAGED = "missing", "valid", "damaged"


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:  # hashlib.file_digest would do, but needs Python 3.11
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_stamp(path: Path) -> tuple[int, ...]:
    """What changes whenever a file is written or replaced: device, inode, size, modification
    and change times (the change time moves on any write and cannot be set back by users).

    Raises
    ------
    OSError
    """
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def stamp_or_none(path: Union[str, Path]) -> Optional[tuple[int, ...]]:
    """:func:`file_stamp`, or None when the file cannot be stat'ed (gone, unreadable)."""
    try:
        return file_stamp(Path(path))
    except OSError:
        return None


def audio_digest(y: np.ndarray) -> str:
    """A hash of decoded samples: equal for the same audio in different files or formats."""
    return hashlib.sha256(np.ascontiguousarray(y, dtype=np.float32).tobytes()).hexdigest()[:32]


@dataclass
class CacheEntry:
    """One cached clip."""

    features: dict[str, np.ndarray]   # the config's views, float32 (rows, frames)
    meta: dict[str, Any]              # audio_sha, source_sr, channels, source_seconds


class Entries:
    """Entries under one folder, ``<root>/<name[:2]>/<name>.npz``: the one entry format,
    its validation and its atomic write."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name[:2] / f"{name}.npz"

    def read(self, name: str, arrays: Any, meta_keys: set[str],
             sound: Callable[[dict[str, np.ndarray], dict[str, Any]], bool]
             ) -> tuple[str, Optional[dict[str, np.ndarray]], Optional[dict[str, Any]]]:
        """``(VALID, arrays, meta)``, or ``(MISSING | DAMAGED, None, None)``. Sound: exactly the
        ``arrays`` named, finite floats, a ``__meta__`` object with ``meta_keys``, and
        ``sound(arrays, meta)`` (shapes, types)."""
        path = self.path(name)
        try:
            with np.load(path, allow_pickle=False) as npz:
                if set(npz.files) != {*arrays, _META}:
                    raise ValueError("other arrays: written by other code under this name")
                found = {k: npz[k] for k in arrays}     # every array's CRC-32 checked
                meta = json.loads(str(npz[_META]))
        except FileNotFoundError:
            return MISSING, None, None
        except Exception:  # noqa: BLE001 - a damaged .npy header even raises tokenize.TokenError
            return (DAMAGED if os.path.lexists(path) else MISSING), None, None
        if (not isinstance(meta, dict) or not meta_keys <= set(meta)
                or not all(a.dtype.kind == "f" and np.isfinite(a).all() for a in found.values())
                or not sound(found, meta)):
            return DAMAGED, None, None
        return VALID, found, meta

    def write(self, name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Write one entry atomically (its folder made first)."""
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as fh:
            np.savez(fh, **arrays, **{_META: np.array(json.dumps(meta, sort_keys=True))})


class FeatureCache(Entries):
    """Per-clip features under ``cache_dir``, keyed by file content and feature config."""

    def __init__(self, cache_dir: Path, config: FeatureConfig):
        super().__init__(Path(cache_dir) / f"features-{config.fingerprint()}")
        self.config = config

    def prepare(self) -> None:
        """Create the namespace folder, record its config and clear dead writers' leftovers.

        Raises
        ------
        OutputError
            The cache folder cannot be created (read-only, a file in the way); checked
            before any work.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.root}: cannot create the feature cache folder "
                              f"({os.strerror(exc.errno) if exc.errno else exc}); "
                              "choose another --cache-dir") from None
        cfg = self.root / "config.json"
        if not cfg.exists():
            with atomic_write(cfg, "w") as fh:
                json.dump(self.config.to_dict(), fh, indent=2, sort_keys=True)
        remove_stale_temps(self.root, recursive=True)

    def has(self, key: str) -> bool:
        """Whether an entry file exists (not whether it is sound: see :meth:`check`)."""
        return self.path(key).is_file()

    def _read(self, key: str):
        shapes = self.config.feature_shapes()
        return self.read(key, self.config.keys, _META_KEYS, lambda arrays, meta: (
            isinstance(meta["audio_sha"], str)
            and all(a.shape == shapes[k] and a.dtype == np.float32 for k, a in arrays.items())))

    def check(self, key: str) -> str:
        """:data:`VALID` (loads and matches this namespace), :data:`MISSING` or
        :data:`DAMAGED` (a file that does not load: compute it again and :meth:`store` it)."""
        return self._read(key)[0]

    def load(self, key: str) -> Optional[CacheEntry]:
        """The entry for ``key``, or ``None`` when absent or damaged (then recompute it)."""
        state, features, meta = self._read(key)
        return CacheEntry(features, meta) if state == VALID else None

    def store(self, key: str, features: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Write one entry atomically."""
        self.write(key, {k: np.asarray(features[k], dtype=np.float32) for k in self.config.keys},
                   meta)


_OUTPUTS = ("logits", "attention", "embedding")


class OutputsCache(Entries):
    """One model's entries beside ``cache``'s features (nothing kept when ``model`` is None).

    ``shapes``: ``(n_classes, embedding width, views)`` (width 0: not known; views: the
    attention's width, 6 or 7); an entry of other shapes reads as damaged.
    """

    def __init__(self, cache: FeatureCache, model: Optional[str], shapes: tuple[int, int, int]):
        super().__init__(cache.root / "outputs" / str(model))
        self.model = model
        self.shapes = shapes
        #: entries found damaged by :meth:`get` (computed again by the caller, then :meth:`put`)
        self.damaged = 0

    def _sound(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bool:
        n_classes, width, views = self.shapes
        logits, attention, embedding = (arrays[k] for k in _OUTPUTS)
        frames = meta["frames"]
        return (logits.shape == (n_classes,) and attention.shape == (views,)
                and embedding.ndim == 1 and (not width or embedding.shape == (width,))
                and type(frames) is int and 0 < frames < 2**31)

    def get(self, key: str, windows: int) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
        """``(logit sum, attention sum, embedding sum, frames)`` of the file ``key`` of
        ``windows`` windows, float64; None when not kept, or damaged (then counted in
        :attr:`damaged`)."""
        if self.model is None:
            return None
        state, arrays, meta = self.read(f"{key}-{int(windows)}", _OUTPUTS, {"frames"}, self._sound)
        self.damaged += state == DAMAGED
        if state != VALID:
            return None
        return (*(arrays[k].astype(np.float64) for k in _OUTPUTS), meta["frames"])

    def put(self, key: str, windows: int, logits: np.ndarray, attention: np.ndarray,
            embedding: np.ndarray, frames: int) -> None:
        """Keep one file's sums (atomically; a failure to write only costs the next run time)."""
        if self.model is None:
            return
        arrays = dict(zip(_OUTPUTS, (np.asarray(a, np.float64) for a in (logits, attention, embedding))))
        try:
            self.write(f"{key}-{int(windows)}", arrays, {"frames": int(frames)})
        except (OSError, OutputError):
            pass
