"""Atomic writes and the clean-up of temporary files that dead writers left behind.

Every file deepfusion writes goes to a temporary name in the destination folder first and is
renamed over the destination only when complete, so a crash or ``kill -9`` leaves either the old
file or the new one, never half of one. Temporary names carry the writer's process id, so a
later run can remove the leftovers of dead processes without touching a live one's.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import os
import re
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence

from ..errors import OutputError

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
        raise OutputError(f"{dest}: cannot write ({os_error_reason(exc)})") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def os_error_reason(exc: OSError) -> str:
    """The words of an OS error for a one-line message ("disk full", "Permission denied")."""
    if exc.errno == errno.ENOSPC:
        return "disk full"
    return os.strerror(exc.errno) if exc.errno else str(exc)


def write_csv(dest: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a UTF-8 CSV atomically (``\\n`` line ends)."""
    with atomic_write(Path(dest), "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (and so may still be writing its temporary file).

    A killed worker whose parent died too is re-parented to PID 1; where PID 1 does not reap
    (many containers), it stays a zombie forever. ``kill(pid, 0)`` succeeds on zombies, so they
    are recognised from ``/proc`` where there is one. On Windows (where ``os.kill(pid, 0)``
    would send Ctrl-C) the process is asked for its exit code. When in doubt the answer is True
    (the file stays), as for numbers that are no process id.
    """
    if pid == os.getpid() or not 0 < pid < 2**31:
        return True
    if os.name == "nt":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:          # no /proc (macOS): trust kill(); with /proc: it ended meanwhile
        return not Path("/proc/self").exists()
    state = stat[stat.rfind(")") + 2:][:1]   # the field after "(comm)", which may hold spaces
    return state not in ("Z", "X", "x")


def _windows_pid_alive(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)    # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.GetLastError() == 5                # access denied: it exists
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == 259                         # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


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
        if match and not pid_alive(int(match.group(1))):
            _unlink_quietly(path)
            removed += 1
    return removed
