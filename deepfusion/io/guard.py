"""Outputs never destroy inputs: every stage checks where it will write before any work.

An output path that resolves to a file the same command reads (an audio file of the
collection, the manifest, a split file, the features file, the checkpoint), through a
symbolic or hard link included, is refused in one line; so is an existing file that is not
of the kind the output would replace (a text file named as the features pickle).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Optional

from ..errors import OutputError


def _identity(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_outputs(outputs: Mapping[Path, str], inputs: Mapping[Path, str]) -> None:
    """Refuse an output that is one of the inputs.

    ``outputs`` and ``inputs`` map paths to how the message names them (``"--out"``, ``"the
    --manifest"``). Paths are compared resolved (symbolic links followed) and, where both
    exist, by device and inode (hard links).

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
            raise OutputError(f"{out}: {name} would overwrite {what}, which this command reads; "
                              "write somewhere else")


def check_replaceable(path: Path, *, name: str, kind: str, magic: Iterable[bytes]) -> None:
    """Refuse to replace an existing file that is not ``kind`` (its start is none of ``magic``).

    Raises
    ------
    OutputError
    """
    path = Path(path)
    if not path.exists() or path.is_dir():
        return
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return                       # unreadable: writing will say what is wrong
    if head and not any(head.startswith(m) for m in magic):
        raise OutputError(f"{path}: {name} exists and is not {kind}; it would be replaced. "
                          "Delete it first or write somewhere else")


def audio_inputs(paths: Iterable[Path]) -> dict[Path, str]:
    """The files of a collection, as :func:`check_outputs` names them."""
    return {Path(p): f"the audio file {p}" for p in paths}


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
        raise error(f"{path}: {what} is {kind}, not a file; give a regular file")


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
