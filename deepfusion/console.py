"""How the command line speaks: one line per error and an exit status, never a traceback;
stage lines on stdout and problems on stderr; the files a command wrote, named at its end.

:mod:`deepfusion.cli` (the commands) prints through these. Imports only what a line needs, so
``--help`` stays instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

import click

from deepfusion.errors import DeepFusionError
from deepfusion.io.names import shown


def echo(message: object = "", **kwargs: Any) -> None:
    """click.echo that never fails on a file name: bytes that are not UTF-8 and control
    characters other than newlines and tabs are escaped (:mod:`deepfusion.io.names`). A
    progress bar on the terminal is cleared while the line is printed, then drawn again."""
    from deepfusion.progress import say_around_bars

    with say_around_bars():
        click.echo(shown(message, keep="\n\t"), **kwargs)


def say(line: object = "") -> None:
    """A stage's line: on stderr when it reports a problem (``warning: ...``), else stdout."""
    echo(line, err=str(line).startswith("warning:"))


def sigterm_as_interrupt() -> None:
    """SIGTERM (``kill``, a scheduler's time limit, ``docker stop``) ends a command as Ctrl-C
    does: workers stopped, temporary files removed, finished work kept, the same one line."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)    # one is enough; clean-up runs now
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def torchrun_rank() -> int | None:
    """This process's rank when torchrun started two or more, else None. Read from the
    environment as :func:`deepfusion.runtime.ddp.launched` does, without importing torch at start-up
    (malformed values are ddp's to report)."""
    try:
        return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    except (KeyError, ValueError):
        return None


def other_rank() -> bool:
    """A torchrun process other than rank 0 (its errors are rank 0's too)."""
    return torchrun_rank() not in (None, 0)


class CommandGroup(click.Group):
    """Turns deepfusion's own errors into one line and an exit status, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        sigterm_as_interrupt()
        try:
            return super().invoke(ctx)
        except DeepFusionError as exc:
            if not other_rank():          # under torchrun rank 0 says it, once
                echo(f"Error: {shown(exc)}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            if not other_rank():
                echo("Interrupted: finished work is kept; run the same command again to continue.",
                     err=True)
            sys.exit(130)
        except BrokenPipeError:    # `deepfusion predict DIR | head`: the reader has enough
            try:                  # (and Python must not complain again at exit)
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            sys.exit(141)         # what a shell reports for SIGPIPE
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # a bug, not a user error: one line unless debugging
            if os.environ.get("DEEPFUSION_DEBUG"):
                raise
            echo(f"Error: internal error {type(exc).__name__}: {shown(exc)} "
                       "(set DEEPFUSION_DEBUG=1 for the traceback, and please report it)", err=True)
            sys.exit(70)


def say_repaired(n: int) -> None:
    """The one line on damaged cache entries a run computed again (stderr: never mixed with
    the results a pipe reads)."""
    if n:
        echo(f"repaired {n} damaged cache entr{'y' if n == 1 else 'ies'} (computed again and "
             "replaced)", err=True)


def wrote(paths: Iterable[Path], *, err: bool = False) -> None:
    """The files a command wrote, once each at its end, by absolute path (``err``: on stderr,
    where stdout carries the results a pipe reads)."""
    for path in paths:
        echo(f"wrote {Path(path).absolute()}", err=err)


def stamp(path: Path) -> Optional[tuple[int, int, int]]:
    """(inode, size, mtime) of ``path``, None when absent: whether a command rewrote it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def found(path: Path, folder: Path, what: str) -> Path:
    """``path``, or ``folder / path`` when ``path`` is a bare file name that is not in the
    current folder while ``folder`` (where an earlier stage writes by default) holds it:
    ``deepfusion train --features features.pkl`` after ``deepfusion extract`` (which wrote
    data/features.pkl), ``deepfusion evaluate --checkpoint best.pth`` after ``deepfusion
    train`` (models/best.pth). Said in one line on stderr."""
    path = Path(path)
    if len(path.parts) != 1 or os.path.lexists(path) or not (Path(folder) / path).exists():
        return path
    echo(f"{shown(path)}: not in this folder; using {shown(Path(folder) / path)}, the {what} "
         f"{'extract' if 'features' in what else 'train'} writes by default", err=True)
    return Path(folder) / path

