"""Hardening: hostile files, broken audio at scale, kill -9, concurrent runs and resource limits.

The sections follow the hardening issue. Where a process must crash, hang, die or race, the real
command runs as ``python -m deepfusion`` in a subprocess (with a hard timeout, so a hang fails
the test instead of stalling it); where a fault must be injected (a sleeping decoder, a full
disk) it runs in-process through ``CliRunner`` with a monkeypatch. Damaged audio comes from
``deepfusion.testing.damage``, which ``benchmarks/robustness.py`` runs at a larger scale.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import pickle
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfusion.io.run_folder import LOCK_NAME
from deepfusion.testing import (assert_same_features, assert_same_training, check_cache_entry,
                                cli_command, damage, history_rows, invoke, leftovers,
                                load_own_pickle, one_error_line, run_command, subprocess_env)
from deepfusion.views import FEATURE_KEYS

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and file systems")

#: Feature options of every extract here: short clips, small views, fast runs.
FEATURE_ARGS = ("--duration", "3", "--n-mels", "32", "--tempogram-win-length", "32")
GENRES = ("blues", "jazz", "rock", "pop")


# ----------------------------------------------------------------------------- helpers

def _check_cache(cache: Path) -> int:
    """Every cache entry loads and holds the six views and its metadata; returns the count."""
    entries = list(cache.rglob("*.npz"))
    for entry in entries:
        check_cache_entry(entry)
    return len(entries)


def _kill_when(cmd: list[str], progress, target: int, delay: float) -> bool:
    """:func:`damage.kill_when` with this module's environment; True if it killed."""
    return damage.kill_when(cmd, progress, target, delay, env=subprocess_env(), timeout=300)[0]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def dataset(work) -> Path:
    """16 clips of 3 s in four genre folders."""
    root = work / "audio"
    for i in range(16):
        path = root / GENRES[i % 4] / f"clip{i:02d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(damage.encode(damage.clip(i, seconds=3.0), "WAV", "PCM_16"))
    return root


def _extract_args(audio: Path, out: Path, cache: Path, jobs: int = 2) -> list:
    return ["extract", "--audio-dir", audio, "--out", out, "--cache-dir", cache, "--jobs", jobs,
            "--quiet", *FEATURE_ARGS]


@pytest.fixture(scope="module")
def extracted(work, dataset) -> dict:
    """An uninterrupted extract of ``dataset``."""
    out = work / "ref-extract" / "features.pkl"
    proc = run_command(*_extract_args(dataset, out, work / "ref-cache"))
    assert proc.returncode == 0, proc.stderr
    return {"out": out}


def _train_args(features: Path, model_dir: Path) -> list:
    return ["train", "--features", features, "--model-dir", model_dir, "--backbone", "light",
            "--no-pretrained", "--epochs", "4", "--batch-size", "4", "--lr", "1e-3",
            "--val-size", "0.25", "--test-size", "0.25", "--seed", "5", "--quiet",
            "--save-every", "0"]   # checkpoints after every epoch: a kill lands between them


@pytest.fixture(scope="module")
def trained(work, extracted) -> dict:
    """An uninterrupted 4-epoch training run on ``extracted``."""
    model_dir = work / "ref-model"
    proc = run_command(*_train_args(extracted["out"], model_dir))
    assert proc.returncode == 0, proc.stderr
    return {"dir": model_dir, "checkpoint": model_dir / "best.pth", "features": extracted["out"]}


# ============================================================================ 1. loading safely



PAYLOADS = {"os.system": damage.RunsShell, "exec": damage.RunsPython}


def _evil_features(path: Path, payload: str, marker: Path) -> Path:
    """A features pickle whose first clip's features would run code when loaded."""
    items = [{"features": PAYLOADS[payload](marker), "label": "rock", "path": "rock/a.wav"},
             {"features": {}, "label": "jazz", "path": "jazz/b.wav"}]
    path.write_bytes(pickle.dumps(items, protocol=2 if payload == "exec" else 5))
    return path


def _evil_checkpoint(path: Path, payload: str, marker: Path, *, zipped: bool = True) -> Path:
    """A checkpoint (torch.save, plain pickle inside) holding an object that runs code."""
    ckpt = {"extra": PAYLOADS[payload](marker), "format_version": 1,
            "model_state": {"w": torch.zeros(2)}, "model_config": {}}
    if zipped:
        torch.save(ckpt, path)
    else:
        path.write_bytes(pickle.dumps(ckpt, protocol=2))   # a bare pickle, as torch's legacy format
    return path


@pytest.mark.slow
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_malicious_features_pickle_is_refused_by_train_and_evaluate(tmp_path, trained, payload):
    marker = tmp_path / "MARKER"
    evil = _evil_features(tmp_path / "evil.pkl", payload, marker)
    runs = {
        "train": ("train", "--features", evil, "--model-dir", tmp_path / "m", "--backbone",
                  "light", "--no-pretrained", "--epochs", "1"),
        "evaluate": ("evaluate", "--checkpoint", trained["checkpoint"], "--features", evil,
                     "--split", "all", "--out-dir", tmp_path / "report"),
    }
    for name, args in runs.items():
        result = invoke(*args)
        assert result.exit_code != 0, (name, result.output)
        line = one_error_line(result.stderr)
        assert str(evil) in line and "refused" in line and "unsafe pickle" in line, (name, line)
        assert not marker.exists(), f"{name} ran the payload"
    assert not (tmp_path / "m" / "last.pth").exists()
    assert not (tmp_path / "report" / "evaluation.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("zipped", [True, False], ids=["torch.save", "bare-pickle"])
def test_malicious_checkpoint_is_refused_by_evaluate_predict_and_resume(
        tmp_path, trained, dataset, payload, zipped):
    marker = tmp_path / "MARKER"
    evil = _evil_checkpoint(tmp_path / "evil.pth", payload, marker, zipped=zipped)
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    _evil_checkpoint(resume_dir / "last.pth", payload, marker, zipped=zipped)
    runs = {
        "evaluate": ("evaluate", "--checkpoint", evil, "--out-dir", tmp_path / "report"),
        "predict": ("predict", dataset / "rock" / "clip02.wav", "--checkpoint", evil),
        "train --resume": ("train", "--features", trained["features"], "--model-dir", resume_dir,
                           "--resume"),
    }
    for name, args in runs.items():
        result = invoke(*args)
        assert result.exit_code != 0, (name, result.output)
        line = one_error_line(result.stderr)
        assert "refused" in line and "objects other than tensors" in line, (name, line)
        assert ("posix.system" if payload == "os.system" else "exec") in line, (name, line)
        assert not marker.exists(), f"{name} ran the payload"
    assert sorted(p.name for p in resume_dir.iterdir() if p.name != LOCK_NAME) == ["last.pth"]


@pytest.mark.slow
def test_split_file_paths_cannot_leave_the_dataset_root(tmp_path, trained):
    split = tmp_path / "split.csv"
    split.write_text("path,split\nrock/clip02.wav,train\n../../etc/passwd,test\n")
    for args in (("train", "--features", trained["features"], "--model-dir", tmp_path / "m",
                  "--backbone", "light", "--no-pretrained", "--epochs", "1", "--split-file", split),
                 ("evaluate", "--checkpoint", trained["checkpoint"], "--split-file", split,
                  "--out-dir", tmp_path / "report")):
        result = invoke(*args)
        assert result.exit_code != 0
        line = one_error_line(result.stderr)
        assert "line 3" in line and "'../../etc/passwd'" in line and "leaves the dataset root" in line


# ========================================================================= 2. broken audio at scale

N_DAMAGED, N_GOOD = 520, 40


@pytest.mark.slow
def test_hundreds_of_damaged_files_neither_crash_nor_hang_extract_or_predict(tmp_path, trained):
    root = tmp_path / "audio" / "mixed"
    root.mkdir(parents=True)
    good = damage.good_files(N_GOOD, seed=1)
    damaged = damage.damaged_files(N_DAMAGED, seed=1)
    for name, data in good.items():
        (root / name).write_bytes(data)
    for name, (data, _) in damaged.items():
        (root / name).write_bytes(data)
    assert len(set(d for _, d in damaged.values())) == len(damage.DAMAGES)
    out = tmp_path / "out" / "features.pkl"
    proc = run_command("extract", "--audio-dir", tmp_path / "audio", "--out", out, "--cache-dir",
                tmp_path / "cache", "--jobs", "2", "--quiet", "--duration", "2",
                "--min-duration", "0.5", "--timeout", "30", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not [ln for ln in proc.stderr.splitlines() if ln.startswith("Error: ")]

    items = {it["path"]: it for it in load_own_pickle(out)}
    with open(out.with_name("extract_errors.csv"), newline="") as fh:
        errors = {row["path"]: row["reason"] for row in csv.DictReader(fh)}
    skipped = dict(ln[len("skipped "):].split(": ", 1) for ln in proc.stderr.splitlines()
                   if ln.startswith("skipped "))
    assert skipped == errors
    every = {f"mixed/{name}" for name in [*good, *damaged]}
    assert set(items) | set(errors) == every and not set(items) & set(errors)
    assert {f"mixed/{name}" for name in good} <= set(items), "a good file was not extracted"
    assert all(reason.strip() for reason in errors.values())
    assert len(errors) >= N_DAMAGED // 2          # most damage is detected, not decoded as noise
    for it in items.values():
        for key in FEATURE_KEYS:
            assert np.isfinite(it["features"][key]).all(), (it["path"], key)

    # predict decodes the same files window by window, with seeks: another path through
    # libsndfile (a header claiming 1 Hz used to turn one damaged file into hours of windows)
    proc = run_command("predict", root, "--checkpoint", trained["checkpoint"], "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not [ln for ln in proc.stderr.splitlines() if ln.startswith("Error: ")]
    done = {Path(json.loads(ln)["path"]).name for ln in proc.stdout.splitlines()}
    skipped = {Path(ln[len("skipped "):].split(": ", 1)[0]).name
               for ln in proc.stderr.splitlines() if ln.startswith("skipped ")}
    assert set(good) <= done
    assert done | skipped == {*good, *damaged} and not done & skipped


@pytest.mark.slow
def test_a_header_claiming_1_hz_is_an_invalid_header(tmp_path, trained):
    """Its few kilobytes would "last" hours: thousands of predict windows for one bad file."""
    data = damage.DAMAGES["wav_rate_one"][1](None, damage.encode(damage.clip(0), "WAV", "PCM_16"))
    (tmp_path / "rock").mkdir()
    (tmp_path / "rock" / "one_hz.wav").write_bytes(data)
    fine = damage.encode(damage.clip(1, seconds=3.0), "WAV", "PCM_16")
    (tmp_path / "rock" / "fine.wav").write_bytes(fine)
    t0 = time.perf_counter()
    result = invoke("predict", tmp_path / "rock", "--checkpoint", trained["checkpoint"])
    assert time.perf_counter() - t0 < 60
    assert result.exit_code == 0, result.output
    assert f"skipped {tmp_path / 'rock' / 'one_hz.wav'}: damaged header (it claims 1 channel at 1 Hz)" \
        in result.stderr
    result = invoke(*_extract_args(tmp_path, tmp_path / "f.pkl", tmp_path / "cache", jobs=1))
    assert result.exit_code == 0, result.output
    assert "skipped rock/one_hz.wav: damaged header (it claims 1 channel at 1 Hz)" in result.stderr


def test_timeout_abandons_a_decode_that_hangs(tmp_path, monkeypatch):
    """The per-file limit interrupts a decoder stuck in Python (a C library that never returns
    to the interpreter cannot be interrupted by a signal; libsndfile returned on every file of
    the damaged-audio test)."""
    import deepfusion.audio

    real_decode = deepfusion.audio.decode

    def stuck(path, **kwargs):
        if "stuck" in Path(path).name:
            time.sleep(120)
        return real_decode(path, **kwargs)

    monkeypatch.setattr(deepfusion.audio, "decode", stuck)
    root = tmp_path / "audio" / "rock"
    root.mkdir(parents=True)
    for i, name in enumerate(["a.wav", "stuck.wav", "z.wav"]):
        (root / name).write_bytes(damage.encode(damage.clip(i, seconds=2.0), "WAV", "PCM_16"))
    t0 = time.perf_counter()
    result = invoke("extract", "--audio-dir", tmp_path / "audio", "--out", tmp_path / "f.pkl",
                     "--cache-dir", tmp_path / "cache", "--jobs", "1", "--quiet",
                     "--duration", "2", "--timeout", "1.5")
    assert time.perf_counter() - t0 < 60
    assert result.exit_code == 0, result.output
    assert ("skipped rock/stuck.wav: took longer than --timeout 1.5 s (decoding it); give a larger "
            "--timeout, or --timeout 0 for no limit") in result.stderr
    assert [it["path"] for it in load_own_pickle(tmp_path / "f.pkl")] == ["rock/a.wav", "rock/z.wav"]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_timeout_during_first_imports_does_not_break_later_files(tmp_path):
    """A limit that expired while librosa's lazy imports (scipy.ndimage, numba) ran left
    half-initialised modules behind, and every later file of that worker failed ("partially
    initialized module 'numba' has no attribute 'core'"). Fresh processes (forks) give their
    first file limits that expire at different moments of those imports; their second file must
    then work."""
    for i in range(2):
        (tmp_path / f"{i}.wav").write_bytes(damage.encode(damage.clip(i, seconds=2.0), "WAV", "PCM_16"))
    script = f"""
import os
from deepfusion.config import FeatureConfig
from deepfusion.jobs.job import compute_entry
from deepfusion.io.cache import file_digest
config = FeatureConfig(duration=2.0).to_dict()
folder = {str(tmp_path)!r}
children = []
for limit in (0.05, 0.1, 0.2, 0.3, 0.5, 0.8):
    pid = os.fork()
    if pid == 0:
        cache = folder + "/cache" + str(limit)
        first = compute_entry(folder + "/0.wav", file_digest(folder + "/0.wav"), cache, config,
                              timeout=limit)
        second = compute_entry(folder + "/1.wav", file_digest(folder + "/1.wav"), cache, config,
                               timeout=120)
        os.write(1, f"{{limit}} {{first}} | {{second}}\\n".encode())  # one write: children run at once
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
"""
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 6, proc.stdout + proc.stderr
    for line in lines:
        limit, first, second = re.fullmatch(r"(\S+) (.*) \| (.*)", line).groups()
        assert first in ("None", f"took longer than --timeout {limit} s (decoding it); give a larger --timeout, "
                                  "or --timeout 0 for no limit"), line
        assert second == "None", line


# ============================================================================= 3. crash safety

EXTRACT_TRIALS, TRAIN_TRIALS = 3, 2


@pytest.mark.slow
def test_kill_9_during_extract_then_rerun_equals_uninterrupted(work, dataset, extracted):
    rng = random.Random(11)
    killed = 0
    for trial in range(EXTRACT_TRIALS):
        out, cache = work / f"kill-extract-{trial}" / "features.pkl", work / f"kill-cache-{trial}"
        args = _extract_args(dataset, out, cache)
        target = rng.randint(0, 16)
        killed += _kill_when(cli_command(*args), damage.cache_entries(cache), target,
                             rng.uniform(0, 1.5 if target == 0 else 0.3))
        proc = run_command(*args)
        assert proc.returncode == 0, proc.stderr
        assert_same_features(out, extracted["out"])
        assert leftovers(out.parent, cache) == []
        assert sorted(p.name for p in out.parent.iterdir()) == \
            [".features.pkl.extract.json", "extract_errors.csv", "features.pkl"]
        assert _check_cache(cache) == 16
    assert killed >= 1, "every run ended before its kill: nothing was tested"


@pytest.mark.slow
def test_kill_9_while_a_feature_store_is_written_then_rerun_equals_uninterrupted(
        work, dataset, extracted):
    """Kills land while the store's arrays are written (progress: a version folder exists) or
    just after; the re-run's store must hold what the uninterrupted pickle holds, in one
    version folder, with no temporary file left. (How many kills land mid-write depends on
    the machine's speed; test_store.py kills a writer mid-write deterministically.)"""
    from deepfusion.io.features_file import load_feature_set
    from deepfusion.io.store import open_store

    reference = load_feature_set(extracted["out"])
    rng = random.Random(13)
    killed = 0
    for trial in range(EXTRACT_TRIALS):
        out, cache = work / f"kill-store-{trial}" / "features.store", work / f"kill-store-cache-{trial}"
        args = [*_extract_args(dataset, out, cache), "--format", "store"]
        if trial:   # later trials start from a complete store and update it (a new --n-mfcc)
            assert run_command(*args, "--n-mfcc", "13").returncode == 0

        def writing():
            try:
                return int(any(p.name.startswith("v.") and p.stat().st_mtime_ns > started
                               for p in out.iterdir()))
            except OSError:       # not there yet, or an old version removed while listed
                return 0
        started = time.time_ns()
        killed += _kill_when(cli_command(*args), writing, 1, rng.uniform(0, 0.01))
        if (out / "meta.json").exists():     # whatever the kill hit, the store reads whole
            before = open_store(out)
            assert before.rows()["mfcc"] in (13, 20) and len(before) == 16
        proc = run_command(*args)
        assert proc.returncode == 0, proc.stderr
        store = open_store(out)
        assert store.paths == reference.paths and (store.groups == reference.groups).all()
        for key in FEATURE_KEYS:
            np.testing.assert_array_equal(store.arrays[key], reference.arrays[key])
        assert leftovers(out.parent, cache) == []
        names = sorted(p.name for p in out.iterdir())
        assert names[:2] == [".lock", "meta.json"] and len(names) == 3 and names[2].startswith("v.")
    assert killed >= 1, "every run ended before its kill: nothing was tested"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are read from /proc")
def test_temp_file_of_a_killed_worker_left_as_a_zombie_is_removed(tmp_path):
    """CI failed once here: a worker killed mid-write whose parent was killed too is
    re-parented to PID 1, and where PID 1 does not reap (containers) it stays a zombie;
    ``kill(pid, 0)`` succeeds on zombies, so its temporary file counted as still being
    written and survived the re-run. The zombie is made here by not reaping a child."""
    from deepfusion.io.atomic import remove_stale_temps

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        stat = Path(f"/proc/{child.pid}/stat")
        deadline = time.monotonic() + 30
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)
        dead = tmp_path / "ab" / f".entry.npz.{child.pid}.0123abcd.tmp"
        live = tmp_path / "ab" / f".other.npz.{os.getpid()}.0123abcd.tmp"
        dead.parent.mkdir()
        dead.write_bytes(b"half an entry")
        live.write_bytes(b"being written")
        assert remove_stale_temps(tmp_path, recursive=True) == 1
        assert not dead.exists() and live.exists()
    finally:
        child.wait()


@pytest.mark.slow
def test_kill_9_during_train_then_resume_equals_uninterrupted(work, trained):
    rng = random.Random(12)
    killed = 0
    for trial in range(TRAIN_TRIALS):
        model_dir = work / f"kill-train-{trial}"
        args = _train_args(trained["features"], model_dir)
        killed += _kill_when(cli_command(*args), damage.history_epochs(model_dir), rng.randint(0, 3),
                             rng.uniform(0, 0.3))
        if (model_dir / "last.pth").exists():
            proc = run_command("train", "--features", trained["features"], "--model-dir", model_dir,
                        "--resume", "--quiet")
        else:  # killed before the first epoch was saved: nothing to resume, start again
            proc = run_command(*args)
        assert proc.returncode == 0, proc.stderr
        assert_same_training(model_dir, trained["dir"])
        assert leftovers(model_dir) == []
        assert sorted(p.name for p in model_dir.iterdir() if p.name != LOCK_NAME) == \
            ["best.pth", "last.pth", "training_history.csv", "training_history.png"]
    assert killed >= 1, "every run ended before its kill: nothing was tested"


@pytest.mark.slow
def test_resume_repairs_history_and_respects_an_early_stop(tmp_path, trained):
    """Two ways a resumed run used to differ from an uninterrupted one: a kill between last.pth
    and training_history.csv left the CSV an epoch short for good, and a run that had stopped
    early trained on after --resume."""
    model_dir = tmp_path / "m"
    args = _train_args(trained["features"], model_dir)
    args[args.index("--epochs") + 1] = "6"
    args[args.index("--lr") + 1] = "1e-9"           # nothing improves: early stop after 2 epochs
    # (on validation accuracy: the validation loss still drifts with BatchNorm's statistics)
    proc = run_command(*args, "--patience", "1", "--select", "val_acc")
    assert proc.returncode == 0, proc.stderr
    assert "early stop" in proc.stdout
    full = history_rows(model_dir)
    assert len(full) == 2
    best = (model_dir / "best.pth").read_bytes()
    # the CSV as a kill right after last.pth was written leaves it
    lines = (model_dir / "training_history.csv").read_text().splitlines(keepends=True)
    (model_dir / "training_history.csv").write_text("".join(lines[:-1]))
    (model_dir / "training_history.png").unlink()
    proc = run_command("train", "--features", trained["features"], "--model-dir", model_dir, "--resume",
                "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "epoch   3" not in proc.stdout
    assert history_rows(model_dir) == full
    assert (model_dir / "training_history.png").is_file()
    after = torch.load(model_dir / "best.pth", weights_only=True)
    before = torch.load(io.BytesIO(best), weights_only=True)
    assert after["epoch"] == before["epoch"] == 1
    for key, tensor in before["model_state"].items():
        assert torch.equal(tensor, after["model_state"][key])


# ============================================================================= 4. concurrency

@pytest.mark.slow
@pytest.mark.parametrize("outputs", ["separate", "same"])
def test_two_extracts_on_one_cache_at_once(tmp_path, dataset, extracted, outputs):
    cache = tmp_path / "cache"
    outs = [tmp_path / "a" / "features.pkl",
            tmp_path / ("b" if outputs == "separate" else "a") / "features.pkl"]
    procs = [subprocess.Popen(cli_command(*_extract_args(dataset, out, cache)), env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for out in outs]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
    assert _check_cache(cache) == 16
    for out in set(outs):
        assert_same_features(out, extracted["out"])
        assert leftovers(out.parent) == []
    assert leftovers(cache) == []


@pytest.mark.slow
def test_damaged_cache_entries_are_computed_again(tmp_path, work, dataset, extracted):
    """However an entry is damaged (a torn write by another tool, a bad disk), it is never
    loaded half: a header numpy cannot even tokenize used to escape as an internal error."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(work / "ref-cache", cache)
    entries = sorted(cache.rglob("*.npz"))
    damages = {
        "truncated": lambda d: d[: len(d) // 2],
        "unparsable header": lambda d: d.replace(b"), }", b"(, }", 1),
        "flipped sample byte": lambda d: d[:-2000] + bytes([d[-2000] ^ 0xFF]) + d[-1999:],
        "zeros": lambda d: bytes(len(d)),
        "random bytes": lambda d: np.random.default_rng(0).bytes(len(d)),
    }
    for entry, break_it in zip(entries, damages.values()):
        before = entry.read_bytes()
        entry.write_bytes(break_it(before))
        assert entry.read_bytes() != before
    out = tmp_path / "out" / "features.pkl"
    proc = run_command(*_extract_args(dataset, out, cache))
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"^16 clips \({len(damages)} computed, {16 - len(damages)} from cache\)",
                     proc.stdout, re.M), proc.stdout
    assert_same_features(out, extracted["out"])
    assert _check_cache(cache) == 16


# ================================================================================= 5. limits

_MAXRSS = damage.MAXRSS_SCRIPT


def peak_rss_mb(*args, timeout: float = 600) -> tuple[float, float]:
    """Run a deepfusion command; the peak resident memory (MB) of its main process and of its
    largest worker."""
    proc = subprocess.run([sys.executable, "-c", _MAXRSS, *map(str, args)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    own, workers = re.search(r"MAXRSS_KB (\d+) (\d+)", proc.stderr).groups()
    return int(own) / 1024, int(workers) / 1024




@pytest.mark.slow
def test_a_ten_minute_file_is_read_in_bounded_memory(tmp_path):
    long = damage.write_long_wav(tmp_path / "long" / "g" / "long.wav", 600)       # 115 MB of PCM
    damage.write_long_wav(tmp_path / "short" / "g" / "short.wav", 30)
    peaks = {}
    for name in ("long", "short"):
        peaks[name], _ = peak_rss_mb(*_extract_args(tmp_path / name, tmp_path / f"{name}.pkl",
                                                    tmp_path / f"cache-{name}"))
    assert long.stat().st_size > 100e6
    # decoded in full it would be 230 MB of float32 stereo; read as one clip it costs nothing
    assert peaks["long"] - peaks["short"] < 25, peaks


@pytest.mark.slow
def test_many_files_cost_no_memory_beyond_their_features(tmp_path):
    """Peak memory over 200 and 800 short files: it grows by about the features, nothing more
    (a decoded clip kept per file would add 66 kB each, 40 MB here). The six views only: with
    the pretrained view each worker holds torch, whose allocator's peak moved by 27 MB between
    the two runs in one of two full-suite runs (under 20 MB in the other), which this
    20-MB bound cannot tell from a leak."""
    small = ("--duration", "1.5", "--min-duration", "0.5", "--sr", "11025", "--n-fft", "1024",
             "--hop-length", "512", "--n-mels", "16", "--n-mfcc", "13", "--tempogram-win-length", "16",
             "--pretrained-view", "none")
    for i in range(800):
        path = tmp_path / "audio" / f"g{i % 8}" / f"c{i:04d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(damage.encode(damage.clip(i, seconds=1.5), "WAV", "PCM_16"))
    few = tmp_path / "few"
    for path in sorted((tmp_path / "audio").rglob("*.wav"))[::4]:
        (few / path.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(path, few / path.parent.name / path.name)
    peaks, sizes = {}, {}
    for name, folder in (("few", few), ("many", tmp_path / "audio")):
        out = tmp_path / f"{name}.pkl"
        peaks[name] = peak_rss_mb("extract", "--audio-dir", folder, "--out", out, "--cache-dir",
                                  tmp_path / f"cache-{name}", "--jobs", "2", "--quiet", *small)
        sizes[name] = out.stat().st_size / 2**20
        assert len(load_own_pickle(out)) == (200 if name == "few" else 800)
    growth = peaks["many"][0] - peaks["few"][0]
    results = sizes["many"] - sizes["few"]
    assert growth < 2 * results + 12, (peaks, sizes)
    assert peaks["many"][1] - peaks["few"][1] < 20, (peaks, sizes)   # workers: flat


READ_ONLY = [Path("/proc/deepfusion"), Path("/proc/self"), Path("/sys/deepfusion")]
#: The first work of each stage after its outputs are checked: (module, function).
FIRST_WORK = {"extract": ("deepfusion.extract", "feature_tasks"),     # decoding, in workers
              "train": ("deepfusion.train.run", "load_features"),
              "evaluate": ("deepfusion.evaluate", "load_features")}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("folder", READ_ONLY, ids=str)
@pytest.mark.parametrize("stage", ["extract --out", "extract --cache-dir", "train --model-dir",
                                   "evaluate --out-dir"])
def test_output_on_a_read_only_file_system_fails_before_any_work(tmp_path, dataset, trained,
                                                                  stage, folder, monkeypatch):
    """As root, chmod stops nothing: /proc and /sys are file systems nobody can write."""
    import importlib

    module, name = FIRST_WORK[stage.split()[0]]
    module = importlib.import_module(module)
    work, called = getattr(module, name), []

    def spy(*args, **kwargs):
        called.append(name)
        return work(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)
    cache = tmp_path / "cache"
    args = {
        "extract --out": _extract_args(dataset, folder / "features.pkl", cache),
        "extract --cache-dir": _extract_args(dataset, tmp_path / "features.pkl", folder / "cache"),
        "train --model-dir": _train_args(trained["features"], folder / "model"),
        "evaluate --out-dir": ["evaluate", "--checkpoint", trained["checkpoint"], "--out-dir",
                               folder / "report"],
    }[stage]
    result = invoke(*args)
    assert result.exit_code != 0
    line = one_error_line(result.stderr)
    assert str(folder) in line and ("cannot write" in line or "cannot create" in line), line
    assert called == [], f"{stage}: {name} ran before the refusal ({line})"
    assert not cache.exists() and not (tmp_path / "features.pkl").exists()


class _FullDisk:
    """Patches deepfusion.io.atomic's ``open``: after ``after`` writes of files named like
    ``target`` have succeeded, the next ones take ``room`` bytes and then fail with ENOSPC."""

    def __init__(self, target: str, *, after: int = 0, room: int = 4096):
        self.target, self.after, self.room, self.hits = target, after, room, 0

    def __call__(self, file, mode="r", *args, **kwargs):
        if "w" not in mode or self.target not in Path(file).name:
            return open(file, mode, *args, **kwargs)
        self.hits += 1
        if self.hits <= self.after:
            return open(file, mode, *args, **kwargs)
        raw = _NoSpace(file, "w", room=self.room)
        if "b" in mode:
            return io.BufferedWriter(raw)
        return io.TextIOWrapper(io.BufferedWriter(raw), encoding=kwargs.get("encoding"),
                                errors=kwargs.get("errors"), newline=kwargs.get("newline"))


class _NoSpace(io.FileIO):
    def __init__(self, file, mode, *, room: int):
        super().__init__(file, mode)
        self.room = room

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def _assert_disk_full_error(result, path: Path) -> None:
    assert result.exit_code != 0
    line = one_error_line(result.stderr)
    assert str(path) in line and "cannot write (disk full)" in line, line


@pytest.mark.slow
def test_full_disk_keeps_the_previous_features_and_cache(tmp_path, dataset, extracted, monkeypatch):
    import deepfusion.io.atomic

    out, cache = tmp_path / "out" / "features.pkl", tmp_path / "cache"
    ok = invoke(*_extract_args(dataset, out, cache, jobs=1))
    assert ok.exit_code == 0, ok.output
    before = out.read_bytes()
    full = _FullDisk("features.pkl")
    monkeypatch.setattr(deepfusion.io.atomic, "open", full, raising=False)
    again = invoke(*_extract_args(dataset, out, cache, jobs=1), "--chroma-tuning", "0")  # new work
    assert full.hits >= 1
    _assert_disk_full_error(again, out)
    assert out.read_bytes() == before                      # the previous file is untouched
    assert leftovers(out.parent, cache) == []
    assert _check_cache(cache) == 32                       # the new entries were all kept
    full = _FullDisk(".npz")                               # and a full disk while caching
    monkeypatch.setattr(deepfusion.io.atomic, "open", full, raising=False)
    third = invoke(*_extract_args(dataset, out, cache, jobs=1), "--hop-length", "256")
    assert full.hits >= 1
    assert third.exit_code != 0 and "cannot write (disk full)" in one_error_line(third.stderr)
    assert out.read_bytes() == before and leftovers(out.parent, cache) == []


@pytest.mark.slow
def test_full_disk_during_training_stops_cleanly_and_resume_finishes(tmp_path, trained, monkeypatch):
    import deepfusion.io.atomic

    full = _FullDisk("last.pth", after=1)            # epoch 1 fits on the disk, epoch 2 does not
    monkeypatch.setattr(deepfusion.io.atomic, "open", full, raising=False)
    model_dir = tmp_path / "m"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                         # as the reference run (OMP_NUM_THREADS=1)
    try:
        result = invoke(*_train_args(trained["features"], model_dir))
        _assert_disk_full_error(result, model_dir / "last.pth")
        assert full.hits == 2
        assert torch.load(model_dir / "last.pth", weights_only=True)["epoch"] == 1
        assert leftovers(model_dir) == []
        monkeypatch.undo()
        resumed = invoke("train", "--features", trained["features"], "--model-dir", model_dir,
                          "--resume", "--quiet")
    finally:
        torch.set_num_threads(threads)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after epoch 1" in resumed.stdout
    assert_same_training(model_dir, trained["dir"])
