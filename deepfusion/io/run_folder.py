"""A model folder holds one run: one writer at a time, and never replaced unasked.

Two ``train`` processes in one ``--model-dir`` would interleave ``best.pth`` of one run with
``last.pth`` and the history of the other; a new run in a folder that holds one would silently
replace it. :func:`claim_run_folder` holds the folder's lock (:mod:`deepfusion.io.lock`) for the
whole run and refuses, in one line, a folder that holds a run unless the call continues it
(``resume``) or replaces it (``overwrite``).

``overwrite`` never loses the old run to a new one that fails before its first checkpoint (a
bad option found after the claim, a kill): the old run's files are set aside in the folder
(:data:`ASIDE`), and removed only once the new run has written a checkpoint; a run that ends
without one puts them back, and so does the next claim after a ``kill -9``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from deepfusion.errors import OutputError, ParameterError
from deepfusion.io.atomic import check_writable, os_error_reason
from deepfusion.io.lock import exclusive

LOCK_NAME = ".deepfusion.lock"
#: Where ``overwrite`` keeps the old run until the new one has written a checkpoint.
ASIDE = ".replaced-run"
#: The files evaluate writes (by default beside the checkpoint, so into the run's folder).
REPORT_FILES = ("evaluation.json", "classification_report.csv", "predictions.csv",
                "confusion_matrix.png", "attention.png")
#: What a training run writes into its folder.
TRAIN_FILES = ("best.pth", "last.pth", "training_history.csv", "training_history.png")
#: What a run writes into its folder: train's, train --folds', then evaluate's.
RUN_FILES = (*TRAIN_FILES, "cross_validation.csv", "cross_validation_predictions.csv", *REPORT_FILES)
#: A run is in the folder when one of these is.
RUN_MARKERS = ("best.pth", "last.pth", "cross_validation.csv")
#: The kind (:data:`deepfusion.io.guard.KINDS`) of every file a run folder holds.
FILE_KINDS = {"best.pth": "checkpoint", "last.pth": "checkpoint",
              "training_history.csv": "history_csv", "training_history.png": "figure",
              "cross_validation.csv": "cross_validation",
              "cross_validation_predictions.csv": "cv_predictions",
              "evaluation.json": "evaluation", "classification_report.csv": "class_report",
              "predictions.csv": "eval_predictions", "confusion_matrix.png": "figure",
              "attention.png": "figure"}


def destinations(folder: Path, names=RUN_FILES) -> list:
    """``names`` in ``folder`` as :class:`~deepfusion.io.guard.Destination` s."""
    from deepfusion.io.guard import Destination

    return [Destination(Path(folder) / name, name, FILE_KINDS[name]) for name in names]


@contextlib.contextmanager
def claim_run_folder(folder: Path, *, resume: bool, overwrite: bool) -> Iterator[None]:
    """Hold ``folder`` for one run (see the module docstring).

    Raises
    ------
    ParameterError
        Both ``resume`` and ``overwrite``.
    OutputError
        The folder cannot be written, another process runs in it, or it holds a run that the
        call neither resumes nor overwrites.
    """
    if resume and overwrite:
        raise ParameterError("--resume continues the run in the folder, --overwrite replaces it: "
                             "give one of them")
    folder = Path(folder)
    check_writable(folder / RUN_MARKERS[0])
    with exclusive(folder / LOCK_NAME, wait=False, what="this model folder (a train run)"):
        _settle(folder)          # a replacing run killed before: the lock says it is dead
        present = [name for name in RUN_MARKERS if (folder / name).exists()]
        if not present or resume:
            yield
            return
        if not overwrite:
            raise OutputError(f"{folder}: holds a run ({', '.join(present)}); --resume "
                              "continues it, --overwrite replaces it, or give another "
                              "--model-dir")
        _move(_run_files(folder), folder, folder / ASIDE)
        try:
            yield
        finally:
            _settle(folder)


def _run_files(folder: Path) -> list[Path]:
    """The files of the run in ``folder`` (and of its folds) that exist, nothing else."""
    targets = [folder / name for name in RUN_FILES]
    targets += [sub / name for sub in sorted(folder.glob("fold-*")) if sub.is_dir()
                for name in RUN_FILES]
    return [p for p in targets if os.path.lexists(p)]


def _move(paths: list[Path], src: Path, dest: Path) -> None:
    """Rename ``paths`` (under ``src``) to the same places under ``dest`` (one folder, so
    renames: nothing is copied)."""
    for path in paths:
        target = dest / path.relative_to(src)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        except OSError as exc:
            raise OutputError(f"{path}: cannot set the old run's file aside with --overwrite "
                              f"({os_error_reason(exc)})") from None


def _settle(folder: Path) -> None:
    """After a replacing run (ended, or killed earlier): the old run set aside goes when the
    new one wrote a checkpoint, and comes back (the new run's partial files removed) when it
    did not."""
    import shutil

    aside = folder / ASIDE
    if not aside.is_dir():
        return
    written = [folder / name for name in RUN_MARKERS]
    written += [sub / name for sub in folder.glob("fold-*") for name in RUN_MARKERS]
    if not any(p.exists() for p in written):
        for path in _run_files(folder):      # a history without a checkpoint: nothing kept
            with contextlib.suppress(OSError):
                os.unlink(path)
        _move(sorted(p for p in aside.rglob("*") if not p.is_dir()), aside, folder)
    shutil.rmtree(aside, ignore_errors=True)
