"""Atomic writes, stale temporary files, and loading pickles without running code.

Every file deepfusion writes goes to a temporary name in the destination folder first and is
renamed over the destination only when complete, so a crash or ``kill -9`` leaves either the old
file or the new one, never half of one. Temporary names carry the writer's process id, so a
later run can remove the leftovers of dead processes without touching a live one's.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import re
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import FeaturesFileError, OutputError

_TMP_RE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def _tmp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


@contextlib.contextmanager
def atomic_write(dest: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``dest``; on success rename it over ``dest``.

    On any exception the temporary file is removed and ``dest`` is left as it was. ``OSError``
    (read-only folder, full disk) becomes :class:`OutputError` naming ``dest``.
    """
    dest = Path(dest)
    tmp = _tmp_name(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        text = "b" not in mode
        # UTF-8 whatever the locale: reports name files (genre/canción.wav); surrogateescape
        # writes back the raw bytes of a file name that is not valid UTF-8.
        with open(tmp, mode, newline="" if text else None, encoding="utf-8" if text else None,
                  errors="surrogateescape" if text else None) as fh:
            yield fh
        os.replace(tmp, dest)
    except OSError as exc:
        _unlink_quietly(tmp)
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno == errno.ENOSPC:
            reason = "disk full"
        raise OutputError(f"{dest}: cannot write ({reason})") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def check_writable(dest: Path) -> None:
    """Fail early, before any work, when ``dest`` cannot be created or replaced."""
    dest = Path(dest)
    folder = dest.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{dest}: cannot create folder {folder} ({os.strerror(exc.errno or 0)})") from None
    probe = _tmp_name(dest)
    try:
        with open(probe, "wb"):
            pass
    except OSError as exc:
        raise OutputError(f"{dest}: cannot write in {folder} ({os.strerror(exc.errno or 0)})") from None
    finally:
        _unlink_quietly(probe)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path, *, recursive: bool = False) -> int:
    """Delete temporary files left in ``folder`` by processes that no longer run.

    Returns the number of files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    paths = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    for path in paths:
        match = _TMP_RE.match(path.name)
        if match and not _pid_alive(int(match.group(1))):
            _unlink_quietly(path)
            removed += 1
    return removed


# ----------------------------------------------------------------------------- safe unpickling

#: The only globals a features pickle may name: containers, scalars and numpy arrays/dtypes.
_SAFE_GLOBALS = {
    ("builtins", name) for name in (
        "dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int",
        "float", "complex", "bool", "slice", "range")
} | {
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how protocols 0-2 spell bytes
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        # numpy's per-type dtype classes (numpy.dtypes.Float32DType) are data, not code
        if module == "numpy.dtypes" and name.endswith("DType"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def safe_pickle_load(path: Path) -> Any:
    """Load a pickle that may hold only builtin containers/scalars and numpy arrays.

    Anything else (a class, a function, ``os.system``) is refused before it can run.

    Raises
    ------
    FeaturesFileError
        Missing, unreadable, truncated or unsafe file; the message names the file and reason.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return _RestrictedUnpickler(io.BufferedReader(fh, buffer_size=1 << 20)).load()
    except FileNotFoundError:
        raise FeaturesFileError(f"{path}: features file not found") from None
    except IsADirectoryError:
        raise FeaturesFileError(f"{path}: is a folder, not a features file") from None
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if msg.startswith("refused"):
            raise FeaturesFileError(f"{path}: unsafe pickle, {msg} (only containers, "
                                    "numbers, strings and numpy arrays are allowed)") from None
        raise FeaturesFileError(f"{path}: not a readable pickle ({msg})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, OSError,
            MemoryError) as exc:
        raise FeaturesFileError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
