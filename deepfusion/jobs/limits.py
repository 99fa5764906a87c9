"""The limits of one file's job: the time limit (``--timeout``), and why a file could not be
used, as a :class:`Failure` (one line, and whether it may not recur) that the job returns
instead of raising, so that one bad file never ends a batch."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional

from deepfusion.errors import AudioError, DeepFusionError
from deepfusion.io.atomic import library_text

DEFAULT_TIMEOUT = 120.0


class Failure(str):
    """The one-line reason a file could not be used (printed as is). ``transient``: it may not
    recur (a time-out, a file still being written), so a run that met it is not final."""

    transient = False


class Transient(Failure):
    transient = True


#: A file whose bytes changed between hashing and decoding.
CHANGED_WHILE_READ = Transient("changed while it was read (a copy or download still in "
                               "progress?); run the same command again when it is complete")


def took_too_long(timeout: float, doing: str) -> Failure:
    """The one wording of a file that ran past ``--timeout`` (``doing``: "hashing it",
    "reading its header", "on window 3 of 5")."""
    return Transient(f"took longer than --timeout {timeout:g} s ({doing}); give a larger "
                     "--timeout, or --timeout 0 for no limit")


def is_transient(reason: object) -> bool:
    return bool(getattr(reason, "transient", False))


class FileTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    """Raise :class:`FileTimeout` in this thread after ``seconds`` (POSIX main thread only)."""
    usable = (seconds and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise FileTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def failed(exc: Exception) -> Failure:
    """A library failing on odd input: reported, never the end of the batch."""
    text = library_text(exc) or "without a message"
    return Failure(f"feature computation failed ({text}); this is a fault in deepfusion or a "
                   "library: please report it with this file")


def reason_of(exc: BaseException, timeout: Optional[float], doing: str) -> Failure:
    """The one line of whatever ended a file's job (``doing``: what ran past ``timeout``)."""
    if isinstance(exc, FileTimeout):
        return took_too_long(timeout or 0, doing)
    if isinstance(exc, AudioError):
        return Failure(exc.reason)
    if isinstance(exc, DeepFusionError):
        return Failure(str(exc))
    return failed(exc)
