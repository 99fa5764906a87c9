"""Per-clip work on a Dask cluster: connect, check the shared cache, map tasks as they finish.

``extract --scheduler tcp://host:8786`` sends each clip to a running Dask cluster (HPC through
dask-jobqueue, Kubernetes through dask-kubernetes, or ``dask scheduler`` / ``dask worker`` by
hand); ``--scheduler local:N`` starts a ``LocalCluster`` of N single-threaded worker processes.
``distributed`` is an optional extra: this module imports it only when called.

Workers hash, decode and analyse the files and write the cache entries themselves, so the
cache folder must be one path every worker sees (a shared file system): :func:`check_shared`
proves it before any work. A worker that dies costs only its unfinished clips: the scheduler
runs them again elsewhere (Dask's ``allowed-failures`` times).

Every way the cluster fails is one line (the CLI's exit status in brackets): not an address
(2); a host name not known, nothing listening, no answer, no worker within
``DEEPFUSION_SCHEDULER_TIMEOUT`` seconds, a worker that cannot use the cache (1, before any
work); a task whose workers all died, the scheduler lost, every worker gone mid-run (75: what
finished is cached, the same command continues).
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from deepfusion.errors import ClusterError, ClusterLostError, ParameterError
from deepfusion.io.atomic import library_text, os_error_reason

#: Environment variable read when ``--scheduler`` is not given.
SCHEDULER_ENV = "DEEPFUSION_SCHEDULER"
#: How messages name the address: the flag, or the variable when the address came from it
#: (set by the command line with :func:`named_by`).
_NAMED_BY = ["--scheduler"]


@contextlib.contextmanager
def named_by(source: str) -> Iterator[None]:
    """Messages within name the scheduler address as ``source`` gave it: ``--scheduler``
    (``--scheduler ADDRESS:``) or :data:`SCHEDULER_ENV` (``DEEPFUSION_SCHEDULER=ADDRESS:``)."""
    _NAMED_BY.append(source)
    try:
        yield
    finally:
        _NAMED_BY.pop()


def named(value: object) -> str:
    """The address as the user gave it, for the head of a message."""
    source = _NAMED_BY[-1]
    return f"{source}={value}" if source == SCHEDULER_ENV else f"{source} {value}"
#: Seconds to reach a scheduler (and for it to have a worker) before giving up with one line;
#: the environment variable below sets another bound.
CONNECT_TIMEOUT = 20.0
TIMEOUT_ENV = "DEEPFUSION_SCHEDULER_TIMEOUT"
#: Address schemes a Dask client can connect with, and those that run over TCP.
SCHEMES = ("tcp", "tls", "ws", "wss", "ucx")
_TCP_SCHEMES = ("tcp", "tls", "ws", "wss")
_HOST = re.compile(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]")


def parse_scheduler(value: str) -> tuple[str, int]:
    """``("local", N)`` for ``local:N`` (``local`` alone: all cores), else ``(address, 0)``
    with the address in Dask's form, ``tcp://HOST:PORT`` (``HOST:PORT`` means tcp).

    Raises
    ------
    ParameterError
        Not an address: an unknown scheme, no host, no port or one out of 1-65535.
    """
    value = value.strip()
    if value == "local" or value.startswith("local:"):
        count = value.partition(":")[2] or str(os.cpu_count() or 1)
        if not count.isdigit() or int(count) < 1:
            raise ParameterError(f"{named(value)}: local:N needs a worker count N >= 1")
        return "local", int(count)
    usage = "give a scheduler address as the scheduler prints it (tcp://HOST:8786) or local:N"
    scheme, sep, rest = value.rpartition("://")
    if not sep:
        scheme, rest = "tcp", value
    if "://" in scheme or scheme not in SCHEMES:
        raise ParameterError(f"{named(value)}: unknown scheme {scheme!r} (Dask speaks "
                             f"{', '.join(SCHEMES)}); {usage}")
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        if not rest:
            raise ParameterError(f"{named(value or repr(value))}: no host; {usage}")
        raise ParameterError(f"{named(value)}: no port; {usage}")
    if not _HOST.fullmatch(host):
        raise ParameterError(f"{named(value)}: {host!r} is not a host name; {usage}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ParameterError(f"{named(value)}: the port {port!r} is not a number from 1 "
                             f"to 65535; {usage}")
    return f"{scheme}://{host}:{int(port)}", 0


def connect_timeout() -> float:
    """Seconds to wait for a scheduler: ``DEEPFUSION_SCHEDULER_TIMEOUT`` or
    :data:`CONNECT_TIMEOUT`."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return CONNECT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 1e6:
        raise ParameterError(f"{TIMEOUT_ENV}={text}: give a number of seconds > 0")
    return seconds


def load_distributed():
    try:
        import distributed
    except ImportError:
        raise ClusterError(f"{_NAMED_BY[-1]} needs Dask's 'distributed' package, an optional "
                           "extra; pip install 'deepfusion[distributed]'") from None
    return distributed


def _reach(address: str, timeout: float) -> None:
    """A plain TCP connection to ``address`` first, so that a wrong host name or a port where
    nothing listens is one line at once (Dask's client retries those until its time-out) and
    a host that never answers is one line after ``timeout`` seconds."""
    import socket

    scheme, _, location = address.partition("://")
    if scheme not in _TCP_SCHEMES:
        return
    host, _, port = location.rpartition(":")
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except socket.gaierror as exc:
        raise ClusterError(f"{named(address)}: cannot reach the scheduler: the host name "
                           f"{host!r} is not known ({library_text(exc.strerror or exc, 80)}); "
                           "check the address") from None
    except ConnectionRefusedError:
        raise ClusterError(f"{named(address)}: cannot reach the scheduler: nothing "
                           f"listens there (connection refused); start it with dask scheduler "
                           f"--port {port}, or correct the address") from None
    except (socket.timeout, TimeoutError):
        raise ClusterError(f"{named(address)}: cannot reach the scheduler: no answer "
                           f"within {timeout:g} s (the host down, or a firewall); check the "
                           f"address, or wait longer with {TIMEOUT_ENV}=SECONDS") from None
    except OSError as exc:
        raise ClusterError(f"{named(address)}: cannot reach the scheduler "
                           f"({os_error_reason(exc)}); check the address and the network") from None


@contextlib.contextmanager
def connect(scheduler: str, *, timeout: Optional[float] = None) -> Iterator[Any]:
    """A ``distributed.Client`` on ``scheduler`` (see :func:`parse_scheduler`) with at least
    one worker, closed after. ``timeout`` (default :func:`connect_timeout`) bounds each wait.

    Raises
    ------
    ParameterError
        ``scheduler`` is not an address.
    ClusterError
        ``distributed`` missing; the scheduler unknown, refusing, silent, or without a worker
        within ``timeout`` seconds.
    """
    address, n_local = parse_scheduler(scheduler)
    timeout = connect_timeout() if timeout is None else timeout
    distributed = load_distributed()
    import logging

    # a worker lost on purpose (or a slow start, a lost scheduler) is news for the log, not
    # the terminal: what stops the run comes as one line of ours
    # (Dask's configuration gives some of its loggers levels of their own: each is quietened)
    names = ["distributed", *logging.root.manager.loggerDict]
    logs = {name: logging.getLogger(name) for name in names
            if name == "distributed" or name.startswith("distributed.")}
    levels = {name: log.level for name, log in logs.items()}
    for log in logs.values():
        log.setLevel(logging.CRITICAL)
    cluster = client = None
    try:
        if n_local:
            try:
                cluster = distributed.LocalCluster(n_workers=n_local, threads_per_worker=1,
                                                   processes=True, host="127.0.0.1",
                                                   dashboard_address=None,
                                                   silence_logs=logging.CRITICAL)
                address = cluster.scheduler_address
                client = distributed.Client(cluster, timeout=timeout)
            except (OSError, TimeoutError) as exc:
                raise ClusterError(f"{named(scheduler)}: the local cluster did not start "
                                   f"({_reason(exc)}); give --jobs instead") from None
        else:
            _reach(address, timeout)
            try:
                client = distributed.Client(address, timeout=timeout)
            except (OSError, TimeoutError):
                raise ClusterError(
                    f"{named(address)}: no Dask scheduler answered within {timeout:g} s "
                    "(8786 is the usual port; 8787 is its dashboard); check the address, or "
                    f"wait longer with {TIMEOUT_ENV}=SECONDS") from None
        if not client.scheduler_info().get("workers"):
            try:
                client.wait_for_workers(1, timeout=timeout)
            except (OSError, TimeoutError):
                raise ClusterError(f"{named(address)}: the scheduler has no worker after "
                                   f"{timeout:g} s; start some (dask worker {address})") from None
        yield client
    finally:
        # closing after a lost scheduler may fail: what stopped the run is the news
        for part in (client, cluster):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.close(timeout=min(timeout, 5))
        for name, log in logs.items():
            log.setLevel(levels[name])


def _probe(folder: str, token_name: str, token: str) -> Optional[str]:
    """On a worker: read the driver's token and write a file of its own; None if both work."""
    try:
        return _probe_folder(folder, token_name, token)
    except Exception as exc:  # noqa: BLE001 - a worker's failure must come back as text
        return f"failed the check ({_reason(exc)})"


def _probe_folder(folder: str, token_name: str, token: str) -> Optional[str]:
    try:
        if Path(folder, token_name).read_text() != token:
            return "sees another file under that path"
    except OSError as exc:
        return f"cannot see it ({os_error_reason(exc)})"
    mine = Path(folder, f".worker-probe.{os.getpid()}.{uuid.uuid4().hex}")
    try:
        mine.write_bytes(b"")
        mine.unlink()
    except OSError as exc:
        return f"cannot write there ({os_error_reason(exc)})"
    return None


def check_shared(client: Any, folder: Path) -> int:
    """Every worker must read what the driver wrote in ``folder`` and write there itself.

    Returns the modification time (ns) the driver's probe file got there: the run's start on
    the clock of the file system that dates the cache entries (see :func:`recount`).

    Raises
    ------
    ClusterError
        Naming the first worker that cannot, and why.
    """
    folder = Path(folder).resolve()
    token, name = uuid.uuid4().hex, f".driver-probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    (folder / name).write_text(token)
    try:
        started = (folder / name).stat().st_mtime_ns
        answers = lost_as_one_line(client, lambda: client.run(_probe, str(folder), name, token))
    finally:
        (folder / name).unlink()
    for worker, problem in sorted(answers.items()):
        if problem:
            raise ClusterError(f"{folder}: worker {worker} {problem}; --cache-dir must be a "
                               "path every worker shares (a network file system)")
    return started


def _reason(exc: BaseException) -> str:
    """An exception's words for a message: the OS's for an OS error, else its text."""
    if isinstance(exc, OSError) and exc.errno:
        return os_error_reason(exc)
    return library_text(exc, 160) if str(exc) else "no reason given"


def address_of(client: Any) -> str:
    return str(getattr(client.scheduler, "address", None) or "the scheduler")


def lost(client: Any, exc: BaseException, done: Optional[int] = None,
          total: Optional[int] = None) -> ClusterLostError:
    """The one line for a connection to the scheduler broken mid-run."""
    reason = ("the connection closed" if "Cancelled" in type(exc).__name__ or not str(exc)
              else _reason(exc))
    return ClusterLostError(f"{named(address_of(client))}: lost the connection to the "
                            f"scheduler mid-run ({reason}); {kept(done, total)}: run the same "
                            "command again once the scheduler is back to continue")


def kept(done: Optional[int], total: Optional[int]) -> str:
    if done is None or not total:
        return "the files done so far are cached"
    return f"the files done so far ({done} of {total}) are cached"


def lost_as_one_line(client: Any, call: Callable[[], Any]) -> Any:
    """``call()``, a broken connection to the scheduler raised as :class:`ClusterLostError`."""
    try:
        return call()
    except (OSError, TimeoutError) as exc:
        raise lost(client, exc) from None
    except Exception as exc:
        if "Cancelled" in type(exc).__name__:
            raise lost(client, exc) from None
        raise


