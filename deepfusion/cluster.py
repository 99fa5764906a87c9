"""Per-clip work on a Dask cluster: connect, check the shared cache, map tasks as they finish.

``extract --scheduler tcp://host:8786`` sends each clip to a running Dask cluster (HPC through
dask-jobqueue, Kubernetes through dask-kubernetes, or ``dask scheduler`` / ``dask worker`` by
hand); ``--scheduler local:N`` starts a ``LocalCluster`` of N single-threaded worker processes.
``distributed`` is an optional extra: this module imports it only when called.

Workers hash, decode and analyse the files and write the cache entries themselves, so the
cache folder must be one path every worker sees (a shared file system): :func:`check_shared`
proves it before any work. A worker that dies costs only its unfinished clips: the scheduler
runs them again elsewhere (Dask's ``allowed-failures`` times).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from .errors import ClusterError, ParameterError

#: Environment variable read when ``--scheduler`` is not given.
SCHEDULER_ENV = "DEEPFUSION_SCHEDULER"
#: Seconds to reach a scheduler before giving up with one line.
CONNECT_TIMEOUT = 20.0


def parse_scheduler(value: str) -> tuple[str, int]:
    """``("local", N)`` for ``local:N`` (``local`` alone: all cores), else ``(address, 0)``."""
    value = value.strip()
    if value == "local" or value.startswith("local:"):
        count = value.partition(":")[2] or str(os.cpu_count() or 1)
        if not count.isdigit() or int(count) < 1:
            raise ParameterError(f"--scheduler {value}: local:N needs a worker count N >= 1")
        return "local", int(count)
    if "://" not in value and ":" not in value:
        raise ParameterError(f"--scheduler {value}: give a scheduler address (tcp://host:8786) "
                             "or local:N")
    return value, 0


def _distributed():
    try:
        import distributed
    except ImportError:
        raise ClusterError("--scheduler needs Dask's 'distributed' package, an optional extra: "
                           "pip install 'deepfusion[distributed]'") from None
    return distributed


@contextlib.contextmanager
def connect(scheduler: str, *, timeout: float = CONNECT_TIMEOUT) -> Iterator[Any]:
    """A ``distributed.Client`` on ``scheduler`` (see :func:`parse_scheduler`), closed after.

    Raises
    ------
    ClusterError
        ``distributed`` missing, or the scheduler unreachable within ``timeout`` seconds.
    """
    address, n_local = parse_scheduler(scheduler)
    distributed = _distributed()
    import logging

    # a worker lost on purpose (or a slow start) is news for the log, not the terminal
    logging.getLogger("distributed").setLevel(logging.ERROR)
    cluster = None
    try:
        if n_local:
            cluster = distributed.LocalCluster(n_workers=n_local, threads_per_worker=1,
                                               processes=True, host="127.0.0.1",
                                               dashboard_address=None)
            client = distributed.Client(cluster, timeout=timeout)
        else:
            client = distributed.Client(address, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        raise ClusterError(f"--scheduler {scheduler}: cannot reach the scheduler within "
                           f"{timeout:g} s ({type(exc).__name__}); is it running, and is the "
                           "address right?") from None
    try:
        if not client.scheduler_info().get("workers"):
            client.wait_for_workers(1, timeout=timeout)
        yield client
    except TimeoutError:
        raise ClusterError(f"--scheduler {scheduler}: the scheduler has no worker after "
                           f"{timeout:g} s; start some (dask worker {address})") from None
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _probe(folder: str, token_name: str, token: str) -> Optional[str]:
    """On a worker: read the driver's token and write a file of its own; None if both work."""
    try:
        return _probe_folder(folder, token_name, token)
    except Exception as exc:  # noqa: BLE001 - a worker's failure must come back as text
        return f"failed the check ({type(exc).__name__}: {str(exc)[:200]})"


def _probe_folder(folder: str, token_name: str, token: str) -> Optional[str]:
    try:
        if Path(folder, token_name).read_text() != token:
            return "sees another file under that path"
    except OSError as exc:
        return f"cannot see it ({os.strerror(exc.errno or 0)}): not a shared folder"
    mine = Path(folder, f".worker-probe.{os.getpid()}.{uuid.uuid4().hex}")
    try:
        mine.write_bytes(b"")
        mine.unlink()
    except OSError as exc:
        return f"cannot write there ({os.strerror(exc.errno or 0)})"
    return None


def check_shared(client: Any, folder: Path) -> None:
    """Every worker must read what the driver wrote in ``folder`` and write there itself.

    Raises
    ------
    ClusterError
        Naming the first worker that cannot, and why.
    """
    folder = Path(folder).resolve()
    token, name = uuid.uuid4().hex, f".driver-probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    (folder / name).write_text(token)
    try:
        answers = client.run(_probe, str(folder), name, token)
    finally:
        (folder / name).unlink()
    for worker, problem in sorted(answers.items()):
        if problem:
            raise ClusterError(f"{folder}: worker {worker} {problem}; --cache-dir must be a "
                               "path every worker shares (a network file system)")


def _on_worker(fn: Callable, *args) -> tuple[str, Any]:
    """``fn(*args)`` and the address of the worker that ran it."""
    from distributed import get_worker

    return get_worker().address, fn(*args)


def map_unordered(client: Any, fn: Callable, arguments: Iterable[tuple], *,
                  in_flight: Optional[int] = None,
                  per_worker: Optional[dict[str, int]] = None) -> Iterator[Any]:
    """``fn(*args)`` for each tuple of ``arguments`` on the cluster, results as they finish.

    At most ``in_flight`` tasks (default four per worker thread) are submitted at once, so a
    collection of 100,000 files costs the driver and scheduler a bounded number of futures.
    ``per_worker`` (if given) counts the tasks each worker address ran.
    """
    distributed = _distributed()
    arguments = iter(arguments)
    if in_flight is None:
        threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
        in_flight = max(4, 4 * threads)
    pending = distributed.as_completed()

    def submit_next() -> bool:
        for args in arguments:
            pending.add(client.submit(_on_worker, fn, *args, pure=False))
            return True
        return False

    while pending.count() < in_flight and submit_next():
        pass
    for future in pending:
        worker, result = future.result()
        future.release()
        if per_worker is not None:
            per_worker[worker] = per_worker.get(worker, 0) + 1
        submit_next()                   # one more for each that finished
        yield result
