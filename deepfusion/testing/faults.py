"""Worker processes that die on a chosen file, as a decoder's crash or the out-of-memory killer
would end them: for joblib's workers (extract, predict, embed, tag) and Dask's alike.

:func:`crash_on` writes a hook that wraps the functions deepfusion sends to its workers
(``jobs.job.indexed``, ``jobs.windows.file_windows``, ``runtime.pool.on_worker``); a process given a task
on one of the named files sends itself the signal. It is loaded through ``sitecustomize``
(:func:`hooked_env`: every Python process of the run loads it, the driver too, which never
runs a task itself with two workers or more) or as ``dask worker --preload HOOK``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

_HOOK = """
# written by deepfusion.testing.faults.crash_on
import os, signal
from pathlib import Path

ARMED, ONCE, SIGNAL = Path({armed!r}), {once!r}, {signum!r}


def _dies_on(args):
    try:
        names = ARMED.read_text().split()
    except OSError:                                     # disarmed
        return False
    if not any(isinstance(a, str) and os.path.basename(a) in names for a in args):
        return False
    if ONCE:                                            # the first to fire disarms the rest
        try:
            ARMED.rename(ARMED.with_suffix(".fired"))
        except OSError:
            return False
    return True


def _wrap(module, name):
    real = getattr(module, name)
    if getattr(real, "_crash_on", False):               # a preload may run more than once
        return

    def call(*args, **kwargs):
        if _dies_on(args):
            os.kill(os.getpid(), SIGNAL)
        return real(*args, **kwargs)

    call._crash_on = True
    setattr(module, name, call)


import deepfusion.runtime.pool, deepfusion.jobs.job, deepfusion.jobs.windows  # noqa: E401,E402
_wrap(deepfusion.runtime.pool, "on_worker")
_wrap(deepfusion.jobs.job, "indexed")
_wrap(deepfusion.jobs.windows, "file_windows")
"""


def crash_on(folder: Path, *names: str, signum: int = signal.SIGKILL,
             once: bool = False) -> tuple[Path, Path]:
    """A hook under which a worker given a task on a file of one of these base ``names``
    sends itself ``signum`` (SIGKILL: the out-of-memory killer; SIGSEGV: a decoder's crash).

    Returns ``(hook, armed)``: ``hook`` is ``folder/crash_on.py``, loaded by the
    ``sitecustomize.py`` beside it (:func:`hooked_env` puts ``folder`` first on
    ``PYTHONPATH``) or by ``dask worker --preload HOOK``; remove ``armed`` to disarm it.
    ``once``: the first worker to die disarms it (a worker lost once, the task run again).
    """
    folder.mkdir(parents=True, exist_ok=True)
    hook, armed = folder / "crash_on.py", folder / "crash_on.names"
    armed.write_text("\n".join(names))
    hook.write_text(_HOOK.format(armed=str(armed), once=once, signum=int(signum)))
    (folder / "sitecustomize.py").write_text("import crash_on  # noqa: F401\n")
    return hook, armed


def hooked_env(hook: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``python -m deepfusion`` subprocess that loads ``hook``."""
    from deepfusion.testing import subprocess_env

    env = subprocess_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join([str(hook.parent), env["PYTHONPATH"]])
    return env
