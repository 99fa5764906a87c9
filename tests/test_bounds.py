"""Hardening II, the rest: checkpoints checked before anything is sized from them, inputs too
small for the backbone and full disks refused before work, any file name reported and written
safely, symbolic links to genre folders followed, ``--timeout`` covering the hashing."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from collections import namedtuple

import pytest
import torch

from deepfusion.testing import invoke, one_error_line, run_command, write_odd_names

LIGHT = ("--backbone", "light", "--no-pretrained", "--epochs", "1", "--batch-size", "8",
         "--val-size", "0.2", "--test-size", "0.2", "--quiet")
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file names and links")


# ------------------------------------------------------------- checkpoints checked before use

def _forgeries() -> dict[str, tuple]:
    """name -> (change to a checkpoint dict, words the refusal must hold)."""
    def setter(*keys, value):
        def change(ckpt):
            target = ckpt
            for key in keys[:-1]:
                target = target[key]
            target[keys[-1]] = value(target[keys[-1]]) if callable(value) else value
        return change

    def drop(*keys):
        def change(ckpt):
            target = ckpt
            for key in keys[:-1]:
                target = target[key]
            del target[keys[-1]]
        return change

    def first_state_key(ckpt):
        return next(iter(ckpt["model_state"]))

    return {
        "extra class name": (setter("class_names", value=lambda v: [*v, "polka"]), "class names"),
        "repeated class name": (setter("class_names", value=lambda v: [v[0]] * len(v)), "distinct"),
        "mel bands disagree": (setter("model_config", "n_mels", value=64), "mel bands"),
        "absurd sample rate": (setter("feature_config", "sample_rate", value=10**9), "sample_rate"),
        "absurd duration": (setter("feature_config", "duration", value=1e7), "duration"),
        "huge fusion layer": (setter("model_config", "fusion_hidden", value=[10**9]), "fusion_hidden"),
        "no normalisation": (drop("normalization", "chroma"), "normalization"),
        "short normalisation": (setter("normalization", "mfcc", "mean", value=torch.zeros(3)), "mfcc"),
        "missing weights": (lambda c: c["model_state"].pop(first_state_key(c)), "missing"),
        "wrong weight shape": (lambda c: c["model_state"].__setitem__(
            first_state_key(c), torch.zeros(3, 3)), "shape"),
        "no feature config": (drop("feature_config"), "no feature_config"),
        "unknown model field": (setter("model_config", value=lambda v: {**v, "layers": 9}), "unknown"),
    }


def test_inconsistent_checkpoints_are_refused_naming_the_file(trained_model_dir, tiny_audio, tmp_path):
    best = torch.load(trained_model_dir / "best.pth", weights_only=True)
    clip = next(tiny_audio.rglob("*.wav"))
    for name, (change, words) in _forgeries().items():
        ckpt = copy.deepcopy(best)
        change(ckpt)
        path = tmp_path / f"{name.replace(' ', '-')}.pth"
        torch.save(ckpt, path)
        for args in (["evaluate", "--checkpoint", path, "--out-dir", tmp_path / "report"],
                     ["predict", clip, "--checkpoint", path]):
            result = invoke(*args)
            line = one_error_line(result.stderr)
            assert result.exit_code == 1, (name, result.stderr)
            assert str(path) in line and "damaged or inconsistent checkpoint" in line, (name, line)
            assert words in line, (name, line)
    assert not (tmp_path / "report").exists()


@pytest.mark.slow
def test_a_last_checkpoint_without_its_training_state_is_refused(tiny_features, tmp_path):
    model_dir = tmp_path / "run"
    assert invoke("train", "--features", tiny_features, "--model-dir", model_dir, *LIGHT).exit_code == 0
    last = torch.load(model_dir / "last.pth", weights_only=True)
    for key, words in (("optimizer_state", "no optimizer_state"), ("history", "no history")):
        forged = dict(last)
        del forged[key]
        torch.save(forged, model_dir / "last.pth")
        result = invoke("train", "--features", tiny_features, "--model-dir", model_dir, "--resume",
                        "--epochs", "2", "--quiet")
        line = one_error_line(result.stderr)
        assert str(model_dir / "last.pth") in line and words in line, line
    torch.save({**last, "history": last["history"] * 3}, model_dir / "last.pth")
    result = invoke("train", "--features", tiny_features, "--model-dir", model_dir, "--resume",
                    "--epochs", "2", "--quiet")
    assert "one row per epoch" in one_error_line(result.stderr)


# ------------------------------------------------------- sizes the backbone cannot take

@pytest.mark.slow
def test_inputs_too_small_for_the_backbone_are_refused_before_work(tiny_audio, tiny_features, tmp_path):
    cases = [(tiny_features, ["--segment-seconds", "0.05"], "use --segment-seconds 0.38 or more")]
    for extra, words in ((["--n-mels", "8", "--n-mfcc", "8"], "mel bands"),
                         (["--duration", "0.2", "--min-duration", "0.1"], "extract with --duration 0.37")):
        out = tmp_path / f"f{len(cases)}" / "features.pkl"
        assert invoke("extract", "--audio-dir", tiny_audio, "--out", out, "--cache-dir",
                      tmp_path / "cache", "--jobs", "1", "--quiet", *extra).exit_code == 0
        cases.append((out, [], words))
    for features, extra, words in cases:
        model_dir = tmp_path / f"m-{features.parent.name}"
        result = invoke("train", "--features", features, "--model-dir", model_dir, *LIGHT, *extra)
        assert result.exit_code == 2, result.stderr
        line = one_error_line(result.stderr)
        assert "backbone light" in line and words in line, line
        assert not list(model_dir.glob("*.pth")), "work was done before the refusal"
    # a ResNet takes 16 bands, but not as a batch of one segment of at most 32 x 32
    result = invoke("train", "--features", cases[1][0], "--model-dir", tmp_path / "r",
                    "--backbone", "resnet18", "--no-pretrained", "--epochs", "1",
                    "--batch-size", "1", "--segment-seconds", "0.5", "--quiet")
    assert result.exit_code == 2 and "--batch-size 2 or more" in one_error_line(result.stderr)


# ------------------------------------------------------------------------- full disks

def test_a_disk_too_full_for_the_run_is_found_before_the_first_epoch(tiny_audio, tiny_features,
                                                                     tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    model_dir = tmp_path / "run"
    result = invoke("train", "--features", tiny_features, "--model-dir", model_dir, *LIGHT)
    line = one_error_line(result.stderr)
    assert str(model_dir) in line and "1 MB free" in line and "checkpoints" in line, line
    assert not (model_dir / "training_history.csv").exists() and not list(model_dir.glob("*.pth"))
    out = tmp_path / "f" / "features.pkl"
    result = invoke("extract", "--audio-dir", tiny_audio, "--out", out, "--cache-dir",
                    tmp_path / "cache", "--jobs", "1", "--quiet", "--duration", "30")
    line = one_error_line(result.stderr)
    assert "the features of 18 clips" in line and "MB free" in line, line
    assert not (tmp_path / "cache").exists(), "extract started work before the refusal"


# ------------------------------------------------------------------ names and encodings

@pytest.mark.slow
@posix_only
@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses names that are not UTF-8")
def test_names_that_are_not_utf8_are_reported_and_written_safely(tiny_audio, trained_model_dir,
                                                                 tmp_path):
    clip = sorted(tiny_audio.rglob("*.wav"))[0]
    root = tmp_path / "odd"
    written = write_odd_names(root, clip)
    strict = {"PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8"}
    out = tmp_path / "f" / "features.pkl"
    proc = run_command("extract", "--audio-dir", root, "--out", out, "--cache-dir",
                       tmp_path / "cache", "--jobs", "1", "--duration", "6", **strict)
    assert proc.returncode == 0 and "internal error" not in proc.stderr, proc.stderr
    assert "skipped rock/broken\\xfe.wav: " in proc.stderr
    report = out.with_name("extract_errors.csv").read_bytes().decode("utf-8")   # valid UTF-8
    assert "rock/broken\\xfe.wav" in report
    assert "jazz\\xe9/two\\nlines.wav" in proc.stdout       # one line per name, escaped
    for args in ([], ["--json"]):
        proc = run_command("predict", root, "--checkpoint", trained_model_dir / "best.pth",
                           *args, **strict)
        assert proc.returncode == 0 and "internal error" not in proc.stderr, proc.stderr
        assert len(proc.stdout.splitlines()) == 2, proc.stdout
        assert proc.stderr.count("\n") == 1 and "broken\\xfe.wav" in proc.stderr
    found = {os.fsencode(json.loads(line)["path"]) for line in proc.stdout.splitlines()}
    assert found == set(written[:2])                         # JSON keeps them exact


@posix_only
def test_symlinked_genre_folders_are_followed_once(tiny_audio, tmp_path):
    root = tmp_path / "collection"
    root.mkdir()
    (root / "rock").symlink_to(tiny_audio / "rock", target_is_directory=True)
    shutil.copytree(tiny_audio / "waltz", root / "waltz")
    (root / "waltz" / "loop").symlink_to("..", target_is_directory=True)       # a loop
    (root / "again").symlink_to(tiny_audio / "rock", target_is_directory=True)  # a second route
    result = invoke("extract", "--audio-dir", root, "--out", tmp_path / "f.pkl", "--cache-dir",
                    tmp_path / "cache", "--jobs", "1", "--quiet", "--duration", "6")
    assert result.exit_code == 0, result.stderr
    assert "18 clips" not in result.stdout and "12 clips" in result.stdout, result.stdout
    assert "genres: again 6, waltz 6" in result.stdout     # the first route in sorted order


# ------------------------------------------------------------- --timeout covers the hashing

@pytest.mark.slow
def test_timeout_covers_hashing_a_file(tiny_audio, tmp_path, monkeypatch):
    import deepfusion.jobs.job as extract_module  # where the workers hash

    real = extract_module.file_digest

    def stalls(path):              # a file on a stalled network mount, or 20 GB of zeros
        if path.name.endswith("00001.wav"):
            while True:
                time.sleep(0.05)
        return real(path)

    monkeypatch.setattr(extract_module, "file_digest", stalls)
    t0 = time.perf_counter()
    result = invoke("extract", "--audio-dir", tiny_audio, "--out", tmp_path / "f.pkl",
                    "--cache-dir", tmp_path / "cache", "--jobs", "1", "--quiet", "--duration", "6",
                    "--timeout", "1")
    assert time.perf_counter() - t0 < 60
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("took longer than --timeout 1 s (hashing it); give a larger --timeout, or --timeout 0 for no limit") == 3, result.stderr
    assert "15 clips" in result.stdout
