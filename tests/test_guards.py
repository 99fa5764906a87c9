"""Hardening II: outputs never destroy inputs, runs never mix, inputs that would hang or be
misread are refused, SIGTERM ends a run as Ctrl-C does. Through the real commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from deepfusion.io.run_folder import LOCK_NAME
from deepfusion.testing import (HOLD_LOCK, cli_command, invoke, leftovers, one_error_line,
                                run_command, subprocess_env)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX files and signals")

LIGHT = ("--backbone", "light", "--no-pretrained", "--epochs", "1", "--batch-size", "8",
         "--val-size", "0.2", "--test-size", "0.2", "--quiet")
SMALL = ("--duration", "6", "--jobs", "1", "--quiet")


def _extract(audio: Path, out: Path, cache: Path, *extra):
    return invoke("extract", "--audio-dir", audio, "--out", out, "--cache-dir", cache, *SMALL, *extra)


# ------------------------------------------------------------------ 1. outputs against inputs

def test_extract_refuses_an_out_that_is_one_of_its_inputs(tiny_audio, tmp_path):
    clip = next(tiny_audio.rglob("*.wav"))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\n" + "".join(
        f"{p.relative_to(tiny_audio).as_posix()},{p.parent.name}\n" for p in tiny_audio.rglob("*.wav")))
    link = tmp_path / "link.pkl"
    link.symlink_to(clip)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    cases = {clip: "--out is an audio file, which this command reads",
             link: "--out is an audio file, which this command reads",
             manifest: "--out is the --manifest, which this command reads",
             notes: "is not a features pickle"}
    for out, words in cases.items():
        before = out.read_bytes()
        result = _extract(tiny_audio, out, tmp_path / "cache", "--manifest", manifest)
        assert result.exit_code != 0, out
        line = one_error_line(result.stderr)
        assert words in line and str(out) in line, line
        assert out.read_bytes() == before, f"{out} was changed"
    report = tmp_path / "elsewhere" / "extract_errors.csv"
    report.parent.mkdir()
    report.write_text("my,own,table\n")
    result = _extract(tiny_audio, report.with_name("f.pkl"), tmp_path / "cache")
    assert "is not an extract error report" in one_error_line(result.stderr)
    assert report.read_text() == "my,own,table\n"


def test_train_and_evaluate_refuse_outputs_over_their_inputs(tiny_features, trained_model_dir,
                                                            tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    features = folder / "best.pth"                    # a features file where best.pth would go
    features.write_bytes(tiny_features.read_bytes())
    result = invoke("train", "--features", features, "--model-dir", folder, *LIGHT)
    assert (f"{features} is the features file, which this command reads; give another "
            "--model-dir") in one_error_line(result.stderr)
    assert features.read_bytes() == tiny_features.read_bytes()

    ckpt = tmp_path / "report" / "predictions.csv"     # a checkpoint where a report would go
    ckpt.parent.mkdir()
    ckpt.write_bytes((trained_model_dir / "best.pth").read_bytes())
    result = invoke("evaluate", "--checkpoint", ckpt)
    assert (f"{ckpt} is the checkpoint, which this command reads; give another --out-dir"
            in one_error_line(result.stderr))
    assert ckpt.read_bytes() == (trained_model_dir / "best.pth").read_bytes()


# ---------------------------------------------------------------------- 2. one run per folder

@pytest.mark.slow
def test_a_used_model_folder_needs_resume_or_overwrite(tiny_features, tmp_path):
    out = tmp_path / "m"
    assert invoke("train", "--features", tiny_features, "--model-dir", out, *LIGHT).exit_code == 0
    first = (out / "best.pth").read_bytes()
    assert invoke("evaluate", "--checkpoint", out / "best.pth").exit_code == 0
    again = invoke("train", "--features", tiny_features, "--model-dir", out, *LIGHT, "--seed", "4")
    line = one_error_line(again.stderr)
    assert str(out) in line and "holds a run" in line and "--resume" in line and "--overwrite" in line
    assert (out / "best.pth").read_bytes() == first
    both = invoke("train", "--features", tiny_features, "--model-dir", out, "--resume", "--overwrite")
    assert "give one of them" in one_error_line(both.stderr)
    replaced = invoke("train", "--features", tiny_features, "--model-dir", out, *LIGHT,
                      "--seed", "4", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert (out / "best.pth").read_bytes() != first
    assert not (out / "evaluation.json").exists()       # the old run's report went with it
    assert torch.load(out / "best.pth", weights_only=True)["train_config"]["seed"] == 4


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_dead_owner_frees_the_folder(tiny_features, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / LOCK_NAME)],
                              env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = invoke("train", "--features", tiny_features, "--model-dir", out, *LIGHT)
        line = one_error_line(result.stderr)
        assert "another process is writing this model folder" in line
        assert f"pid {holder.pid}" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()                                   # kill -9: no clean-up of its own
        holder.wait()
    result = invoke("train", "--features", tiny_features, "--model-dir", out, *LIGHT)
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------- 3. inputs: BOM, duplicates, FIFOs

@pytest.mark.slow
def test_csv_inputs_with_a_byte_order_mark_are_read(tiny_audio, tiny_features, tmp_path):
    rows = [f"{p.relative_to(tiny_audio).as_posix()},{p.parent.name}"
            for p in sorted(tiny_audio.rglob("*.wav"))]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n", encoding="utf-8-sig")
    result = _extract(tiny_audio, tmp_path / "f.pkl", tmp_path / "cache", "--manifest", manifest)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{len(rows)} clips")
    split = tmp_path / "split.csv"
    names = [r.split(",")[0] for r in rows]
    split.write_text("path,split\n" + "\n".join(
        f"{n},{('train', 'train', 'train', 'val', 'test', 'train')[i % 6]}" for i, n in enumerate(names)),
        encoding="utf-8-sig")
    result = invoke("train", "--features", tiny_features, "--model-dir", tmp_path / "m",
                    "--split-file", split, *LIGHT)
    assert result.exit_code == 0, result.output


def test_repeated_manifest_and_split_rows_are_refused(tiny_audio, tiny_features, tmp_path):
    clip = next(tiny_audio.rglob("*.wav")).relative_to(tiny_audio).as_posix()
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path,label\n{clip},rock\n{clip},jazz\n")
    result = _extract(tiny_audio, tmp_path / "f.pkl", tmp_path / "cache", "--manifest", manifest)
    line = one_error_line(result.stderr)
    assert "line 3" in line and "listed again (first on line 2)" in line
    split = tmp_path / "split.csv"
    split.write_text(f"path,split\n{clip},train\n{clip},test\n")
    result = invoke("train", "--features", tiny_features, "--model-dir", tmp_path / "m",
                    "--split-file", split, *LIGHT)
    line = one_error_line(result.stderr)
    assert "line 3" in line and "listed again" in line


@pytest.mark.slow
def test_fifos_as_inputs_are_refused_not_waited_on(tiny_audio, tiny_features, trained_model_dir,
                                                   tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    runs = {
        "--features": ("train", "--features", fifo, "--model-dir", tmp_path / "m", *LIGHT),
        "evaluate --features": ("evaluate", "--checkpoint", trained_model_dir / "best.pth",
                                "--features", fifo, "--out-dir", tmp_path / "r", "--split", "all"),
        "--manifest": ("extract", "--audio-dir", tiny_audio, "--manifest", fifo,
                       "--out", tmp_path / "f.pkl", "--cache-dir", tmp_path / "c", *SMALL),
        "--split-file": ("train", "--features", tiny_features, "--model-dir", tmp_path / "m2",
                         "--split-file", fifo, *LIGHT),
    }
    for name, args in runs.items():
        proc = run_command(*args, timeout=120)          # a hang fails here, never stalls
        assert proc.returncode != 0, name
        line = one_error_line(proc.stderr)
        assert str(fifo) in line and "FIFO" in line, (name, line)


# ------------------------------------------------------------------------------ 4. SIGTERM

def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2:][:1] not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_sigterm_ends_extract_and_its_workers_like_ctrl_c(tmp_path):
    from deepfusion.synth import synthesize_dataset

    audio = tmp_path / "audio"
    synthesize_dataset(audio, genres=2, clips_per_genre=8, duration=20.0, seed=3)
    cache = tmp_path / "cache"
    proc = subprocess.Popen(cli_command("extract", "--audio-dir", audio, "--out", tmp_path / "f.pkl",
                                        "--cache-dir", cache, "--jobs", "2", "--quiet"),
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    workers: set[int] = set()
    while time.time() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        if len(workers) >= 2 and any(cache.rglob("*.npz")):
            break
        time.sleep(0.1)
    assert proc.poll() is None and workers, "extract ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("Interrupted: finished work is kept")
    assert "Traceback" not in stderr
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    assert not [p for p in workers if _alive(p)], "workers outlived extract"
    assert leftovers(cache, tmp_path) == []
    rerun = run_command("extract", "--audio-dir", audio, "--out", tmp_path / "f.pkl",
                        "--cache-dir", cache, "--jobs", "2", "--quiet")
    assert rerun.returncode == 0 and "from cache" in rerun.stdout, rerun.stderr


# ------------------------------------------------------------- 5. what is cached is what was read

def test_a_file_that_changes_while_it_is_read_is_reported_not_cached(tmp_path, monkeypatch):
    import deepfusion.audio
    from deepfusion.synth import synthesize_dataset

    audio = tmp_path / "audio"
    synthesize_dataset(audio, genres=2, clips_per_genre=2, duration=3.0, seed=1)
    victim = sorted(audio.rglob("*.wav"))[0]
    other = sorted(audio.rglob("*.wav"))[-1].read_bytes()
    real = deepfusion.audio.decode

    def decode_then_change(path, **kw):          # a download finishing while extract reads
        out = real(path, **kw)
        if Path(path) == victim:
            victim.write_bytes(other)
        return out

    monkeypatch.setattr(deepfusion.audio, "decode", decode_then_change)
    cache = tmp_path / "cache"
    result = invoke("extract", "--audio-dir", audio, "--out", tmp_path / "f.pkl", "--cache-dir",
                    cache, "--duration", "3", "--jobs", "1", "--quiet")
    assert result.exit_code == 0, result.output
    rel = victim.relative_to(audio).as_posix()
    assert f"skipped {rel}: changed while it was read" in result.stderr
    assert len(list(cache.rglob("*.npz"))) == 3                 # nothing cached for the victim
    monkeypatch.setattr(deepfusion.audio, "decode", real)
    again = invoke("extract", "--audio-dir", audio, "--out", tmp_path / "f.pkl", "--cache-dir",
                   cache, "--duration", "3", "--jobs", "1", "--quiet")
    assert again.exit_code == 0 and "skipped" not in again.stderr, again.output
    assert again.stdout.startswith("4 clips (0 computed, 4 from cache)")  # same bytes as another


# -------------------------------------------------------------------------- 6. bounded inputs

def test_a_pickle_whose_clips_share_arrays_is_refused_before_allocation(tmp_path):
    import pickle

    import numpy as np

    from deepfusion.views import FEATURE_KEYS

    shared = {k: np.zeros((64, 1000), np.float32) for k in FEATURE_KEYS}     # 1.5 MB once
    items = [{"features": shared, "label": ("rock", "jazz")[i % 2], "path": f"{i}.wav"}
             for i in range(400)]                                           # 600 MB stacked
    path = tmp_path / "bomb.pkl"
    path.write_bytes(pickle.dumps(items, protocol=5))
    assert path.stat().st_size < 3 << 20
    tracemalloc.start()         # numpy's buffers are traced too
    try:
        result = invoke("train", "--features", path, "--model-dir", tmp_path / "m", *LIGHT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    line = one_error_line(result.stderr)
    assert str(path) in line and "items share arrays" in line
    assert f"{len(FEATURE_KEYS)} distinct arrays" in line
    # refused before the 614 MB of stacked arrays were allocated: the peak is the unpickled
    # file (1.5 MB of arrays, 400 small dicts) and the command's own objects
    assert peak < 100 * 2**20, f"peak {peak / 2**20:.0f} MB traced while refusing the file"


# ---------------------------------------------------------- 7. caches shared across containers

def test_temporary_files_of_other_hosts_or_containers_stay_until_old(tmp_path):
    from deepfusion.io.atomic import _WHERE, FOREIGN_TMP_AGE, remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    foreign_tag = "0" * 8 if _WHERE != "0" * 8 else "1" * 8
    ours = tmp_path / f".a.npz.{dead}.{_WHERE}.0123abcd.tmp"          # this host, writer dead
    foreign = tmp_path / f".b.npz.{dead}.{foreign_tag}.0123abcd.tmp"  # its PID means nothing here
    old = tmp_path / f".c.npz.{dead}.{foreign_tag}.0123abcd.tmp"
    for p in (ours, foreign, old):
        p.write_bytes(b"partial")
    stamp = time.time() - FOREIGN_TMP_AGE - 60
    os.utime(old, (stamp, stamp))
    assert remove_stale_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name]


def test_a_file_swapped_away_and_back_while_it_is_decoded_is_not_cached(tmp_path, monkeypatch):
    """A -> B -> A during the decode: the bytes hash as A again, but B was decoded."""
    import deepfusion.audio
    from deepfusion.synth import synthesize_dataset

    audio = tmp_path / "audio"
    synthesize_dataset(audio, genres=2, clips_per_genre=2, duration=3.0, seed=1)
    victim = sorted(audio.rglob("*.wav"))[0]
    original, other = victim.read_bytes(), sorted(audio.rglob("*.wav"))[-1].read_bytes()
    real = deepfusion.audio.decode

    def swap(data: bytes) -> None:            # a sync tool replacing the file by rename
        tmp = victim.with_name(".swap.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, victim)

    def decode_swapped(path, **kw):
        if Path(path) != victim:
            return real(path, **kw)
        swap(other)
        try:
            return real(path, **kw)
        finally:
            swap(original)

    monkeypatch.setattr(deepfusion.audio, "decode", decode_swapped)
    cache = tmp_path / "cache"
    result = invoke("extract", "--audio-dir", audio, "--out", tmp_path / "f.pkl", "--cache-dir",
                    cache, "--duration", "3", "--jobs", "1", "--quiet")
    assert result.exit_code == 0, result.output
    assert f"skipped {victim.relative_to(audio).as_posix()}: changed while it was read" in result.stderr
    assert len(list(cache.rglob("*.npz"))) == 3      # nothing cached under A's key
