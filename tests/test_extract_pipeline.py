"""The torch backend's one extraction pipeline, run on the CPU: workers hash and decode, this
process computes batches with :func:`~deepfusion.features.torch_views.compute_features_torch`
(the pretrained view included) and writes the cache; the bound on what the workers decode
ahead is tested in tests/test_pool.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import deepfusion.features.torch_views as ft
from deepfusion.config import FeatureConfig
from deepfusion.extract import extract
from deepfusion.features.torch_views import TOLERANCE
from deepfusion.io.cache import FeatureCache, file_digest
from deepfusion.jobs.batcher import compute_again
from deepfusion.testing import load_own_pickle
from deepfusion.views import BY_NAME, PRETRAINED_KEY

CONFIG = FeatureConfig(duration=3.0)


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    """2 genres x 2 clips of 3 s, and a file that is not audio."""
    from deepfusion.synth import synthesize_dataset

    root = tmp_path_factory.mktemp("audio")
    synthesize_dataset(root, genres=2, clips_per_genre=2, duration=CONFIG.duration, seed=0)
    (root / "rock" / "junk.wav").write_bytes(b"not audio at all")
    return root


@pytest.fixture(scope="module")
def numpy_rows(audio, tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("numpy")
    result = extract(audio, out=work / "f.pkl", cache_dir=work / "cache", jobs=1, config=CONFIG,
                     quiet=True, backend="numpy")
    assert result.device_busy is None
    return {row["path"]: row for row in load_own_pickle(result.out)}


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want) and PRETRAINED_KEY in got
    for k in got:
        diff = float(np.abs(got[k] - want[k]).max())
        assert diff <= TOLERANCE[k], f"{what} {k}: largest difference {diff:.3g} > {TOLERANCE[k]}"


@pytest.fixture
def spied(monkeypatch):
    """The batches this process computes (clips in each) and the view functions they used."""
    real, batches, views = ft.compute_features_torch, [], []

    def compute(y, config, *, device):
        batches.append(len(np.atleast_2d(np.asarray(y))))
        return real(y, config, device=device)

    real_view = ft.view_function
    monkeypatch.setattr(ft, "compute_features_torch", compute)
    monkeypatch.setattr(ft, "view_function", lambda path: views.append(path) or real_view(path))
    return batches, views


@pytest.mark.parametrize("jobs", [1, 2])
def test_torch_on_the_cpu_runs_through_the_pipeline(audio, numpy_rows, tmp_path, spied, jobs):
    """Every clip computed in one batch here (the workers only decode), the pretrained view
    by its batch function; the bad file reported and skipped; entries within TOLERANCE of
    numpy's; a second run over the same cache computes nothing."""
    batches, views = spied
    first = extract(audio, out=tmp_path / "t.pkl", cache_dir=tmp_path / "cache", jobs=jobs,
                    config=CONFIG, quiet=True, backend="torch", device="cpu")
    assert (first.n_items, first.computed, first.cached) == (4, 4, 0)
    assert [p for p, _ in first.errors] == ["rock/junk.wav"]
    assert "cannot decode" in first.errors[0][1]
    assert "rock/junk.wav" in first.errors_csv.read_text()
    assert batches == [4]
    assert BY_NAME[PRETRAINED_KEY].torch in views
    assert 0 < first.device_busy <= 1
    rows = load_own_pickle(first.out)
    assert sorted(r["path"] for r in rows) == sorted(numpy_rows)
    for row in rows:
        want = numpy_rows[row["path"]]
        assert (row["file_sha"], row["audio_sha"]) == (want["file_sha"], want["audio_sha"])
        _assert_close(row["features"], want["features"], row["path"])

    again = extract(audio, out=tmp_path / "again.pkl", cache_dir=tmp_path / "cache", jobs=jobs,
                    config=CONFIG, quiet=True, backend="torch", device="cpu")
    assert (again.n_items, again.computed, again.cached) == (4, 0, 4)
    assert batches == [4] and again.device_busy == 0.0


def test_batches_are_bounded_by_samples_and_decoded_a_batch_ahead(audio, tmp_path, spied,
                                                                   monkeypatch):
    """Batches of at most TORCH_BATCH_SAMPLES; while one is computed the workers decode up
    to a batch (or two clips per worker, whichever is more) ahead, and no further (the
    pool's bound: tests/test_pool.py)."""
    import deepfusion.jobs.batcher as batcher

    batches, _ = spied
    real, ahead = batcher._run_tasks, []
    monkeypatch.setattr(batcher, "_run_tasks", lambda *a, **k: ahead.append(k) or real(*a, **k))
    monkeypatch.setattr(batcher, "TORCH_BATCH_SAMPLES", 3 * CONFIG.n_samples - 1)   # 2 clips
    result = extract(audio, out=tmp_path / "t.pkl", cache_dir=tmp_path / "cache", jobs=2,
                     config=CONFIG, quiet=True, backend="torch", device="cpu")
    assert result.computed == 4 and batches == [2, 2] and ahead == [{"ahead": 2}]


def test_an_entry_lost_after_its_report_is_computed_again_by_the_batch_function(audio, tmp_path,
                                                                                 numpy_rows, spied):
    batches, _ = spied
    cache = FeatureCache(tmp_path / "cache", CONFIG)
    cache.prepare()
    path = audio / "rock" / "rock.00000.wav"
    key = file_digest(path)
    assert compute_again(str(path), key, tmp_path / "cache", 60, cache=cache, config=CONFIG,
                         device="cpu") is None
    assert batches == [1]
    _assert_close(cache.load(key).features, numpy_rows["rock/rock.00000.wav"]["features"], "again")
    junk = audio / "rock" / "junk.wav"
    assert "cannot decode" in compute_again(str(junk), file_digest(junk), tmp_path / "cache", 60,
                                            cache=cache, config=CONFIG, device="cpu")


def test_clips_decoded_before_a_worker_died_are_kept(audio, tmp_path, spied):
    """A worker lost mid-run stops it (one line, see runtime/pool); the clips other workers
    had decoded are computed and stored first, so the rerun has less to do."""
    from deepfusion.audio import decode
    from deepfusion.errors import WorkerCrashError
    from deepfusion.jobs.batcher import torch_batches

    batches, _ = spied
    paths = sorted((audio / "rock").glob("rock.*.wav"))

    def results():
        for i, path in enumerate(paths):
            clip = decode(path, sr=CONFIG.sample_rate, duration=CONFIG.duration)
            yield i, (file_digest(path), None, (clip.y, {"audio_sha": "x", "source_sr": 1,
                                                         "channels": 1, "source_seconds": 3.0}), False)
        raise WorkerCrashError("a worker process died while extracting")

    cache = FeatureCache(tmp_path / "cache", CONFIG)
    cache.prepare()
    with pytest.raises(WorkerCrashError):
        list(torch_batches(results(), cache, CONFIG, "cpu"))
    assert batches == [2] and all(cache.load(file_digest(p)) is not None for p in paths)
