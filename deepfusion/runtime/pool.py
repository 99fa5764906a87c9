"""Running the per-file jobs they are handed: on joblib's worker processes (loky's reusable
pool: :func:`pool_results`) or on a Dask cluster (:func:`map_unordered`, connected by
:mod:`deepfusion.runtime.cluster`). Either submits a task as the caller takes a result, so what
is done but not yet taken stays bounded; a worker lost midway becomes one line, and what
finished is kept. The jobs themselves are :mod:`deepfusion.jobs`."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from deepfusion.errors import ClusterLostError, WorkerCrashError
from deepfusion.runtime.cluster import (address_of, connect_timeout, kept, load_distributed, lost,
                                        lost_as_one_line, named)
from deepfusion.runtime.heap import claim


def recount(results: Iterable[tuple[int, tuple]], entry_path: Callable[[str], Path],
            started: int) -> Iterator[tuple[int, tuple]]:
    """``(index, (key, reason, computed, ...))`` with ``computed`` true for an entry this run
    wrote, whichever task attempt wrote it.

    Dask runs a task again when the worker holding its result is lost before the driver has
    it; the second attempt finds the entry the first one wrote and says "cached", so a run
    that lost a worker counted clips it computed as from the cache. An entry whose file is
    dated ``started`` or later (see :func:`check_shared`) was computed by this run; the first
    clip of each content counts it, a duplicate file of the same content counts as cached.
    """
    counted: set[str] = set()
    for index, (key, reason, computed, *rest) in results:
        if reason is None and key not in counted:
            if not computed:
                with contextlib.suppress(OSError):
                    computed = os.stat(entry_path(key)).st_mtime_ns >= started
        elif reason is None:
            computed = False
        if computed:
            counted.add(key)
        yield index, (key, reason, computed, *rest)


#: Seconds between looks at the scheduler while no task finishes.
_LOOK_EVERY = 2.0


def dask_in_flight(client: Any) -> int:
    """:func:`map_unordered`'s default bound: four tasks per worker thread of the cluster."""
    workers = lost_as_one_line(client, lambda: client.scheduler_info()["workers"])
    return max(4, 4 * sum(w.get("nthreads", 1) for w in workers.values()))


def map_unordered(client: Any, fn: Callable, arguments: Iterable[tuple], *,
                  in_flight: Optional[int] = None,
                  per_worker: Optional[dict[str, int]] = None,
                  label: Optional[Callable[[tuple], str]] = None,
                  total: Optional[int] = None,
                  no_worker_timeout: Optional[float] = None) -> Iterator[Any]:
    """``fn(*args)`` for each tuple of ``arguments`` on the cluster, results as they finish.

    At most ``in_flight`` tasks (default four per worker thread) are submitted at once, so a
    collection of 100,000 files costs the driver and scheduler a bounded number of futures.
    ``per_worker`` (if given) counts the tasks each worker address ran; ``label`` names a
    task's arguments in messages (a file), ``total`` is how many there are.

    Raises
    ------
    WorkerCrashError
        Dask gave up on a task after the workers running it died (``KilledWorker``: its
        ``allowed-failures`` retries spent), naming the last worker and the task.
    ClusterLostError
        The connection to the scheduler broke (the futures were cancelled, or a
        communication error reached the client), or the scheduler has had no worker for
        ``no_worker_timeout`` seconds (default :func:`connect_timeout`): every worker gone.

    An exception raised by ``fn`` itself is raised here as it was.
    """
    import time

    distributed = load_distributed()
    no_worker_timeout = connect_timeout() if no_worker_timeout is None else no_worker_timeout
    arguments = iter(arguments)
    if in_flight is None:
        in_flight = dask_in_flight(client)
    pending: dict[Any, tuple] = {}             # future -> its arguments, for messages
    done = 0

    def submit_next() -> bool:
        for args in arguments:
            future = lost_as_one_line(
                client, lambda: client.submit(on_worker, fn, *args, pure=False))
            pending[future] = args
            return True
        return False

    def crash(exc: Any) -> WorkerCrashError:
        args = next((a for f, a in pending.items() if f.key == exc.task), None)
        what = f" on {label(args)}" if label and args is not None else ""
        last = getattr(exc.last_worker, "address", exc.last_worker)
        return WorkerCrashError(
            f"{named(address_of(client))}: worker {last} died{what}, the last of "
            f"{exc.allowed_failures + 1} workers lost while running it (out of memory, "
            f"preempted, or a crash in native code); {kept(done, total)}: run the same "
            "command again to continue (if a worker dies on the same file again, move that "
            "file aside)")

    while len(pending) < in_flight and submit_next():
        pass
    idle_since: Optional[float] = None
    while pending:
        try:
            finished = distributed.wait(list(pending), timeout=_LOOK_EVERY,
                                        return_when="FIRST_COMPLETED").done
        except TimeoutError:
            finished = set()
        except Exception as exc:            # the futures cancelled: the scheduler is gone
            if isinstance(exc, OSError) or "Cancelled" in type(exc).__name__:
                raise lost(client, exc, done, total) from None
            raise
        if not finished:       # every worker gone (preempted, no nanny) waits forever: bound it
            workers = lost_as_one_line(client, lambda: client.scheduler_info()["workers"])
            idle_since = None if workers else idle_since or time.monotonic()
            if idle_since is not None and time.monotonic() - idle_since > no_worker_timeout:
                raise ClusterLostError(
                    f"{named(address_of(client))}: no worker left for "
                    f"{no_worker_timeout:g} s mid-run (all stopped or preempted); "
                    f"{kept(done, total)}: run the same command again once workers are back "
                    f"(dask worker {address_of(client)}) to continue")
            continue
        idle_since = None
        for future in finished:
            try:
                worker, result = future.result()
            except distributed.KilledWorker as exc:
                raise crash(exc) from None
            except Exception as exc:
                if future.status == "error":
                    raise                   # fn's own exception, as joblib would raise it
                if isinstance(exc, (OSError, TimeoutError)) or "Cancelled" in type(exc).__name__:
                    raise lost(client, exc, done, total) from None
                raise
            del pending[future]
            future.release()
            done += 1
            if per_worker is not None:
                per_worker[worker] = per_worker.get(worker, 0) + 1
            submit_next()                   # one more for each that finished
            yield result


def default_jobs() -> int:
    """All usable cores."""
    import joblib

    return max(1, joblib.cpu_count())


#: Seconds an idle local worker waits for work before it exits (joblib's default for its pool).
IDLE_WORKER_SECONDS = 300

#: Environment variables that size a library's thread pool, set in each local worker as joblib
#: sets them (cores / workers, unless set here already): the workers share the cores.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS", "NUMEXPR_NUM_THREADS")


#: The warning filter (``-W`` syntax) that keeps loky's resource tracker quiet: its warnings
#: all begin "resource_tracker".
TRACKER_WARNINGS = "ignore:resource_tracker:UserWarning"


def _worker_env(n_jobs: int) -> dict[str, str]:
    """The environment joblib gives ``n_jobs`` workers: :data:`THREAD_VARS`, and TBB's IPC."""
    share = str(max(1, default_jobs() // n_jobs))
    return {**{var: os.environ.get(var, share) for var in THREAD_VARS},
            "ENABLE_IPC": os.environ.get("ENABLE_IPC", "1")}


def pool_results(fn: Callable, arguments: Iterable[tuple], n_jobs: int, *, ordered: bool,
                 what: str, in_flight: Optional[int] = None) -> Iterator:
    """``fn(*args)`` for each tuple of ``arguments`` on ``n_jobs`` local worker processes
    (joblib's loky pool), in the order of ``arguments`` or (``ordered`` False) as they finish.

    At most ``in_flight`` tasks (default ``2 * n_jobs``) are submitted and not yet consumed: a
    new one is submitted each time the caller takes a result, not each time one finishes, so
    a caller busy with what it was given (a batch on the device) holds at most ``in_flight``
    results it has not asked for (decoded clips), however many files there are, while the
    workers keep working up to that bound.

    A worker killed by a signal becomes one line (:func:`~deepfusion.errors.worker_crash`,
    ``what`` says what the workers were doing). A caller that stops early (Ctrl-C, SIGTERM, an
    error) ends the workers here, as joblib does, quietly: the command has already said in one
    line what happened and that finished work is kept. An exception raised by ``fn`` itself
    is raised here as it was.
    """
    import queue
    from collections import deque

    from joblib.externals.loky import get_reusable_executor
    from joblib.externals.loky.process_executor import BrokenProcessPool

    from deepfusion.errors import worker_crash

    if not os.environ.get("DEEPFUSION_DEBUG"):
        # loky turns on faulthandler in its workers unless this is set: a dying worker's 40
        # lines of Python stack would bury worker_crash's one line (empty: Python leaves it off)
        os.environ.setdefault("PYTHONFAULTHANDLER", "")
        # loky's resource tracker (a process of its own, started with this environment) warns
        # on stderr as it cleans up the semaphores of a pool whose worker was killed, when one
        # is gone already ("resource_tracker: /loky-...: FileNotFoundError"): under that same
        # one line, now and then
        filters = os.environ.get("PYTHONWARNINGS", "")
        if TRACKER_WARNINGS not in filters.split(","):
            os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [filters, TRACKER_WARNINGS]))
    in_flight = max(1, 2 * n_jobs if in_flight is None else int(in_flight))
    # the workers are deepfusion's own processes (runtime.heap: their allocator is tuned)
    executor = get_reusable_executor(max_workers=n_jobs, timeout=IDLE_WORKER_SECONDS,
                                     env=_worker_env(n_jobs), initializer=claim)
    arguments = iter(arguments)
    waiting: deque = deque()                    # submitted, not yet consumed, in order
    finished: queue.SimpleQueue = queue.SimpleQueue()   # (unordered) done, in the order they finished

    def submit_next() -> None:
        for args in arguments:
            future = executor.submit(fn, *args)
            if not ordered:
                future.add_done_callback(finished.put)
            waiting.append(future)
            return

    complete = False
    try:
        for _ in range(in_flight):
            submit_next()
        while waiting:
            if ordered:
                future = waiting.popleft()
            else:
                future = finished.get()
                waiting.remove(future)          # at most in_flight long
            result = future.result()
            yield result
            submit_next()                       # one more for each the caller took
        complete = True
    except BrokenProcessPool as exc:
        raise worker_crash(exc, what) from None
    finally:
        if not complete:
            for future in waiting:
                future.cancel()
            executor.shutdown(wait=True, kill_workers=True)


def indexed(index: int, task: Callable, *args) -> tuple[int, tuple]:
    return index, task(*args)


def on_worker(fn: Callable, *args) -> tuple[str, Any]:
    """``fn(*args)`` and the address of the worker that ran it."""
    from distributed import get_worker

    return get_worker().address, fn(*args)
