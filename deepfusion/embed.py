"""Clip embeddings for similarity search and clustering: what the classifier sees, per file.

For every readable file, the fused clip embedding (the input of the classifier, the mean over
the file's windows and their segments), the per-modality attention and the model's top-1
genre. Files go through the same cache, workers and error handling as ``predict``
(:class:`deepfusion.inference.library.Library`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from deepfusion.config import DEFAULT_CACHE_DIR
from deepfusion.inference.library import Library, Prediction
from deepfusion.views import ALL_KEYS


@dataclass
class Embeddings:
    """The arrays ``embed --out`` writes (one row per readable file, in input order)."""

    paths: np.ndarray            # (n,) str
    embeddings: np.ndarray       # (n, d) float32
    attention: np.ndarray        # (n, M) float32, columns in the model's view order, rows sum to 1
    genres: np.ndarray           # (n,) str, the model's top-1
    probabilities: np.ndarray    # (n, n_classes) float32, columns in class_names order
    class_names: np.ndarray      # (n_classes,) str
    errors: list[tuple[str, str]] = field(default_factory=list)   # (path, reason) not embedded
    computed: int = 0            # windows whose features were computed (not cached)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"paths": self.paths, "embeddings": self.embeddings, "attention": self.attention,
                "genres": self.genres, "probabilities": self.probabilities,
                "class_names": self.class_names,
                "modalities": np.array(ALL_KEYS[:self.attention.shape[1]])}

    def save(self, out: Path) -> None:
        """Write an ``.npz`` atomically (``np.load(out)`` reads it without pickle)."""
        from deepfusion.io.atomic import atomic_write

        with atomic_write(Path(out)) as fh:
            np.savez(fh, **self.arrays())


def collect(results: Iterable[Union[Prediction, tuple[str, str]]], class_names: list[str],
            dim: int) -> Embeddings:
    """Stack the outputs of :meth:`Library.run` into :class:`Embeddings`."""
    paths, emb, att, probs, errors, computed = [], [], [], [], [], 0
    for r in results:
        if isinstance(r, tuple):
            errors.append(r)
            continue
        paths.append(r.path)
        emb.append(r.embedding)
        att.append(r.attention)
        probs.append([r.probabilities[g] for g in class_names])
        computed += r.computed
    n = len(paths)
    return Embeddings(
        paths=np.array(paths, dtype=str),
        embeddings=np.array(emb, np.float32).reshape(n, dim),
        attention=np.array(att, np.float32).reshape(n, len(att[0]) if att else 0),
        genres=np.array([class_names[int(np.argmax(p))] for p in probs], dtype=str),
        probabilities=np.array(probs, np.float32).reshape(n, len(class_names)),
        class_names=np.array(class_names, dtype=str), errors=errors, computed=computed)


def embed(inputs: Iterable[Union[str, Path]], *, checkpoint: Path, engine: str = "torch",
          device: str = "auto", cache_dir: Path = DEFAULT_CACHE_DIR, jobs: Optional[int] = None,
          timeout: Optional[float] = 120.0, quiet: bool = True,
          out: Optional[Path] = None, adapt: str = "none", overwrite: bool = False) -> Embeddings:
    """Embeddings, attention and top-1 genre of every audio file in ``inputs`` (files and
    folders), the arrays ``deepfusion embed`` writes; ``out`` also writes them (``.npz``).

    Raises
    ------
    CheckpointError, OutputError
        The model cannot be loaded; ``out`` is an input, an existing file other than an
        embeddings ``.npz`` (unless ``overwrite``), or cannot be written; the cache cannot be
        written (all before any work).
    """
    from deepfusion.io.guard import Destination

    library = Library(inputs, checkpoints=[Path(checkpoint)], engine=engine, device=device,
                      cache_dir=cache_dir, adapt=adapt, overwrite=overwrite,
                      destinations=[Destination(Path(out), "--out", "embeddings")] if out else ())
    result = collect(library.run(jobs=jobs, timeout=timeout, quiet=quiet), library.class_names,
                     library.engines[0].embedding_dim)
    if out is not None:
        result.save(Path(out))
    return result
