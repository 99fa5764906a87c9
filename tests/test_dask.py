"""extract on a Dask cluster: a LocalCluster, and a scheduler and workers started by the
``dask`` commands on 127.0.0.1 (one of them killed mid-run); the same output as joblib."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepfusion.testing import (assert_same_features, cli_command, closed_port, invoke,
                                one_error_line, run_command, subprocess_env)

pytest.importorskip("distributed")

ARGS = ("--duration", "6", "--quiet")


@pytest.fixture(scope="module")
def joblib_run(tiny_audio, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("joblib")
    out = work / "features.pkl"
    proc = run_command("extract", "--audio-dir", tiny_audio, "--out", out, "--cache-dir",
                       work / "cache", "--jobs", "2", *ARGS)
    assert proc.returncode == 0, proc.stderr
    return out


def _cache_entries(cache: Path) -> int:
    return len(list(cache.rglob("*.npz")))


@pytest.mark.slow
def test_a_local_cluster_writes_what_joblib_writes(tiny_audio, joblib_run, tmp_path):
    out = tmp_path / "features.pkl"
    proc = run_command("extract", "--audio-dir", tiny_audio, "--out", out, "--cache-dir",
                       tmp_path / "cache", "--scheduler", "local:2", "--duration", "6")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("18 clips (18 computed, 0 from cache)"), proc.stdout
    workers = next(ln for ln in proc.stdout.splitlines() if ln.startswith("files per Dask worker"))
    assert workers.count("tcp://127.0.0.1:") == 2, workers
    assert out.read_bytes() == joblib_run.read_bytes()          # byte for byte
    assert_same_features(out, joblib_run)
    # the environment variable names the cluster too, and the cache is shared with joblib's
    proc = run_command("extract", "--audio-dir", tiny_audio, "--out", out, "--cache-dir",
                       tmp_path / "cache", *ARGS, DEEPFUSION_SCHEDULER="local:1")
    assert proc.returncode == 0 and "(0 computed, 18 from cache)" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_dask_commands_and_a_worker_killed_mid_run(tiny_audio, joblib_run, tmp_path):
    from deepfusion.testing.dask import dask_cluster

    with dask_cluster(tmp_path / "dask", n_workers=2) as cluster:
        out, cache = tmp_path / "features.pkl", tmp_path / "cache"
        proc = run_command("extract", "--audio-dir", tiny_audio, "--out", out, "--cache-dir",
                           cache, "--scheduler", cluster.address, "--duration", "6")
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == joblib_run.read_bytes()
        ran = next(ln for ln in proc.stdout.splitlines() if ln.startswith("files per Dask worker"))
        assert ran.count("tcp://127.0.0.1:") == 2, ran           # both workers did work

        # kill -9 one worker process once the first entries exist: its clips run elsewhere
        victim = cluster.worker_pids()[0]
        out2, cache2 = tmp_path / "killed.pkl", tmp_path / "cache2"
        run = subprocess.Popen(cli_command("extract", "--audio-dir", tiny_audio, "--out", out2,
                                           "--cache-dir", cache2, "--scheduler", cluster.address,
                                           *ARGS),
                               env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and run.poll() is None and _cache_entries(cache2) < 2:
            time.sleep(0.05)
        assert run.poll() is None, "extract ended before a worker could be killed"
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
        assert "Traceback" not in stderr
        assert out2.read_bytes() == joblib_run.read_bytes()     # as if nothing had happened
        assert _cache_entries(cache2) == 18


def test_an_unreachable_scheduler_gets_one_line_in_bounded_time(tiny_audio, tmp_path):
    t0 = time.perf_counter()
    proc = run_command("extract", "--audio-dir", tiny_audio, "--out", tmp_path / "f.pkl",
                       "--cache-dir", tmp_path / "cache", "--scheduler",
                       f"tcp://127.0.0.1:{closed_port()}", *ARGS, timeout=120)
    assert time.perf_counter() - t0 < 60
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "cannot reach the scheduler" in line and "127.0.0.1" in line, line
    assert not (tmp_path / "f.pkl").exists()


def test_bad_scheduler_values_and_a_missing_extra(tiny_audio, tmp_path, monkeypatch):
    base = ("extract", "--audio-dir", tiny_audio, "--out", tmp_path / "f.pkl", "--cache-dir",
            tmp_path / "cache", *ARGS)
    for value, words in (("local:0", "worker count"), ("nonsense", "scheduler address")):
        result = invoke(*base, "--scheduler", value)
        assert result.exit_code == 2 and words in one_error_line(result.stderr)
    monkeypatch.setitem(sys.modules, "distributed", None)        # not installed
    result = invoke(*base, "--scheduler", "local:1")
    line = one_error_line(result.stderr)
    assert "pip install 'deepfusion[distributed]'" in line, line


_HIDE = """
# a worker on another machine: the driver's folder does not exist there
import deepfusion.runtime.cluster as cluster
if not hasattr(cluster, "_seen_probe_folder"):   # the preload may run more than once
    cluster._seen_probe_folder = cluster._probe_folder
    cluster._probe_folder = lambda folder, name, token: cluster._seen_probe_folder(
        folder + "-elsewhere", name, token)
"""


@pytest.mark.slow
def test_a_cache_the_workers_cannot_see_is_refused_before_work(tiny_audio, tmp_path):
    from deepfusion.testing.dask import dask_cluster

    preload = tmp_path / "hide_cache.py"
    preload.write_text(_HIDE)
    with dask_cluster(tmp_path / "dask", n_workers=1, preload=preload) as cluster:
        proc = run_command("extract", "--audio-dir", tiny_audio, "--out", tmp_path / "f.pkl",
                           "--cache-dir", tmp_path / "cache", "--scheduler", cluster.address,
                           *ARGS)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 1
    assert "cannot see it" in line and "every worker shares" in line, line
    assert _cache_entries(tmp_path / "cache") == 0
