"""runtime/heap: a feature worker keeps its large blocks from one clip to the next (glibc),
the environment's own settings win, and warm_up sets both once per process."""

import os
import platform
import subprocess
import sys

import pytest

from deepfusion.jobs import job
from deepfusion.runtime import heap

GLIBC = platform.libc_ver()[0] == "glibc"

# What a clip's views do, in small: ten 16-MiB arrays live at once (160 MiB, under the kept
# 256), then all freed; ten rounds. Prints the minor page faults of the last nine rounds (the
# first always faults its pages in). numpy asks for huge pages where it can, so a fault may
# be 4 KiB or 2 MiB: the tests compare counts, never pages.
FAULTS = """
import resource, sys
import numpy as np
from deepfusion.runtime import heap
if sys.argv[1] == "keep":
    heap.keep_large_blocks()
def clip():
    arrays = [np.ones(2 << 20) for _ in range(10)]
    del arrays
clip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    clip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], env={**clean, **env},
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_a_worker_reuses_its_large_blocks_from_one_clip_to_the_next():
    kept, default = _faults("keep"), _faults("plain")
    assert kept * 10 < default, (kept, default)


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_the_environment_s_allocator_settings_win():
    dask = {"MALLOC_TRIM_THRESHOLD_": "65536"}        # what a Dask nanny gives its workers
    assert _faults("keep", **dask) > 10 * _faults("keep"), "the environment was overridden"
    assert _says("MALLOC_MMAP_THRESHOLD_") is False
    assert _says("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072") is False
    assert _says("GLIBC_TUNABLES", "glibc.rtld.nns=2") is True    # another tunable: not ours


def _says(variable: str, value: str = "131072") -> bool:
    code = "from deepfusion.runtime import heap; print(heap.keep_large_blocks())"
    env = {**{k: v for k, v in os.environ.items()
              if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}, variable: value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip() == "True"


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_it_says_whether_it_set_them():
    assert _says("UNRELATED") is True


def _warm_ups(monkeypatch, *, claimed: bool) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(job, "_warmed", set())
    monkeypatch.setattr(job, "claimed", lambda: claimed)
    monkeypatch.setattr(job, "keep_large_blocks", lambda: calls.append("keep"))
    monkeypatch.setattr(job, "freeze_imports", lambda **k: calls.append("freeze"))
    monkeypatch.setattr(job, "numpy_features", lambda *a, **k: calls.append("views"))
    config = job.FeatureConfig()
    job.warm_up(config, features=True)
    job.warm_up(config, features=True)
    job.warm_up(config, features=False)       # another kind: warmed, not set again
    return calls


def test_warm_up_sets_the_heap_and_freezes_the_imports_once_in_its_own_process(monkeypatch):
    assert _warm_ups(monkeypatch, claimed=True) == ["keep", "views", "freeze"]


def test_a_program_calling_the_api_keeps_its_process_as_it_was(monkeypatch):
    assert _warm_ups(monkeypatch, claimed=False) == ["views"]


def test_a_failed_warm_up_freezes_nothing(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(job, "_warmed", set())
    monkeypatch.setattr(job, "claimed", lambda: True)
    monkeypatch.setattr(job, "keep_large_blocks", lambda: calls.append("keep"))
    monkeypatch.setattr(job, "freeze_imports", lambda **k: calls.append("freeze"))

    def broken(*args, **kwargs):
        raise RuntimeError("a library that failed to import")
    monkeypatch.setattr(job, "numpy_features", broken)
    job.warm_up(job.FeatureConfig(), features=True)
    assert calls == ["keep"]


@pytest.mark.parametrize("compiled_before", [False, True])
def test_the_garbage_of_a_compiling_warm_up_is_collected_before_the_freeze(
        monkeypatch, tmp_path, compiled_before):
    marker = tmp_path / "marker"
    if compiled_before:
        marker.touch()
    asked: list[bool] = []
    monkeypatch.setattr(job, "_warmed", set())
    monkeypatch.setattr(job, "claimed", lambda: True)
    monkeypatch.setattr(job, "_jit_marker", lambda features: marker)
    monkeypatch.setattr(job, "keep_large_blocks", lambda: None)
    monkeypatch.setattr(job, "freeze_imports", lambda *, collect: asked.append(collect))
    monkeypatch.setattr(job, "numpy_features", lambda *a, **k: None)
    job.warm_up(job.FeatureConfig(), features=True)
    assert asked == [not compiled_before]


def test_the_installed_command_is_the_claiming_entry_point():
    import configparser
    from pathlib import Path

    from deepfusion import __main__ as command

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    scripts = dict(line.split(" = ") for line in
                   cfg["options.entry_points"]["console_scripts"].split("\n") if line.strip())
    module, name = scripts["deepfusion"].split(":")
    assert (module, getattr(command, name)) == ("deepfusion.__main__", command.run)


def test_the_command_and_the_local_workers_claim_their_processes(monkeypatch):
    from deepfusion import __main__ as command
    from deepfusion.runtime.pool import pool_results

    assert all(pool_results(heap.claimed, [()] * 4, 2, ordered=True, what="testing"))
    seen = []
    monkeypatch.setattr(heap, "_claimed", False)
    monkeypatch.setattr(command, "main", lambda: seen.append(heap.claimed()))
    command.run()
    assert seen == [True]


@pytest.mark.skipif(GLIBC, reason="another C library than glibc")
def test_elsewhere_nothing_is_set():
    assert heap.keep_large_blocks() is False
