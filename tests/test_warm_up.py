"""The workers' warm-up: only the first JIT compilation on a machine is serialised.

Every worker process runs :func:`deepfusion.jobs.job.warm_up` before its first file. The first
one on a machine compiles librosa's numba functions under a lock (two compilers at once can
leave a cache that crashes later runs); once one has finished, the others load the cache side
by side instead of queueing behind the lock one whole warm-up at a time.
"""

from __future__ import annotations

import getpass
import subprocess
import sys
import tempfile
import threading

import pytest

from deepfusion.jobs import job as tasks

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock held by a child process")

HOLDER = r"""
import fcntl, sys, time
fh = open(sys.argv[1], "a+b")
fcntl.flock(fh, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()          # hold until the test says
if sys.argv[2] != "-":
    open(sys.argv[2], "w").close()    # as a finished warm-up does
"""


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _hold_lock(temp_dir, marker_after: str = "-") -> subprocess.Popen:
    lock = temp_dir / f"deepfusion-jit-{getpass.getuser()}.lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), marker_after],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _lock_is_free(temp_dir) -> bool:
    probe = ("import fcntl, sys\nfh = open(sys.argv[1], 'a+b')\n"
             "try:\n    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n"
             "    sys.exit(1)\n")
    lock = temp_dir / f"deepfusion-jit-{getpass.getuser()}.lock"
    return subprocess.run([sys.executable, "-c", probe, str(lock)]).returncode == 0


def test_the_marker_names_this_librosa_numba_and_kind_of_warm_up(temp_dir, monkeypatch):
    a = tasks._jit_marker(True)
    assert a is not None and a.parent == temp_dir
    assert a == tasks._jit_marker(True)
    assert a != tasks._jit_marker(False)          # a worker that only decodes (torch backend)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(temp_dir / "elsewhere"))
    assert tasks._jit_marker(True) != a       # another cache: compile again, locked


def test_after_a_finished_warm_up_others_do_not_wait_for_the_lock(temp_dir):
    marker = tasks._jit_marker(True)
    marker.touch()
    holder = _hold_lock(temp_dir)      # a process compiling (something else) right now
    entered = threading.Event()

    def other():
        with tasks._one_compiler(marker):
            entered.set()

    worker = threading.Thread(target=other)
    worker.start()
    try:
        assert entered.wait(5), "waited for the lock although the cache is complete"
    finally:
        holder.communicate("\n")
        worker.join(30)


def test_the_first_warm_up_waits_then_the_next_runs_without_the_lock(temp_dir):
    marker = tasks._jit_marker(True)
    assert not marker.exists()
    holder = _hold_lock(temp_dir, marker_after=str(marker))   # the first compiler
    entered = threading.Event()
    free_inside = []

    def second():
        with tasks._one_compiler(marker):
            entered.set()
            free_inside.append(_lock_is_free(temp_dir))

    worker = threading.Thread(target=second)
    worker.start()
    try:
        assert not entered.wait(1.0)          # waits while the first compiles
    finally:
        holder.communicate("\n")              # the first finishes and writes the marker
    worker.join(30)
    assert entered.is_set()
    assert free_inside == [True]              # loads the cache without holding the lock


def test_without_a_marker_the_warm_up_holds_the_lock_and_writes_it(temp_dir):
    marker = tasks._jit_marker(False)
    held = []
    with tasks._one_compiler(marker) as done:
        held.append(not _lock_is_free(temp_dir))
        done()
    assert held == [True] and marker.exists()
    assert _lock_is_free(temp_dir)
