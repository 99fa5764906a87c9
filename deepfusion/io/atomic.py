"""Atomic writes and the clean-up of temporary files that dead writers left behind.

Every file deepfusion writes goes to a temporary name in the destination folder first and is
renamed over the destination only when complete, so a crash or ``kill -9`` leaves either the old
file or the new one, never half of one. Temporary names carry the writer's process id and a
tag of its host and PID namespace, so a later run removes the leftovers of dead processes
without touching a live one's, even when containers or hosts share the folder (NFS): another
host's temporary file is removed only after a day.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import os
import re
import time
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence

from deepfusion.errors import OutputError
from deepfusion.io.names import escape_bytes

#: ``.NAME.<pid>.<where>.<random>.tmp``: <where> tags the host and PID namespace of the writer
_TMP_RE = re.compile(r"^\..+\.(\d+)\.([0-9a-f]{8})\.[0-9a-f]{8}\.tmp$")
#: names written before the tag existed: ``.NAME.<pid>.<random>.tmp``
_LEGACY_TMP_RE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")
#: a temporary file of another host or container is removed only when older than this: its
#: writer cannot be asked whether it runs (no atomic write takes a day)
FOREIGN_TMP_AGE = 24 * 3600


def _where() -> str:
    """A tag of this host and PID namespace: a PID means this process only under both."""
    import hashlib
    import socket

    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}|{namespace}".encode()).hexdigest()[:8]


_WHERE = _where()


def _tmp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{os.getpid()}.{_WHERE}.{os.urandom(4).hex()}.tmp")


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
        # UTF-8 whatever the locale: reports name files (genre/canción.wav); what is not
        # valid UTF-8 (the bytes of a file name, see io.names) is escaped, never written raw
        with open(tmp, mode, newline="" if text else None, encoding="utf-8" if text else None,
                  errors="backslashreplace" if text else None) as fh:
            yield fh
        os.replace(tmp, dest)
    except BrokenPipeError:     # the caller's stdout reader went away: not this file's fault
        _unlink_quietly(tmp)
        raise
    except OSError as exc:
        _unlink_quietly(tmp)
        raise OutputError(f"{dest}: cannot write ({os_error_reason(exc)})") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def os_error_reason(exc: OSError) -> str:
    """The words of an OS error for a one-line message ("disk full", "permission denied")."""
    if exc.errno == errno.ENOSPC:
        return "disk full"
    return library_text(os.strerror(exc.errno) if exc.errno else exc) or "no reason given"


def library_text(text: object, limit: int = 160) -> str:
    """A library's message as a part of one of ours: one line, its first letter lowercase
    (not of an acronym), no final period, cut at a word after ``limit`` characters."""
    line = " ".join(str(text).split()).rstrip(".")
    if line[:1].isupper() and not line[1:2].isupper():
        line = line[0].lower() + line[1:]
    if len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0] + "..."
    return line


def read_error_reason(exc: OSError) -> str:
    """Why one input file could not be read, for a ``skipped <path>: ...`` line."""
    if exc.errno == errno.ENOENT:
        return "file not found (removed during the run)"
    return f"cannot read ({os_error_reason(exc)})"


#: A cache entry written by this run that was gone or damaged when it was to be read.
CACHE_ENTRY_LOST = ("cache entry could not be read back (removed or damaged meanwhile); "
                    "run the same command again")


def plural(n: int, word: str, many: str = "") -> str:
    """``"1 clip"``, ``"2 clips"`` (``many``: an irregular plural, "entries")."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def write_csv(dest: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a UTF-8 CSV atomically (``\\n`` line ends; quoted as needed, so names may hold
    commas, quotes and newlines; bytes of names that are not UTF-8 as ``\\xNN``)."""
    with atomic_write(Path(dest), "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([escape_bytes(c) if isinstance(c, str) else c for c in row] for row in rows)


def check_writable(dest: Path) -> None:
    """Fail early, before any work, when ``dest`` cannot be created or replaced."""
    dest = Path(dest)
    folder = dest.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{dest}: cannot create folder {folder} ({os_error_reason(exc)})") from None
    probe = _tmp_name(dest)
    try:
        with open(probe, "wb"):
            pass
    except OSError as exc:
        raise OutputError(f"{dest}: cannot write in {folder} ({os_error_reason(exc)})") from None
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


def _abandoned(path: Path) -> bool:
    """Whether the temporary file ``path`` provably has no live writer.

    Written on this host and in this PID namespace: when its process no longer runs. Written
    elsewhere (another container or host sharing the folder over NFS): when it is older than
    :data:`FOREIGN_TMP_AGE`, since that writer's process cannot be asked about.
    """
    match = _TMP_RE.match(path.name)
    if match:
        if match.group(2) == _WHERE:
            return not pid_alive(int(match.group(1)))
        try:
            return time.time() - path.stat().st_mtime > FOREIGN_TMP_AGE
        except OSError:
            return False
    legacy = _LEGACY_TMP_RE.match(path.name)
    return bool(legacy) and not pid_alive(int(legacy.group(1)))


def remove_stale_temps(folder: Path, *, recursive: bool = False) -> int:
    """Delete temporary files left in ``folder`` by processes that no longer run (see
    :func:`_abandoned`: a file another host or container may still be writing stays).

    Returns the number of files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    paths = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    for path in paths:
        if _abandoned(path):
            _unlink_quietly(path)
            removed += 1
    return removed
