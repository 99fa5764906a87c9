"""A model's outputs per file, kept in the feature cache: predict or embed run again over the
same library with the same model runs the network only on files it has not seen.

An entry holds what :mod:`deepfusion.predict` averages for one file: the sums over its windows
of one model's logits, modality attention and embedding, and the frames per window. It lives
in the feature cache's namespace (the features it was computed from) under
``outputs/<model id>/<key[:2]>/<key>-<windows>.npz``, where ``key`` is the file's content hash.
The model id (:func:`model_id`) names the model file's SHA-256, the engine, the device kind and
the precision, so another or a retrained model, or a run on another kind of device or in
another precision, never reads an entry it did not write. Entries are written atomically; one
that cannot be read back (the zip's CRC-32 covers every array), or has other arrays, shapes or
values that are not finite, is counted as damaged, computed again and replaced.

A model file is hashed once: :class:`ModelIds` remembers its SHA-256 by its stat (device,
inode, size, modification and change times) in ``model-ids.json`` under the cache folder, so a
run on a ResNet-50's ``best.pth`` (90 MB) does not read it all again to find its entries; a
file written since (a new stat) is hashed again.

No torch here: the onnx engine uses it too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from deepfusion.io.cache import FeatureCache, file_digest, file_stamp

_FIELDS = ("logits", "attention", "embedding", "frames")


def model_id(path: Union[str, Path, bytes], *parts: str,
             stamp: Optional[tuple[int, ...]] = None,
             ids: Optional["ModelIds"] = None) -> Optional[str]:
    """The identity of a model file (or its bytes) run as ``parts`` (engine, device kind,
    precision), or None when it cannot be told: then nothing is kept. ``stamp``: the file's
    :func:`~deepfusion.io.cache.file_stamp` when it was loaded; a file changed since then (or
    while it was hashed) has no identity. ``ids``: the digests known by stamp (the file is
    read only when its stamp is not there, and its digest is then added)."""
    import hashlib

    try:
        if isinstance(path, bytes):
            digest = hashlib.sha256(path).hexdigest()
        else:
            before = file_stamp(Path(path)) if stamp is None else stamp
            digest = ids.get(before) if ids is not None else None
            if digest is None:
                digest = file_digest(Path(path))
            if file_stamp(Path(path)) != before:
                return None
            if ids is not None:
                ids.add(before, digest)
    except OSError:
        return None
    tail = "-".join(p.replace("/", "_").replace(":", "_") for p in parts)
    return f"{digest[:32]}-{tail}" if tail else digest[:32]


class ModelIds:
    """The SHA-256 of model files by their stamp (:func:`~deepfusion.io.cache.file_stamp`),
    kept in ``cache_dir/model-ids.json`` between runs.

    A file whose stamp is listed is not read again; one written since has another stamp (its
    change time moves on any write) and is hashed again. New digests are kept in memory until
    :meth:`save` (a run refused before it starts writes nothing). The file holds at most
    :attr:`LIMIT` entries, the newest; a damaged one reads as empty and is replaced, and one
    that cannot be written only costs the next run a hash.
    """

    NAME = "model-ids.json"
    #: entries kept: each is one line of about 140 bytes
    LIMIT = 256
    #: bytes read at most (a file larger than that is not ours: it reads as empty)
    MAX_BYTES = 1 << 16

    def __init__(self, cache_dir: Union[str, Path]):
        self.path = Path(cache_dir) / self.NAME
        self._known = self._read()
        self._new: dict[str, str] = {}

    def _read(self) -> dict[str, str]:
        import json

        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.loads(fh.read(self.MAX_BYTES))
            entries = data["ids"]
            return {k: v for k, v in entries.items()
                    if isinstance(k, str) and isinstance(v, str) and len(v) == 64
                    and all(c in "0123456789abcdef" for c in v)}
        except Exception:  # noqa: BLE001 - absent, cut short, not ours: hash again
            return {}

    @staticmethod
    def _key(stamp: tuple[int, ...]) -> str:
        return ":".join(str(int(x)) for x in stamp)

    def get(self, stamp: tuple[int, ...]) -> Optional[str]:
        """The digest of the file that had ``stamp``, or None (not known)."""
        key = self._key(stamp)
        return self._new.get(key) or self._known.get(key)

    def add(self, stamp: tuple[int, ...], digest: str) -> None:
        if self.get(stamp) != digest:
            self._new[self._key(stamp)] = digest

    def save(self) -> None:
        """Write the digests added since this was read (atomically; newest kept)."""
        if not self._new:
            return
        import json

        from deepfusion.errors import OutputError
        from deepfusion.io.atomic import atomic_write

        merged = {**self._read(), **self._new}      # another run's additions meanwhile
        for key in list(merged)[:-self.LIMIT]:
            del merged[key]
        try:
            with atomic_write(self.path, "w") as fh:
                json.dump({"format": 1, "ids": merged}, fh, indent=0)
        except (OSError, OutputError):
            return
        self._known, self._new = merged, {}


class OutputsMemo:
    """One model's entries under ``cache``'s namespace (nothing kept when ``model`` is None).

    ``shapes``: ``(n_classes, embedding width, views)`` (width 0: not known; views: the
    attention's width, 6 or 7); an entry of other shapes is not used.
    """

    def __init__(self, cache: FeatureCache, model: Optional[str], shapes: tuple[int, int, int]):
        self.root = None if model is None else cache.root / "outputs" / model
        self.shapes = shapes
        #: entries found damaged by :meth:`get` (computed again by the caller, then :meth:`put`)
        self.damaged = 0

    def _path(self, key: str, windows: int) -> Path:
        return self.root / key[:2] / f"{key}-{int(windows)}.npz"

    def get(self, key: str, windows: int) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
        """``(logit sum, attention sum, embedding sum, frames)`` of the file ``key`` of
        ``windows`` windows, float64; None when not kept, or damaged (then counted in
        :attr:`damaged`)."""
        if self.root is None:
            return None
        path = self._path(key, windows)
        try:
            with np.load(path, allow_pickle=False) as npz:
                if set(npz.files) != set(_FIELDS):
                    raise ValueError("other arrays")
                logits, attention, embedding, frames = (npz[k] for k in _FIELDS)
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - damaged, a forged header: compute again
            self.damaged += os.path.lexists(path)
            return None
        n_classes, width, views = self.shapes
        if (logits.shape != (n_classes,) or attention.shape != (views,) or embedding.ndim != 1
                or (width and embedding.shape != (width,)) or frames.shape != ()
                or frames.dtype.kind not in "iu" or not 0 < int(frames) < 2**31
                or not all(a.dtype.kind == "f" and np.isfinite(a).all()
                           for a in (logits, attention, embedding))):
            self.damaged += 1
            return None
        return (logits.astype(np.float64), attention.astype(np.float64),
                embedding.astype(np.float64), int(frames))

    def put(self, key: str, windows: int, logits: np.ndarray, attention: np.ndarray,
            embedding: np.ndarray, frames: int) -> None:
        """Keep one file's sums (atomically; a failure to write only costs the next run time)."""
        if self.root is None:
            return
        from deepfusion.errors import OutputError
        from deepfusion.io.atomic import atomic_write

        path = self._path(key, windows)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as fh:
                np.savez(fh, logits=np.asarray(logits, np.float64),
                         attention=np.asarray(attention, np.float64),
                         embedding=np.asarray(embedding, np.float64), frames=np.asarray(int(frames)))
        except (OSError, OutputError):
            pass
