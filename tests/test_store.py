"""The feature store: extract --format store, train and evaluate on it, atomic updates, damage."""

from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_FEATURES, invoke, one_error_line
from deepfusion.config import FEATURE_KEYS
from deepfusion.data import load_feature_set, load_features, open_store, save_store
from deepfusion.errors import FeaturesFileError, OutputError
from deepfusion.extract import extract
from deepfusion.store import META, StoreWriter


def _refused(result) -> str:
    assert result.exit_code != 0
    return one_error_line(result.stderr)


def _versions(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def store(tiny_audio, tiny_features, tmp_path_factory) -> Path:
    """The tiny dataset as a store, extracted through the same cache as ``tiny_features``."""
    out = tmp_path_factory.mktemp("store") / "features.store"
    result = extract(tiny_audio, out=out, fmt="store", cache_dir=tiny_features.parent / "cache",
                     jobs=1, config=TINY_FEATURES, quiet=True)
    assert (result.n_items, result.computed) == (18, 0)   # all from the pickle run's cache
    return out


def test_store_holds_what_the_pickle_holds_memory_mapped(store, tiny_features):
    a, b = load_feature_set(tiny_features), load_features(store)
    assert (b.paths, b.label_names, b.class_names) == (a.paths, a.label_names, a.class_names)
    assert (b.labels == a.labels).all() and (b.groups == a.groups).all()
    assert b.feature_config == a.feature_config
    for key in FEATURE_KEYS:
        assert isinstance(b.arrays[key], np.memmap) and not b.arrays[key].flags.writeable
        np.testing.assert_array_equal(b.arrays[key], a.arrays[key])
    meta = json.loads((store / META).read_text())
    with open(tiny_features, "rb") as fh:
        items = pickle.load(fh)
    for clip, item in zip(meta["clips"], items):
        assert {k: clip.get(k) for k in ("file_sha", "audio_sha", "duplicate_group")} == \
            {k: item[k] for k in ("file_sha", "audio_sha", "duplicate_group")}


def test_train_and_evaluate_on_a_store_equal_the_pickle_run(store, tiny_features, tmp_path):
    args = ["--backbone", "light", "--no-pretrained", "--epochs", "2", "--batch-size", "8",
            "--lr", "1e-3", "--val-size", "0.2", "--test-size", "0.2", "--quiet"]
    for name, features in (("pkl", tiny_features), ("store", store)):
        result = invoke("train", "--features", features, "--model-dir", tmp_path / name, *args)
        assert result.exit_code == 0, result.output

    def history(name):
        with open(tmp_path / name / "training_history.csv") as fh:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]
    assert history("pkl") == history("store")
    a = torch.load(tmp_path / "pkl" / "best.pth", weights_only=True)
    b = torch.load(tmp_path / "store" / "best.pth", weights_only=True)
    for k in a["model_state"]:
        torch.testing.assert_close(a["model_state"][k], b["model_state"][k], rtol=0, atol=0)
    assert b["features_file"] == str(store.resolve())

    # evaluate needs only the checkpoint; resume checks the store's identity
    report = invoke("evaluate", "--checkpoint", tmp_path / "store" / "best.pth")
    assert report.exit_code == 0, report.output
    saved = json.loads((tmp_path / "store" / "evaluation.json").read_text())
    assert saved["features_sha256"] == b["features_sha256"]
    resumed = invoke("train", "--features", store, "--model-dir", tmp_path / "store", "--resume", "--quiet")
    assert resumed.exit_code == 0, resumed.output


def test_rerun_rewrites_nothing_and_a_new_file_replaces_the_version(tiny_audio, tmp_path):
    audio = tmp_path / "audio"
    shutil.copytree(tiny_audio, audio)
    out, cache = tmp_path / "f.store", tmp_path / "cache"

    def run():
        return extract(audio, out=out, fmt="store", cache_dir=cache, jobs=1,
                       config=TINY_FEATURES, quiet=True)

    run()
    first, stamp = _versions(out), (out / META).stat().st_mtime_ns
    again = run()
    assert (again.computed, _versions(out), (out / META).stat().st_mtime_ns) == (0, first, stamp)
    shutil.copyfile(audio / "rock" / "rock.00000.wav", audio / "rock" / "copy.wav")
    added = run()
    assert (added.n_items, added.computed) == (19, 0)       # same content: from the cache
    assert len(_versions(out)) == 1 and _versions(out) != first   # the old version is gone
    fs = open_store(out)
    assert len(fs) == 19
    i, j = fs.paths.index("rock/copy.wav"), fs.paths.index("rock/rock.00000.wav")
    assert fs.groups[i] == fs.groups[j]                    # duplicates stay in one split


def test_a_failed_write_leaves_the_previous_store(tiny_features, tmp_path, monkeypatch):
    fs = load_feature_set(tiny_features)
    out = tmp_path / "f.store"
    save_store(fs, out)
    before, meta = _versions(out), (out / META).read_bytes()

    bad = {k: fs.arrays[k][0].copy() for k in FEATURE_KEYS}
    bad["chroma"][0, 0] = np.nan
    with pytest.raises(FeaturesFileError, match="clip 1: chroma holds NaN"):
        with StoreWriter(out, n_clips=2, rows=fs.rows(), frames=fs.n_frames) as writer:
            writer.put({k: fs.arrays[k][0] for k in FEATURE_KEYS})
            writer.put(bad)
    assert _versions(out) == before and (out / META).read_bytes() == meta

    import deepfusion.store

    real_open = open

    class FullDisk:
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 200_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def full_disk_open(path, mode="r", **kwargs):
        fh = real_open(path, mode, **kwargs)
        return FullDisk(fh) if "w" in mode else fh

    monkeypatch.setattr(deepfusion.store, "open", full_disk_open, raising=False)
    with pytest.raises(OutputError, match=r"f\.store: cannot write the feature store \(disk full\)"):
        save_store(fs, out)
    assert _versions(out) == before and (out / META).read_bytes() == meta
    np.testing.assert_array_equal(open_store(out).arrays["mfcc"], fs.arrays["mfcc"])


def test_leftovers_of_dead_writers_go_and_live_ones_stay(tiny_features, tmp_path):
    fs = load_feature_set(tiny_features)
    out = tmp_path / "f.store"
    save_store(fs, out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    leftovers = [out / f"v.{dead}.0123abcd", out / f".{META}.{dead}.89abcdef.tmp"]
    live = out / f"v.{os.getppid()}.fedcba98"
    for folder in (leftovers[0], live):
        folder.mkdir()
        (folder / "mfcc.npy").write_bytes(b"half")
    leftovers[1].write_text("{")
    save_store(fs, out)
    assert not any(p.exists() for p in leftovers)
    assert live.exists() and len(_versions(out)) == 2
    assert len(open_store(out)) == len(fs)


@pytest.mark.parametrize("dies", ["half-way through the arrays", "after meta.json, before cleaning up"])
def test_a_writer_that_dies_leaves_a_readable_store(tiny_features, tmp_path, dies):
    """A process that ends abruptly (``os._exit``: no cleanup, as with kill -9) while writing."""
    fs = load_feature_set(tiny_features)
    out = tmp_path / "f.store"
    save_store(fs, out)
    script = f"""
import os
import deepfusion.store as store
from deepfusion.config import FEATURE_KEYS
from deepfusion.data import load_feature_set
fs = load_feature_set({str(tiny_features)!r})
writer = store.StoreWriter({str(out)!r}, n_clips=len(fs), rows=fs.rows(), frames=fs.n_frames)
writer.__enter__()
if {dies!r}.startswith("after"):
    store._remove_dead_versions = lambda *a, **k: os._exit(9)
for i in range(len(fs)):
    if i == len(fs) // 2 and {dies!r}.startswith("half"):
        os._exit(9)
    writer.put({{k: fs.arrays[k][i] * 2 for k in FEATURE_KEYS}})
writer.commit([{{"path": p, "label": n}} for p, n in zip(fs.paths, fs.label_names)])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert len(_versions(out)) == 2                     # the dead writer's folder is still there
    after = open_store(out)                             # the store reads whole: old or new
    factor = 1 if dies.startswith("half") else 2
    np.testing.assert_array_equal(after.arrays["mfcc"], fs.arrays["mfcc"] * factor)
    save_store(fs, out)                                 # the next write cleans up
    assert len(_versions(out)) == 1
    np.testing.assert_array_equal(open_store(out).arrays["mfcc"], fs.arrays["mfcc"])


def test_damaged_stores_get_one_line(tiny_features, tmp_path):
    fs = load_feature_set(tiny_features)
    good = tmp_path / "good.store"
    save_store(fs, good)

    def damaged(name, change):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        meta = json.loads((folder / META).read_text())
        change(folder, meta)
        if (folder / META).exists():
            (folder / META).write_text(json.dumps(meta))
        return folder

    def version(folder):
        return next(p for p in folder.iterdir() if p.is_dir())

    cases = {
        "no-meta": (lambda f, m: (f / META).unlink(), "without meta.json, not a feature store"),
        "other-format": (lambda f, m: m.update(format="x"), "not a valid feature store"),
        "newer": (lambda f, m: m.update(version=99), "version 99"),
        "traversal": (lambda f, m: m.update(data="../good.store/" + m["data"]), "must name a version folder"),
        "missing-array": (lambda f, m: (version(f) / "mfcc.npy").unlink(), "mfcc.npy is missing"),
        "short-array": (lambda f, m: np.save(version(f) / "chroma.npy", np.zeros((2, 12, 3), np.float32)),
                        "chroma.npy holds float32 (2, 12, 3)"),
        "pickled-array": (lambda f, m: np.save(version(f) / "tempogram.npy",
                                               np.array([object()] * 3), allow_pickle=True),
                          "tempogram.npy is unreadable"),
        "clip-count": (lambda f, m: m["clips"].pop(), "'clips' must list 18 clips"),
        "one-genre": (lambda f, m: [c.update(label="rock") for c in m["clips"]], "only one class"),
    }
    for name, (change, message) in cases.items():
        folder = damaged(name, change)
        line = _refused(invoke("train", "--features", folder, "--model-dir", tmp_path / "m",
                                    "--backbone", "light", "--no-pretrained"))
        assert str(folder) in line and message in line, (name, line)
    assert not (tmp_path / "m" / "last.pth").exists()


def test_format_and_out_must_agree(tiny_audio, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_bytes(b"")
    for fmt, out, message in (("pickle", "folder", "is a folder (a feature store?)"),
                              ("store", "file", "is a file; a feature store is a folder")):
        line = _refused(invoke("extract", "--audio-dir", tiny_audio, "--out", tmp_path / out,
                                    "--format", fmt, "--cache-dir", tmp_path / "cache", "--quiet"))
        assert message in line, line
    assert not (tmp_path / "cache").exists()
