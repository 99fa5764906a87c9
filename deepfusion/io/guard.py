"""Outputs never destroy inputs, nor files of another kind: the one rule every writing
command goes through (:func:`check_destinations`), before any work.

* An output that resolves to a file the same command reads (an audio file of the collection,
  the manifest, a split file, the features file, a checkpoint, an ``--init-from`` source, an
  ONNX model, ImageNet weights), through ``./x`` vs ``x``, a symbolic or a hard link, is
  refused in one line, unless the command reads that input whole before it writes anything
  (``loaded_first``: train's ``--init-from`` inside the run that ``--overwrite`` replaces).
* An existing file is replaced only when it is of the kind the command writes there,
  recognised from its content (:data:`KINDS`: our CSV reports by their header, the features
  pickle, checkpoints, the embeddings ``.npz``, ONNX models, figures, JSON reports); anything
  else (an audio file, someone's spreadsheet, another command's output) is refused with one
  line naming the file and the way on: ``--overwrite``, or another destination. An empty file
  holds nothing to lose.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

from deepfusion.errors import OutputError


def _identity(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_outputs(outputs: Mapping[Path, str], inputs: Mapping[Path, str], *,
                  option: Optional[str] = None) -> None:
    """Refuse an output that is one of the inputs.

    ``outputs`` and ``inputs`` map paths to how the message names them (``"--out"``, ``"the
    --manifest"``); an output named otherwise than by an option (a run folder's files, by
    their own names) is said under ``option``, the option that chose its folder. Paths are
    compared resolved (symbolic links followed) and, where both exist, by device and inode
    (hard links).

    Raises
    ------
    OutputError
    """
    by_path = {os.path.realpath(p): what for p, what in inputs.items() if p is not None}
    by_inode = {}
    for p, what in inputs.items():
        ident = _identity(p) if p is not None else None
        if ident is not None:
            by_inode[ident] = what
    for out, name in outputs.items():
        what = by_path.get(os.path.realpath(out))
        ident = _identity(out)
        if what is None and ident is not None:
            what = by_inode.get(ident)
        if what is not None:
            if name.startswith("--"):
                raise OutputError(f"{out}: {name} is {what}, which this command reads; give "
                                  f"another {name}")
            instead = f"give another {option}" if option else "write somewhere else"
            raise OutputError(f"{out} is {what}, which this command reads; {instead}")


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (resolved, or one inode: a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    ident = _identity(a)
    return ident is not None and ident == _identity(b)


# ------------------------------------------------------------------ the kinds of file we write


def _head(path: Path, n: int = 4096) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _csv(*headers: str) -> Callable[[Path], bool]:
    """A CSV whose header line starts with one of ``headers`` (a BOM allowed)."""
    def test(path: Path) -> bool:
        line = _head(path).split(b"\n", 1)[0].removeprefix(b"\xef\xbb\xbf")
        return any(line.startswith(h.encode()) for h in headers)
    return test


def _zip_holding(test_names: Callable[[list[str]], bool]) -> Callable[[Path], bool]:
    def test(path: Path) -> bool:
        try:
            with zipfile.ZipFile(path) as zf:
                return test_names(zf.namelist())
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return False
    return test


def _png(path: Path) -> bool:
    return _head(path, 8) == b"\x89PNG\r\n\x1a\n"


def _json_object(*keys: str) -> Callable[[Path], bool]:
    def test(path: Path) -> bool:
        import json

        if path.stat().st_size > 64 * 2**20:
            return False
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(value, dict) and all(k in value for k in keys)
    return test


def _onnx(path: Path) -> bool:
    """An ONNX model deepfusion exported: a protobuf ModelProto (field 1, ir_version, first)
    whose metadata, serialised after the graph, names deepfusion."""
    if _head(path, 1) != b"\x08":
        return False
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 4 * 2**20))
        return b"deepfusion" in fh.read()


def _pickle(path: Path) -> bool:
    return _head(path, 1) == b"\x80"     # protocol 2 or later: what extract writes


@dataclass(frozen=True)
class Kind:
    """A kind of file a command writes: ``what`` names it in messages, ``test`` recognises
    an existing file of it."""

    what: str
    test: Callable[[Path], bool]


#: Every kind of file deepfusion writes where a user names the destination (or the folder).
KINDS = {
    "features": Kind("a features pickle", _pickle),
    "extract_errors": Kind("an extract error report", _csv("path,reason")),
    "checkpoint": Kind("a PyTorch checkpoint",
                       _zip_holding(lambda names: any(n.endswith("/data.pkl") for n in names))),
    "history_csv": Kind("a training history", _csv("epoch,train_loss")),
    "figure": Kind("a PNG figure", _png),
    "cross_validation": Kind("a cross-validation table", _csv("fold,clips")),
    "cv_predictions": Kind("cross-validation predictions", _csv("path,true_genre")),
    "evaluation": Kind("an evaluation report", _json_object("split", "metrics")),
    "class_report": Kind("a classification report", _csv("genre,precision")),
    "eval_predictions": Kind("evaluate's predictions", _csv("path,true_genre")),
    "predictions": Kind("a predictions CSV", _csv("path,genre,probability")),
    "embeddings": Kind("an embeddings .npz",
                       _zip_holding(lambda names: {"paths.npy", "embeddings.npy"} <= set(names))),
    "onnx": Kind("an ONNX model exported by deepfusion", _onnx),
}


@dataclass(frozen=True)
class Destination:
    """A file a command will write: ``name`` is how messages name it (``"--out"``), ``kind``
    a key of :data:`KINDS`."""

    path: Path
    name: str
    kind: str


def check_destinations(destinations: Sequence[Destination], inputs: Mapping[Path, str], *,
                       overwrite: bool = False, loaded_first: Iterable[Path] = (),
                       option: Optional[str] = None, how: Optional[str] = None) -> None:
    """The rule (see the module docstring), checked for every destination of a command.

    ``inputs`` maps every file the command reads to how messages name it; ``loaded_first``
    are inputs the command reads whole before it writes anything (they may be destinations);
    ``overwrite``: replace existing files of other kinds too (never an input); ``option``:
    the option that chose the destinations' folder (``--model-dir``), for those not named by
    an option of their own; ``how`` says in the message what replaces a file of another kind
    (default: ``--overwrite``, or another of that option).

    Raises
    ------
    OutputError
        Naming the destination, what it is, and how to proceed.
    """
    loaded = [Path(p) for p in loaded_first]
    reads = {p: what for p, what in inputs.items()
             if p is not None and not any(same_file(p, q) for q in loaded)}
    check_outputs({d.path: d.name for d in destinations}, reads, option=option)
    for dest in destinations:
        path = Path(dest.path)
        other = dest.name if dest.name.startswith("--") else option
        if path.is_dir():
            if dest.name.startswith("--"):
                raise OutputError(f"{path}: {dest.name} is a folder; give a file name")
            raise OutputError(f"{path} is a folder, where this command writes a file; "
                              + (f"give another {option}" if option else "remove it"))
        if overwrite or any(same_file(path, q) for q in loaded):
            continue
        kind = KINDS[dest.kind]
        try:
            if not path.exists() or path.stat().st_size == 0 or kind.test(path):
                continue
        except OSError:
            continue                 # unreadable: writing it will say what is wrong
        advice = how or ("give --overwrite to replace it, or "
                         + (f"another {other}" if other else "write somewhere else"))
        raise OutputError(f"{path} exists and is not {kind.what}; {advice}")


def audio_inputs(paths: Iterable[Path]) -> dict[Path, str]:
    """The files of a collection, as :func:`check_outputs` names them."""
    return {Path(p): "an audio file" for p in paths}


def require_regular_file(path: Path, *, what: str, error: type = OutputError) -> None:
    """Refuse, before opening it, an input that is a FIFO, a socket or a device (opening a
    FIFO waits for a writer that may never come). A missing path is left to the reader.

    Raises
    ------
    ``error`` (a :class:`~deepfusion.errors.DeepFusionError` subclass)
    """
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise error(f"{path}: {what} is {kind}; give a regular file")


def check_free_space(folder: Path, need: int, what: str, *, replaced: Iterable[Path] = ()) -> None:
    """Refuse, before the work, to start what would fill the disk of ``folder``.

    ``need`` bytes will be written there (``what`` says what, for the message); files in
    ``replaced`` will be overwritten, and the space they hold counts as free (an atomic
    replacement needs the new copy beside the old one, which ``need`` must include).

    Raises
    ------
    OutputError
    """
    import shutil

    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return          # a file system that cannot say: the atomic writes still protect
    held = sum(p.stat().st_size for p in map(Path, replaced) if p.is_file())
    if free + held < need:
        raise OutputError(f"{folder}: {free / 2**20:,.0f} MB free, {what} need about "
                          f"{(need - held) / 2**20:,.0f} MB more; free some space or choose "
                          "another folder")
