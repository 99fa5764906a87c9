"""The on-disk per-clip feature cache that extract fills and reuses.

Cache layout::

    CACHE_DIR/features-<fingerprint>/config.json      the FeatureConfig, for humans
    CACHE_DIR/features-<fingerprint>/ab/abcdef....npz one clip: its views + metadata

``<fingerprint>`` hashes the :class:`FeatureConfig` and the feature-code version; the entry
name is the SHA-256 of the audio file's bytes. So the key is everything a result depends on:
renaming or copying a file reuses its entry, changing a parameter or the feature code starts a
new namespace, and identical files are computed once. Entries are written atomically, so an
interrupted run never leaves a corrupt one. An entry damaged later (a full disk, a killed
copy, bit rot: the zip's CRC-32 covers every array) or written by other code under the key
(other arrays, shapes or dtypes, values that are not finite) reads as damaged: every reader
computes it again and replaces it atomically (:meth:`FeatureCache.check`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

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


class FeatureCache:
    """Per-clip features under ``cache_dir``, keyed by file content and feature config."""

    def __init__(self, cache_dir: Path, config: FeatureConfig):
        self.config = config
        self.root = Path(cache_dir) / f"features-{config.fingerprint()}"

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

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def has(self, key: str) -> bool:
        """Whether an entry file exists (not whether it is sound: see :meth:`check`)."""
        return self.path(key).is_file()

    def check(self, key: str) -> str:
        """:data:`VALID` (loads and matches this namespace), :data:`MISSING` or
        :data:`DAMAGED` (a file that does not load: compute it again and :meth:`store` it)."""
        if self.load(key) is not None:
            return VALID
        return DAMAGED if os.path.lexists(self.path(key)) else MISSING

    def load(self, key: str) -> Optional[CacheEntry]:
        """The entry for ``key``, or ``None`` when absent or damaged (then recompute it)."""
        path = self.path(key)
        try:
            with np.load(path, allow_pickle=False) as npz:
                if set(npz.files) != {*self.config.keys, _META}:
                    return None     # other arrays: written by other code under this key
                features = {k: npz[k] for k in self.config.keys}   # every array's CRC-32 checked
                meta = json.loads(str(npz[_META]))
        except Exception:  # noqa: BLE001 - a damaged .npy header even raises tokenize.TokenError
            return None
        if not isinstance(meta, dict) or not _META_KEYS <= set(meta) \
                or not isinstance(meta["audio_sha"], str):
            return None
        shapes = self.config.feature_shapes()
        if any(a.shape != shapes[k] or a.dtype != np.float32 or not np.isfinite(a).all()
               for k, a in features.items()):
            return None      # written by other code under this key, or damaged: recompute
        return CacheEntry(features, meta)

    def store(self, key: str, features: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Write one entry atomically."""
        arrays = {k: np.asarray(features[k], dtype=np.float32) for k in self.config.keys}
        arrays[_META] = np.array(json.dumps(meta, sort_keys=True))
        with atomic_write(self.path(key)) as fh:
            np.savez(fh, **arrays)
