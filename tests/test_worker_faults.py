"""Cluster and worker faults, through the CLI: every way a Dask cluster or a worker process
fails is one line naming the scheduler, worker or file and what to do, with a documented exit
status (2: not an address; 1: the cluster cannot be used; 75: the run stopped partway, run it
again); what finished before a fault stays cached, and the rerun computes only the rest and
counts computed and cached clips right.

Every server is started here on 127.0.0.1 (or a port where nothing listens) and stopped here.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from deepfusion.errors import EXIT_RETRY, death_cause, worker_crash
from deepfusion.testing import (cli_command, closed_port, invoke, one_error_line, run_command,
                                subprocess_env)
from deepfusion.testing.faults import crash_on, hooked_env

ARGS = ("--duration", "6", "--quiet")
N_CLIPS = 18


def _entries(cache: Path) -> int:
    return len(list(cache.rglob("*.npz")))


def _summary(stdout: str) -> tuple[int, int]:
    """``(computed, from cache)`` of extract's summary line."""
    found = re.search(rf"{N_CLIPS} clips \((\d+) computed, (\d+) from cache\)", stdout)
    assert found, stdout
    return int(found[1]), int(found[2])


def _extract(audio: Path, tmp_path: Path, *more) -> tuple:
    return ("extract", "--audio-dir", audio, "--out", tmp_path / "f.pkl", "--cache-dir",
            tmp_path / "cache", *ARGS, *more)


# ------------------------------------------------------------------- addresses and reachability

@pytest.mark.parametrize("value, words", [
    ("foo:bar", "the port 'bar' is not a number"),
    ("tcp://", "no host"),
    ("tcp://127.0.0.1:99999", "not a number from 1 to 65535"),
    ("127.0.0.1:0", "not a number from 1 to 65535"),
    ("http://127.0.0.1:8786", "unknown scheme 'http'"),
    ("tcp://bad host:8786", "'bad host' is not a host name"),
    ("tcp://127.0.0.1", "no port"),
])
def test_what_is_not_an_address_is_one_line_and_exit_2(tiny_audio, tmp_path, value, words):
    result = invoke(*_extract(tiny_audio, tmp_path, "--scheduler", value))
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert words in line and "tcp://HOST:8786" in line, line
    assert not (tmp_path / "cache").exists()          # refused before any work


def test_unreachable_schedulers_are_one_line_at_once(tiny_audio, tmp_path):
    for value, words in ((f"tcp://127.0.0.1:{closed_port()}", "nothing listens there"),
                         (f"127.0.0.1:{closed_port()}", "nothing listens there"),
                         ("tcp://no-such-host.invalid:8786", "is not known")):
        t0 = time.perf_counter()
        result = invoke(*_extract(tiny_audio, tmp_path, "--scheduler", value))
        assert time.perf_counter() - t0 < 10, value       # Dask alone retries for 20 s
        assert result.exit_code == 1, result.output
        line = one_error_line(result.stderr)
        assert words in line and value.rpartition(":")[0].rpartition("/")[2] in line, line
    assert not (tmp_path / "f.pkl").exists()


@pytest.mark.slow
def test_a_silent_port_is_one_line_in_bounded_time(tiny_audio, tmp_path, monkeypatch):
    """A port that accepts connections and never speaks (a black hole, a wrong service)."""
    pytest.importorskip("distributed")
    monkeypatch.setenv("DEEPFUSION_SCHEDULER_TIMEOUT", "2")
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)                                  # never accepted
        address = f"tcp://127.0.0.1:{hole.getsockname()[1]}"
        for _ in range(2):                    # the backlog full: the second SYN is dropped
            t0 = time.perf_counter()
            result = invoke(*_extract(tiny_audio, tmp_path, "--scheduler", address))
            assert time.perf_counter() - t0 < 15
            assert result.exit_code == 1, result.output
            line = one_error_line(result.stderr)
            assert address in line and "within 2 s" in line, line
            assert "DEEPFUSION_SCHEDULER_TIMEOUT" in line, line
    monkeypatch.setenv("DEEPFUSION_SCHEDULER_TIMEOUT", "soon")
    result = invoke(*_extract(tiny_audio, tmp_path, "--scheduler", address))
    assert result.exit_code == 2 and "DEEPFUSION_SCHEDULER_TIMEOUT=soon" in result.stderr


# ------------------------------------------------------------------------- a worker's death

def test_a_dead_workers_line_reads_well():
    """joblib's text ("The exit codes of the workers are {SIGSEGV(-11)}") came out as
    "(exit codes of, SIGSEGV)"."""
    text = ("A worker process managed by the executor was unexpectedly terminated. This could "
            "be caused by a segmentation fault while calling the function or by an excessive "
            "memory usage causing the Operating System to kill the worker.\n\nThe exit codes "
            "of the workers are {SIGSEGV(-11)}")
    line = str(worker_crash(RuntimeError(text), "extracting"))
    assert line.startswith("a worker process died while extracting (crashed with SIGSEGV, a "
                           "fault in native code such as an audio decoder); the files finished "
                           "so far are cached: run the same command again to continue"), line
    assert "exit codes of" not in line and "\n" not in line
    assert "out-of-memory killer" in death_cause("{SIGKILL(-9), SIGKILL(-9)}")
    assert death_cause("{SIGKILL(-9), SIGKILL(-9)}").count("SIGKILL") == 1
    assert death_cause("{EXIT(3)}") == "exited with status 3"
    assert worker_crash(RuntimeError("gone"), "x").exit_code == EXIT_RETRY == 75


def _crashing_run(args: tuple, tmp_path: Path, name: str = "techno.00002.wav"
                  ) -> tuple[subprocess.CompletedProcess, Path]:
    """``deepfusion ARGS`` with a worker crashing (SIGSEGV, as a decoder on a damaged file) when
    given the file ``name``; the file that arms the hook."""
    hook, armed = crash_on(tmp_path / "hooks", name, signum=signal.SIGSEGV)
    proc = subprocess.run(cli_command(*args), env=hooked_env(hook), capture_output=True,
                          text=True, timeout=300)
    return proc, armed


def _check_crash_line(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == EXIT_RETRY, proc.stderr
    line = one_error_line(proc.stderr)     # no faulthandler dump from the worker above it
    assert line.startswith(f"Error: a worker process died while {what} (crashed with SIGSEGV, "
                           "a fault in native code"), line
    assert "run the same command again to continue" in line, line


@pytest.mark.slow
def test_a_crashed_joblib_worker_in_extract(tiny_audio, tmp_path):
    args = _extract(tiny_audio, tmp_path, "--jobs", "2")
    proc, _ = _crashing_run(args, tmp_path)
    _check_crash_line(proc, "extracting")
    kept = _entries(tmp_path / "cache")
    assert kept >= 2 and not (tmp_path / "f.pkl").exists()
    again = run_command(*args)
    assert again.returncode == 0, again.stderr
    assert _summary(again.stdout) == (N_CLIPS - kept, kept)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "embed"])
def test_a_crashed_joblib_worker_in_predict_and_embed(tiny_audio, trained_model_dir, tmp_path,
                                                      command):
    out = tmp_path / ("p.csv" if command == "predict" else "e.npz")
    args = (command, tiny_audio, "--checkpoint", trained_model_dir / "best.pth", "--cache-dir",
            tmp_path / "cache", "--out", out, "--jobs", "2")
    proc, _ = _crashing_run(args, tmp_path)
    _check_crash_line(proc, "analysing files")
    assert not out.exists()
    again = run_command(*args[:-1], "1")          # the rest, in this process
    assert again.returncode == 0, again.stderr
    assert out.exists()


# ------------------------------------------------------------------------ a Dask cluster's

@pytest.mark.slow
def test_a_scheduler_without_workers(tiny_audio, tmp_path):
    pytest.importorskip("distributed")
    from deepfusion.testing.dask import dask_cluster

    with dask_cluster(tmp_path / "dask", n_workers=0) as cluster:
        t0 = time.perf_counter()
        proc = run_command(*_extract(tiny_audio, tmp_path, "--scheduler", cluster.address),
                           DEEPFUSION_SCHEDULER_TIMEOUT="3")
    assert time.perf_counter() - t0 < 30
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc.stderr)
    assert f"{cluster.address}: the scheduler has no worker after 3 s" in line, line
    assert f"dask worker {cluster.address}" in line, line


def _start_and_wait(args: tuple, cache: Path, entries: int = 2, **env: str) -> subprocess.Popen:
    run = subprocess.Popen(cli_command(*args), env=subprocess_env(**env), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and run.poll() is None and _entries(cache) < entries:
        time.sleep(0.05)
    assert run.poll() is None, "extract ended before the fault"
    return run


@pytest.mark.slow
def test_a_scheduler_lost_mid_run(tiny_audio, tmp_path):
    pytest.importorskip("distributed")
    from deepfusion.testing.dask import dask_cluster

    cache = tmp_path / "cache"
    with dask_cluster(tmp_path / "dask", n_workers=2) as cluster:
        args = _extract(tiny_audio, tmp_path, "--scheduler", cluster.address)
        run = _start_and_wait(args, cache)
        cluster.scheduler.kill()
        t0 = time.perf_counter()
        stdout, stderr = run.communicate(timeout=120)
        assert time.perf_counter() - t0 < 60
    # (the workers are stopped: nothing is written after this)
    assert run.returncode == EXIT_RETRY, stderr
    line = one_error_line(stderr)
    assert f"--scheduler {cluster.address}: lost the connection to the scheduler mid-run" in line
    assert "run the same command again once the scheduler is back" in line, line
    kept = _entries(cache)
    assert kept >= 2 and not (tmp_path / "f.pkl").exists()
    again = run_command(*_extract(tiny_audio, tmp_path, "--jobs", "1"))
    assert again.returncode == 0, again.stderr
    assert _summary(again.stdout) == (N_CLIPS - kept, kept)


@pytest.mark.slow
def test_every_worker_gone_mid_run(tiny_audio, tmp_path):
    """Workers without a nanny to restart them (preempted, a job's time limit): the tasks
    would wait for a worker forever."""
    pytest.importorskip("distributed")
    from deepfusion.testing.dask import dask_cluster

    cache = tmp_path / "cache"
    with dask_cluster(tmp_path / "dask", n_workers=2) as cluster:
        run = _start_and_wait(_extract(tiny_audio, tmp_path, "--scheduler", cluster.address),
                              cache, DEEPFUSION_SCHEDULER_TIMEOUT="3")
        pids = cluster.worker_pids()
        for nanny in cluster.workers:
            nanny.kill()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == EXIT_RETRY, stderr
    line = one_error_line(stderr)
    assert f"--scheduler {cluster.address}: no worker left for 3 s mid-run" in line, line
    assert "run the same command again once workers are back" in line, line


@pytest.mark.slow
def test_a_file_that_kills_its_worker_stops_the_run_and_the_rerun_goes_on(tiny_audio, tmp_path):
    """A task whose workers die (the out-of-memory killer on one huge file): Dask gives up
    after allowed-failures (KilledWorker); it was an internal error with a traceback."""
    pytest.importorskip("distributed")
    from deepfusion.testing.dask import dask_cluster

    preload, armed = crash_on(tmp_path / "hook", "waltz.00002.wav")
    cache = tmp_path / "cache"
    with dask_cluster(tmp_path / "dask", n_workers=2, preload=preload,
                      DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="1") as cluster:
        args = _extract(tiny_audio, tmp_path, "--scheduler", cluster.address)
        proc = run_command(*args)
        assert proc.returncode == EXIT_RETRY, proc.stderr
        line = one_error_line(proc.stderr)
        assert re.search(rf"--scheduler {cluster.address}: worker tcp://127\.0\.0\.1:\d+ died "
                         r"on \S+\.wav, the last of 2 workers lost while running it", line), line
        assert "run the same command again to continue" in line, line
        assert not (tmp_path / "f.pkl").exists()
        cluster.wait_idle()                # tasks the stopped run left on the workers
        kept = _entries(cache)
        assert 2 <= kept < N_CLIPS
        armed.unlink()
        again = run_command(*args)
    assert again.returncode == 0, again.stderr
    assert _summary(again.stdout) == (N_CLIPS - kept, kept)


@pytest.mark.slow
def test_results_a_lost_worker_held_count_as_computed(tiny_audio, tmp_path):
    """Dask runs again the tasks whose results died with their worker (here: a worker killed
    as it starts a file, its previous result not yet fetched); the second attempt finds the
    entry the first one wrote. On a fresh cache that counted "17 computed, 1 from cache"."""
    pytest.importorskip("distributed")
    from deepfusion.testing.dask import dask_cluster

    preload, armed = crash_on(tmp_path / "hook", "techno.00004.wav", once=True)
    with dask_cluster(tmp_path / "dask", n_workers=2, preload=preload) as cluster:
        proc = run_command(*_extract(tiny_audio, tmp_path, "--scheduler", cluster.address))
    assert proc.returncode == 0, proc.stderr
    assert not armed.exists()                           # a worker was lost
    assert _summary(proc.stdout) == (N_CLIPS, 0)
    assert _entries(tmp_path / "cache") == N_CLIPS
