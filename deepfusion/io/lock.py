"""Exclusive locks on folders that one writer at a time may change (a store, a model folder).

The lock is an OS lock on a file (``flock`` on POSIX, ``msvcrt.locking`` on Windows): the
kernel releases it when its owner exits in any way (``kill -9`` included), so a lock is never
stale, whichever PID namespace or container the owner ran in on this host. On NFS, ``flock``
is forwarded to the server's lock manager by Linux clients (v4, or v3 with lockd); where a
file system has no working locks, the open or the lock call fails and the writer says so.
The owner writes its host and process id into the file, for the message a second writer gets.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from deepfusion.errors import OutputError
from deepfusion.io.atomic import os_error_reason

_HELD: set[str] = set()          # lock files this process holds


class LockedError(OutputError):
    """Another process holds the lock."""


def _owner(fh) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        fh.seek(0)
        text = fh.read(200).decode("utf-8").strip()
        if text:
            return f" ({text})"
    return ""


@contextlib.contextmanager
def exclusive(lock_file: Path, *, wait: bool, what: str) -> Iterator[None]:
    """Hold the exclusive lock ``lock_file`` while the block runs.

    ``wait``: take turns with another holder; otherwise raise :class:`LockedError` at once.
    ``what`` names the locked thing in messages ("this feature store").

    Raises
    ------
    OutputError
        This process already holds the lock (waiting would never end), or the lock file
        cannot be opened or locked; :class:`LockedError` when another process holds it and
        ``wait`` is False.
    """
    lock_file = Path(lock_file)
    key = os.path.realpath(lock_file)
    if key in _HELD:
        raise OutputError(f"{lock_file.parent}: this process is already writing {what}")
    try:
        fh = open(lock_file, "a+b")
    except OSError as exc:
        raise OutputError(f"{lock_file}: cannot open the lock file ({os_error_reason(exc)})") from None
    try:
        unlock = _lock(fh, lock_file, wait=wait, what=what)
        with contextlib.suppress(OSError):
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}".encode())
            fh.flush()
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            with contextlib.suppress(OSError):
                fh.seek(0)
                fh.truncate()
            with contextlib.suppress(OSError):
                unlock()
    finally:
        fh.close()


def _lock(fh, lock_file: Path, *, wait: bool, what: str):
    """Take the lock; returns the function that releases it."""
    try:
        import fcntl
    except ImportError:                      # Windows
        import msvcrt

        while True:
            fh.seek(0)
            try:
                msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
                break
            except OSError:
                if not wait:
                    raise LockedError(f"{lock_file.parent}: another process is writing {what}"
                                      f"{_owner(fh)}; wait for it to finish, or use another folder") from None
                time.sleep(0.2)
        return lambda: (fh.seek(0), msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1))
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        raise LockedError(f"{lock_file.parent}: another process is writing {what}{_owner(fh)}; "
                          "wait for it to finish, or use another folder") from None
    except OSError as exc:
        raise OutputError(f"{lock_file}: cannot lock ({os_error_reason(exc)}); the file system "
                          "may not support locks: use a local folder") from None
    return lambda: fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
