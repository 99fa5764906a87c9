"""The identity of a model file: :func:`model_id` names the outputs a model run keeps in the
cache (:class:`~deepfusion.io.cache.OutputsCache`), so another or a retrained model, or a run
on another kind of device or in another precision, never reads an entry it did not write.

A model file is hashed once: :class:`ModelIds` remembers its SHA-256 by its stat (device,
inode, size, modification and change times) in ``model-ids.json`` under the cache folder, so a
run on a ResNet-50's ``best.pth`` (90 MB) does not read it all again to find its entries; a
file written since (a new stat) is hashed again.

No torch here: the onnx engine uses it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from deepfusion.io.cache import file_digest, file_stamp


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
