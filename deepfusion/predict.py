"""The predict stage: genre predictions for a library of audio files, printed or written to a
CSV as they come (:class:`PredictionsCSV`: one row per file, flushed, so a killed run keeps
what it classified). The work is :class:`~deepfusion.inference.library.Library`'s (also
importable from here): features through the cache, windows of long files, ensembles, the
torch or onnx engine.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

from deepfusion.config import DEFAULT_CACHE_DIR
from deepfusion.inference.library import Library, Prediction


def predict(inputs: Iterable[Union[str, Path]], *, checkpoint: Union[Path, Sequence[Path]],
            top_k: int = 3, device: str = "auto", engine: str = "torch",
            cache_dir: Path = DEFAULT_CACHE_DIR, jobs: Optional[int] = None,
            timeout: Optional[float] = 120.0, quiet: bool = True, adapt: str = "auto",
            ) -> Iterator[Union[Prediction, tuple[str, str]]]:
    """Yield a :class:`Prediction` (its ``top`` cut to ``top_k``) per readable file, or
    ``(path, reason)`` for the others; see :class:`Library`."""
    checkpoints = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    library = Library(inputs, checkpoints=checkpoints, engine=engine, device=device,
                      cache_dir=cache_dir, adapt=adapt)
    for result in library.run(jobs=jobs, timeout=timeout, quiet=quiet):
        if isinstance(result, Prediction):
            result.top = result.top[:max(1, top_k)]
        yield result


class PredictionsCSV:
    """``--out predictions.csv``: one row per input file, written to a temporary file and
    renamed into place when the run ends (an interrupted run leaves the old file as it was).

    Columns: ``path``, ``genre`` (top-1), ``probability`` (its probability), one column per
    genre with its probability, and ``error`` (the reason a file could not be classified; its
    other columns are empty). Quoted as needed: names may hold commas, quotes and newlines;
    bytes of names that are not UTF-8 are written as ``\\xNN``.
    """

    FIXED = ("path", "genre", "probability")

    def __init__(self, out: Path, class_names: Sequence[str]):
        from deepfusion.io.atomic import atomic_write

        self.class_names = list(class_names)
        columns = [g if g not in self.FIXED + ("error",) else f"{g} (probability)"
                   for g in self.class_names]
        self._context = atomic_write(Path(out), "w")
        self._fh = self._context.__enter__()
        self._writer = csv.writer(self._fh, lineterminator="\n")
        self._writer.writerow([*self.FIXED, *columns, "error"])
        self.rows = 0

    def add(self, result: Union[Prediction, tuple[str, str]]) -> None:
        from deepfusion.io.names import escape_bytes

        if isinstance(result, Prediction):
            genre, p = max(result.probabilities.items(), key=lambda kv: kv[1])
            row = [escape_bytes(result.path), genre, f"{p:.6f}",
                   *(f"{result.probabilities[g]:.6f}" for g in self.class_names), ""]
        else:
            row = [escape_bytes(result[0]), "", "", *([""] * len(self.class_names)),
                   escape_bytes(result[1])]
        self._writer.writerow(row)
        self.rows += 1

    def close(self, exc: Optional[BaseException] = None) -> None:
        """Rename into place (``exc`` None) or remove the temporary file."""
        if exc is None:
            self._context.__exit__(None, None, None)
        else:
            self._context.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> "PredictionsCSV":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)
