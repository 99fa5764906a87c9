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

from deepfusion.errors import FeaturesFileError, OutputError
from deepfusion.extract import extract
from deepfusion.io.features_file import load_feature_set, load_features
from deepfusion.io.store import META, open_store
from deepfusion.io.store_writer import StoreWriter
from deepfusion.testing import TINY_FEATURES, invoke, one_error_line, save_store
from deepfusion.views import FEATURE_KEYS


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


@pytest.mark.slow
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

    bad = {k: fs.arrays[k][0].copy() for k in fs.keys}
    bad["chroma"][0, 0] = np.nan
    with pytest.raises(FeaturesFileError, match="clip 1: chroma holds NaN"):
        with StoreWriter(out, n_clips=2, rows=fs.rows(), frames=fs.n_frames,
                         patches=fs.n_patches) as writer:
            writer.put({k: fs.arrays[k][0] for k in fs.keys})
            writer.put(bad)
    assert _versions(out) == before and (out / META).read_bytes() == meta

    import deepfusion.io.store_writer

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

    monkeypatch.setattr(deepfusion.io.store_writer, "open", full_disk_open, raising=False)
    with pytest.raises(OutputError, match=r"f\.store: cannot write the feature store \(disk full\)"):
        save_store(fs, out)
    assert _versions(out) == before and (out / META).read_bytes() == meta
    np.testing.assert_array_equal(open_store(out).arrays["mfcc"], fs.arrays["mfcc"])


@pytest.mark.slow
def test_leftovers_of_dead_writers_go_and_writers_take_turns(tiny_features, tmp_path):
    fs = load_feature_set(tiny_features)
    out = tmp_path / "f.store"
    save_store(fs, out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    leftovers = [out / f"v.{dead}.0123abcd", out / f".{META}.{dead}.89abcdef.tmp"]
    leftovers[0].mkdir()
    (leftovers[0] / "mfcc.npy").write_bytes(b"half")
    leftovers[1].write_text("{")
    save_store(fs, out)
    assert not any(p.exists() for p in leftovers) and len(_versions(out)) == 1

    # another process's writer waits for this one (which holds the lock while it writes);
    # both publish in turn and the store holds the last one's clips
    first = StoreWriter(out, n_clips=len(fs), rows=fs.rows(), frames=fs.n_frames,
                        patches=fs.n_patches).__enter__()
    second = subprocess.Popen([sys.executable, "-c", (
        "from deepfusion.io.features_file import load_features; from deepfusion.testing import save_store; "
        f"save_store(load_features({str(tiny_features)!r}), {str(out)!r})")])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            second.wait(timeout=5)                    # blocked on the lock
        assert len(_versions(out)) == 2               # the old version and the first's
        with pytest.raises(OutputError, match="this process is already writing this feature store"):
            save_store(fs, out)                       # not a wait that would never end
        for i in range(len(fs)):
            first.put({k: fs.arrays[k][i] * 3 for k in fs.keys})
        first.commit([{"path": p, "label": n} for p, n in zip(fs.paths, fs.label_names)])
        assert second.wait(timeout=120) == 0
    finally:
        if second.poll() is None:
            second.kill()
    assert len(_versions(out)) == 1
    np.testing.assert_array_equal(open_store(out).arrays["mfcc"], fs.arrays["mfcc"])


def test_a_failure_while_closing_still_releases_the_lock(tiny_features, tmp_path, monkeypatch):
    """Closing a file flushes it; on a full disk that fails again. The half-written version
    must still go and the lock be released (a later write in this process hung before)."""
    import deepfusion.io.store_writer

    fs = load_feature_set(tiny_features)
    out = tmp_path / "f.store"
    save_store(fs, out)
    real_open = open

    class FailsOnClose:
        def __init__(self, fh):
            self.fh = fh

        def close(self):
            self.fh.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.fh, name)

    monkeypatch.setattr(deepfusion.io.store_writer, "open", lambda path, mode="r", **kw: FailsOnClose(
        real_open(path, mode, **kw)) if str(path).endswith(".npy") else real_open(path, mode, **kw),
        raising=False)
    with pytest.raises(OutputError, match="disk full"):
        save_store(fs, out)
    monkeypatch.undo()
    assert len(_versions(out)) == 1
    save_store(fs, out)                               # the lock is free again
    assert len(open_store(out)) == len(fs)


def test_clutter_is_ignored_and_a_damaged_meta_json_is_repaired(tiny_audio, tiny_features, tmp_path):
    out = tmp_path / "f.store"

    def run():
        return extract(tiny_audio, out=out, fmt="store", cache_dir=tiny_features.parent / "cache",
                       jobs=1, config=TINY_FEATURES, quiet=True)

    run()
    identity = open_store(out).sha256
    (out / ".DS_Store").write_bytes(b"finder")
    assert run().n_items == 18 and (out / ".DS_Store").exists()
    (out / META).write_text('{"format": "deepfusion-feature-st')    # damaged by hand
    with pytest.raises(FeaturesFileError, match=r"damaged feature store \(meta.json is not JSON\); run deepfusion extract again"):
        open_store(out)
    assert run().n_items == 18 and open_store(out).sha256 == identity


def test_pickled_feature_sets_map_whole_files_and_copy_the_rest(store, tiny_features):
    import dataclasses

    fs = open_store(store)
    sliced = dataclasses.replace(fs, arrays={k: a[:2] for k, a in fs.arrays.items()})
    zeroed = dataclasses.replace(fs, arrays={k: np.zeros_like(a) for k, a in fs.arrays.items()})
    for original in (sliced, zeroed, load_feature_set(tiny_features)):
        back = pickle.loads(pickle.dumps(original))
        for key in FEATURE_KEYS:
            assert getattr(back.arrays[key], "filename", None) is None      # a copy, not a map
            np.testing.assert_array_equal(back.arrays[key], original.arrays[key])


def test_a_folder_that_is_not_a_store_is_never_touched(tiny_audio, tmp_path):
    folder = tmp_path / "mine"
    (folder / "v.3999999.deadbeef").mkdir(parents=True)
    (folder / "v.3999999.deadbeef" / "thesis.tex").write_text("years of work")
    (folder / "meta.json").write_text('{"my": "notes"}')
    before = sorted((p.relative_to(folder), p.read_bytes() if p.is_file() else None)
                    for p in folder.rglob("*"))
    for contents in ("with my files", "with only my meta.json"):
        if contents.startswith("with only"):
            shutil.rmtree(folder / "v.3999999.deadbeef")
            before = [b for b in before if not str(b[0]).startswith("v.")]
        line = _refused(invoke("extract", "--audio-dir", tiny_audio, "--out", folder,
                               "--format", "store", "--cache-dir", tmp_path / "cache", "--quiet",
                               "--duration", "6"))
        assert f"{folder}: is a folder holding other files" in line, line
        assert sorted((p.relative_to(folder), p.read_bytes() if p.is_file() else None)
                      for p in folder.rglob("*")) == before
    assert not (tmp_path / "cache").exists()             # refused before any work


@pytest.mark.parametrize("dies", ["half-way through the arrays", "after meta.json, before cleaning up"])
def test_a_writer_that_dies_leaves_a_readable_store(tiny_features, tmp_path, dies):
    """A process that ends abruptly (``os._exit``: no cleanup, as with kill -9) while writing."""
    fs = load_feature_set(tiny_features)
    out = tmp_path / "f.store"
    save_store(fs, out)
    script = f"""
import os
import deepfusion.io.store_writer as store_writer
from deepfusion.views import FEATURE_KEYS
from deepfusion.io.features_file import load_feature_set
fs = load_feature_set({str(tiny_features)!r})
writer = store_writer.StoreWriter({str(out)!r}, n_clips=len(fs), rows=fs.rows(), frames=fs.n_frames,
                           patches=fs.n_patches)
writer.__enter__()
if {dies!r}.startswith("after"):
    store_writer._remove_other_versions = lambda *a, **k: os._exit(9)
for i in range(len(fs)):
    if i == len(fs) // 2 and {dies!r}.startswith("half"):
        os._exit(9)
    writer.put({{k: fs.arrays[k][i] * 2 for k in fs.keys}})
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


@pytest.mark.slow
def test_damaged_stores_get_one_line(tiny_features, trained_model_dir, tmp_path):
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
        "no-meta": (lambda f, m: (f / META).unlink(), "a folder, not a features file or feature store (no meta.json); give the --out of deepfusion extract"),
        "other-format": (lambda f, m: m.update(format="x"), "not a valid feature store"),
        "newer": (lambda f, m: m.update(version=99), "version 99"),
        "traversal": (lambda f, m: m.update(data="../good.store/" + m["data"]), "must name a version folder"),
        "missing-array": (lambda f, m: (version(f) / "mfcc.npy").unlink(), "mfcc.npy is missing); run deepfusion extract again"),
        "short-array": (lambda f, m: np.save(version(f) / "chroma.npy", np.zeros((2, 12, 3), np.float32)),
                        "chroma.npy holds float32 (2, 12, 3)"),
        "pickled-array": (lambda f, m: np.save(version(f) / "tempogram.npy",
                                               np.array([object()] * 3), allow_pickle=True),
                          "tempogram.npy is unreadable ("),
        "clip-count": (lambda f, m: m["clips"].pop(), "'clips' must list 18 clips"),
        "one-genre": (lambda f, m: [c.update(label="rock") for c in m["clips"]], "only one genre (rock); need at least two"),
        "group-list": (lambda f, m: m["clips"][3].update(group=[1, 2]),
                       "clip 4: 'group' and 'duplicate_group' must be names or numbers); run deepfusion extract again"),
        "config-unknown": (lambda f, m: m.update(feature_config={"bogus": 1}),
                           "invalid feature_config (FeatureConfig: unknown field(s) bogus)"),
        "config-list": (lambda f, m: m.update(feature_config=[1]), "'feature_config' must be an object"),
        "config-value": (lambda f, m: m["feature_config"].update(n_mels="many"),
                         "invalid feature_config (--n-mels many: must be a whole number above 0)"),
        "data-newline": (lambda f, m: m.update(data=m["data"] + "\n"), "must name a version folder"),
        "rows-bool": (lambda f, m: m["rows"].update(mfcc=True), "'rows' must give a positive row count"),
        "nan": (lambda f, m: np.save(version(f) / "chroma.npy", np.where(
                    np.arange(18)[:, None, None] == 7, np.nan, np.load(version(f) / "chroma.npy"))
                    .astype(np.float32)), "clip 8 (techno/techno.00001.wav): chroma holds NaN or infinite values; run deepfusion extract again"),
    }
    for name, (change, message) in cases.items():
        folder = damaged(name, change)
        for args in (("train", "--features", folder, "--model-dir", tmp_path / "m", "--backbone",
                      "light", "--no-pretrained"),
                     ("evaluate", "--checkpoint", trained_model_dir / "best.pth", "--features",
                      folder, "--out-dir", tmp_path / "report")):
            if name == "one-genre" and args[0] == "evaluate":
                continue      # evaluating a one-genre collection is fine; training on one is not
            line = _refused(invoke(*args))
            assert str(folder) in line and message in line, (name, args[0], line)
    assert not (tmp_path / "m" / "last.pth").exists()
    assert not (tmp_path / "report" / "evaluation.json").exists()


def test_malformed_groups_and_feature_config_in_a_pickle_get_one_line(tiny_features, tmp_path):
    with open(tiny_features, "rb") as fh:
        items = pickle.load(fh)
    for name, change, message in (
            ("group", lambda its: its[2].update(group={"a": 1}),
             f"clip 3 ({items[2]['path']}): its group is a mapping, neither a name nor a number"),
            ("config", lambda its: [it.update(feature_config={"bogus": 1}) for it in its],
             "invalid feature_config (FeatureConfig: unknown field(s) bogus)")):
        damaged = [dict(it) for it in items]
        change(damaged)
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(pickle.dumps(damaged))
        line = _refused(invoke("train", "--features", path, "--model-dir", tmp_path / "m",
                               "--backbone", "light", "--no-pretrained"))
        assert str(path) in line and message in line, (name, line)


def test_numpy_group_values_in_a_pickle_are_accepted(tiny_features, tmp_path):
    with open(tiny_features, "rb") as fh:
        items = pickle.load(fh)
    for i, it in enumerate(items):
        it["group"], it["duplicate_group"] = np.int64(i // 2), np.int32(it["duplicate_group"])
    path = tmp_path / "numpy-groups.pkl"
    path.write_bytes(pickle.dumps(items))
    fs = load_feature_set(path)
    assert fs.groups[0] == fs.groups[1] != fs.groups[2]


def test_a_worker_unpickling_a_replaced_store_gets_one_line(store, tmp_path):
    copy = tmp_path / "copy.store"
    shutil.copytree(store, copy)
    blob = pickle.dumps(open_store(copy))
    shutil.rmtree(copy / _versions(copy)[0])
    with pytest.raises(FeaturesFileError, match=r"copy\.store: .*mel_spec_orig\.npy changed while in "
                                                    r"use \(rewritten, perhaps by another extract\); "
                                                    r"run the command again when that is done$"):
        pickle.loads(blob)


def test_identity_survives_a_rewrite_and_damage_is_repaired_by_a_rerun(store, tiny_audio,
                                                                     tiny_features, tmp_path):
    """A checkpoint's features_sha256 names the content, so --resume and evaluate accept an
    identical re-extract elsewhere; a damaged array is noticed by extract's up-to-date check
    and written again."""
    out = tmp_path / "again.store"

    def run():
        return extract(tiny_audio, out=out, fmt="store", cache_dir=tiny_features.parent / "cache",
                       jobs=1, config=TINY_FEATURES, quiet=True)

    run()
    assert open_store(out).sha256 == open_store(store).sha256
    assert _versions(out) != _versions(store)

    (out / _versions(out)[0] / "mfcc.npy").unlink()
    with pytest.raises(FeaturesFileError, match="mfcc.npy is missing"):
        open_store(out)
    assert run().n_items == 18
    assert open_store(out).sha256 == open_store(store).sha256


def test_format_and_out_must_agree(tiny_audio, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_bytes(b"")
    for fmt, out, message in (("pickle", "folder", "folder: a folder (a feature store?); give --format store"),
                              ("store", "file", "file: a file, but --format store writes a folder; give another --out, or --format pickle")):
        line = _refused(invoke("extract", "--audio-dir", tiny_audio, "--out", tmp_path / out,
                                    "--format", fmt, "--cache-dir", tmp_path / "cache", "--quiet"))
        assert message in line, line
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_a_store_travels_to_spawned_workers_by_name(store):
    """Worker processes started by spawn (macOS's and Windows' default) receive the dataset
    pickled: a store's arrays must travel as file names and be mapped again, not copied."""
    from deepfusion.data.dataset import make_torch_dataset
    from deepfusion.data.normalize import fit_normalization

    fs = load_features(store)
    norm = fit_normalization(fs, np.arange(len(fs)))
    dataset = make_torch_dataset(fs, norm, np.arange(len(fs)), seg=32, seed=1)
    blob = pickle.dumps(dataset)
    assert len(blob) < 100_000 < fs.nbytes()
    assert all(isinstance(a, np.memmap) for a in pickle.loads(blob).fs.arrays.values())
    in_process = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    spawned = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1,
                                                    multiprocessing_context="spawn")))
    for key in FEATURE_KEYS:
        torch.testing.assert_close(spawned[0][key], in_process[0][key], rtol=0, atol=0)
    assert spawned[1].tolist() == in_process[1].tolist()


# ------------------------------------------------------------ filled as results arrive (issue 11)

def test_a_store_with_failed_files_is_compacted_in_place(tiny_audio, tiny_features, tmp_path):
    """Slots are allocated before the work; files that fail leave no gap and no zero clip."""
    audio = tmp_path / "audio"
    shutil.copytree(tiny_audio, audio)
    for name in ("rock/aaa-broken.wav", "techno/techno.00003-broken.wav", "waltz/zzz-broken.wav"):
        (audio / name).write_bytes(b"RIFF" + bytes(200))          # first, middle and last
    out = tmp_path / "f.store"
    result = extract(audio, out=out, fmt="store", cache_dir=tiny_features.parent / "cache",
                     jobs=2, config=TINY_FEATURES, quiet=True)
    assert (result.n_items, len(result.errors)) == (18, 3)
    fs, reference = open_store(out), load_features(tiny_features)
    assert fs.paths == reference.paths
    for key in FEATURE_KEYS:
        assert np.array_equal(np.asarray(fs.arrays[key]), reference.arrays[key]), key
    arrays = {p.name: np.load(p) for p in next(out.glob("v.*")).iterdir()}   # plain numpy reads
    assert all(a.shape[0] == 18 for a in arrays.values())


@pytest.mark.slow
def test_a_float16_store_halves_the_bytes_and_trains(tiny_audio, tiny_features, tmp_path):
    out = tmp_path / "half.store"
    result = invoke("extract", "--audio-dir", tiny_audio, "--out", out, "--format", "store",
                    "--dtype", "float16", "--cache-dir", tiny_features.parent / "cache",
                    "--jobs", "1", "--quiet", "--duration", "6")
    assert result.exit_code == 0, result.output
    half, full = open_store(out), load_features(tiny_features)
    for key in FEATURE_KEYS:
        assert half.arrays[key].dtype == np.float16
        assert np.array_equal(np.asarray(half.arrays[key]), full.arrays[key].astype(np.float16))
    size = sum(f.stat().st_size for f in next(out.glob("v.*")).iterdir())
    assert size < 0.51 * sum(a.nbytes for a in full.arrays.values()) + 6 * 256
    result = invoke("train", "--features", out, "--model-dir", tmp_path / "m", "--backbone",
                    "light", "--no-pretrained", "--epochs", "1", "--batch-size", "8", "--quiet")
    assert result.exit_code == 0, result.output
    refused = invoke("extract", "--audio-dir", tiny_audio, "--out", tmp_path / "f.pkl",
                     "--dtype", "float16", "--quiet")
    assert refused.exit_code == 2 and "--dtype float16: needs --format store" in one_error_line(refused.stderr)


@pytest.mark.slow
def test_an_unchanged_collection_is_not_read_again(tiny_audio, tmp_path, monkeypatch):
    """Up to date by the files' stat: a rerun hashes nothing; a touched file is read again."""
    import deepfusion.jobs.job as extract_module  # where the workers hash

    audio = tmp_path / "audio"
    shutil.copytree(tiny_audio, audio)
    out, cache = tmp_path / "f.store", tmp_path / "cache"
    extract(audio, out=out, fmt="store", cache_dir=cache, jobs=1, config=TINY_FEATURES, quiet=True)
    hashed = []
    real = extract_module.file_digest
    monkeypatch.setattr(extract_module, "file_digest", lambda p: hashed.append(p) or real(p))
    again = extract(audio, out=out, fmt="store", cache_dir=cache, jobs=1, config=TINY_FEATURES,
                    quiet=True)
    assert (again.n_items, again.computed, hashed) == (18, 0, [])
    victim = audio / "rock" / "rock.00002.wav"
    victim.write_bytes(victim.read_bytes())                     # same bytes, a new write
    third = extract(audio, out=out, fmt="store", cache_dir=cache, jobs=1, config=TINY_FEATURES,
                    quiet=True)
    assert (third.n_items, third.computed) == (18, 0) and len(hashed) == 18
