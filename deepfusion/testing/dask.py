"""A real Dask cluster on 127.0.0.1 for tests and benchmarks, started by the ``dask scheduler``
and ``dask worker`` commands (as users start theirs) and stopped with them (a worker that dies
on a chosen file: :func:`deepfusion.testing.faults.crash_on` as ``preload``)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from deepfusion.testing import subprocess_env


@dataclass
class DaskProcesses:
    address: str
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes (the nannies' children) as the scheduler knows them."""
        from distributed import Client

        with Client(self.address, timeout=20) as client:
            return sorted(client.run(os.getpid).values())

    def wait_idle(self, timeout: float = 120) -> None:
        """Until the scheduler holds no task: a task a stopped client left running on a
        worker (which Dask cannot interrupt) has finished and written what it writes."""
        from distributed import Client

        with Client(self.address, timeout=20) as client:
            deadline = time.time() + timeout
            while client.run_on_scheduler(_n_tasks) and time.time() < deadline:
                time.sleep(0.2)


@contextlib.contextmanager
def dask_cluster(folder: Path, n_workers: int = 2, *, preload: Optional[Path] = None,
                 timeout: float = 90, **env: str) -> Iterator[DaskProcesses]:
    """``dask scheduler`` and ``n_workers`` single-threaded ``dask worker`` processes (with
    nannies) on 127.0.0.1, ``env`` added to their environment (Dask's settings, e.g.
    ``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="1"``); every process is stopped on exit.
    ``n_workers=0``: a scheduler alone."""
    folder.mkdir(parents=True, exist_ok=True)
    info = folder / "scheduler.json"
    info.unlink(missing_ok=True)
    env = subprocess_env(**env)
    dask = [sys.executable, "-m", "dask"]
    logs = []

    def start(cmd: list[str], name: str) -> subprocess.Popen:
        log = open(folder / f"{name}.log", "w")
        logs.append(log)
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    scheduler = start([*dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                       "--no-dashboard", "--scheduler-file", str(info)], "scheduler")
    procs = DaskProcesses("", scheduler)
    try:
        deadline = time.time() + timeout
        while not info.exists() and time.time() < deadline and scheduler.poll() is None:
            time.sleep(0.1)
        if not info.exists():
            raise RuntimeError(f"dask scheduler did not start: {(folder / 'scheduler.log').read_text()[-2000:]}")
        time.sleep(0.2)                           # the file is written in one go; be safe
        procs.address = json.loads(info.read_text())["address"]
        for i in range(n_workers):
            procs.workers.append(start(
                [*dask, "worker", procs.address, "--host", "127.0.0.1", "--nthreads", "1",
                 "--nworkers", "1", "--no-dashboard",
                 *(["--preload", str(preload)] if preload else [])], f"worker{i}"))
        from distributed import Client

        if n_workers:
            with Client(procs.address, timeout=timeout) as client:
                client.wait_for_workers(n_workers, timeout=timeout)
        yield procs
    finally:
        for proc in [*procs.workers, scheduler]:
            proc.terminate()
        for proc in [*procs.workers, scheduler]:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


def _n_tasks(dask_scheduler) -> int:
    return len(dask_scheduler.tasks)

