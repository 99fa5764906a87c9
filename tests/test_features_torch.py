"""The torch feature path (:mod:`deepfusion.features.torch_views`) against the numpy one.

Both compute librosa's definitions from one STFT; they differ by float32 rounding (another FFT,
other summation orders), which HPSS's median filters and the dB scale pass on. The tolerances
(``deepfusion.features.torch_views.TOLERANCE``) are the largest absolute difference allowed per view,
set above what 80 real 30-s clips (``../shared/data/minigenres``, see
``benchmarks/extract_speed.py``) and the synthetic clips here show: mel dB views 0.1 dB (measured up to 0.076 dB, on the percussive view of quiet
high bands), MFCC 0.01 (measured 0.0013), chroma 1e-4 (measured 2e-6) and tempogram 1e-3
(2e-6 on music; a steady sine's onset envelope is rounding noise, which normalised differs by
3e-4). Chroma agrees this closely because the tuning estimate (a histogram mode) comes out the
same; the clips below have a clear one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepfusion.config import FeatureConfig
from deepfusion.errors import ParameterError
from deepfusion.features.numpy_views import compute_features, median_filter_axis
from deepfusion.features.torch_views import (TOLERANCE, compute_features_torch, median_filter,
                                             median_filter_unfold)
from deepfusion.testing import invoke, load_own_pickle, one_error_line
from deepfusion.views import FEATURE_KEYS, PRETRAINED_KEY

SR = 22050
CONFIG = FeatureConfig(duration=3.0)
HAVE_GPU = torch.cuda.is_available() or (
    getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available())


def _signal(kind: str, n: int = CONFIG.n_samples) -> np.ndarray:
    t = np.arange(n) / SR
    rng = np.random.default_rng(0)
    if kind == "sine440":
        y = 0.5 * np.sin(2 * np.pi * 440 * t)
    elif kind == "noise":
        y = 0.1 * rng.standard_normal(n)
    elif kind == "clicks":
        y = np.zeros(n)
        y[:: SR // 4] = 1.0                          # 240 beats per minute
    elif kind == "silence":
        y = np.zeros(n)
    elif kind == "chord+beat":           # A major triad over a kick, a little noise, a fade
        y = sum(0.2 * np.sin(2 * np.pi * f * t) for f in (220.0, 277.18, 329.63))
        y = y * np.linspace(1, 0.2, n) + 0.01 * rng.standard_normal(n)
        y[:: SR // 2] += 0.8
    else:
        raise ValueError(kind)
    return y.astype(np.float32)


def _assert_close(got: dict, want: dict, what: str = "") -> None:
    assert set(got) == set(want) and set(FEATURE_KEYS) <= set(got)
    for k in got:
        assert got[k].dtype == np.float32 and got[k].shape == want[k].shape, k
        diff = float(np.abs(got[k] - want[k]).max())
        assert diff <= TOLERANCE[k], f"{what} {k}: largest difference {diff:.3g} > {TOLERANCE[k]}"


@pytest.mark.parametrize("kind", ["sine440", "noise", "clicks", "silence", "chord+beat"])
def test_torch_features_match_numpy(kind):
    y = _signal(kind)
    (got,) = compute_features_torch(y[None], CONFIG, device="cpu")
    _assert_close(got, compute_features(y, CONFIG), kind)


def test_a_sine_at_440_hz_puts_chroma_on_a():
    (got,) = compute_features_torch(_signal("sine440")[None], CONFIG, device="cpu")
    assert np.bincount(got["chroma"].argmax(axis=0)).argmax() == 9     # C, C#, ..., A = 9


def test_silence_gives_zeros_not_nan():
    (got,) = compute_features_torch(np.zeros((1, CONFIG.n_samples), np.float32), CONFIG)
    for k, v in got.items():
        # the hand-made views of silence are zeros; the pretrained network's outputs are not
        assert np.isfinite(v).all() and (k == PRETRAINED_KEY or not v.any()), k


@pytest.mark.slow
def test_synthetic_music_matches_numpy_in_one_batch(tmp_path):
    """Clips of the project's generator, three genres in one batch, with a fixed tuning too."""
    from deepfusion.audio import decode, discover
    from deepfusion.synth import synthesize_dataset

    synthesize_dataset(tmp_path, genres=3, clips_per_genre=1, duration=CONFIG.duration, seed=3)
    ys = np.stack([decode(it.path, sr=SR, duration=CONFIG.duration).y
                   for it in discover(tmp_path)])
    for config in (CONFIG, FeatureConfig(duration=CONFIG.duration, chroma_tuning=0.0)):
        batch = compute_features_torch(ys, config, device="cpu")
        assert len(batch) == len(ys)
        for y, got in zip(ys, batch):
            _assert_close(got, compute_features(y, config))


@pytest.mark.slow
def test_other_settings_match_numpy():
    """Odd kernel, margin > 1 (hard zeros), other FFT size, hop and tempogram window."""
    config = FeatureConfig(duration=2.0, n_fft=1024, hop_length=256, n_mels=64, hpss_kernel=17,
                           hpss_margin=2.0, hpss_power=1.0, n_mfcc=13, fmax=8000.0,
                           tempogram_win_length=101)
    y = _signal("chord+beat", config.n_samples)
    (got,) = compute_features_torch(y, config, device="cpu")
    _assert_close(got, compute_features(y, config))


@pytest.mark.parametrize("shape", [(2, 40, 50), (1, 7, 5), (3, 1025, 12)])
@pytest.mark.parametrize("dim", [-1, -2])
def test_unfolded_median_equals_the_numpy_one(shape, dim, monkeypatch):
    """The accelerators' median filter (run here on the CPU), in small chunks, equals
    bottleneck's, also where the window is longer than the axis (reflected again)."""
    import deepfusion.features.torch_views as ft

    monkeypatch.setattr(ft, "MEDIAN_CHUNK_ELEMENTS", 31 * 64)       # several chunks
    S = np.random.default_rng(1).random(shape, dtype=np.float32)
    want = median_filter_axis(S, size=31, axis=dim)
    assert np.array_equal(median_filter_unfold(torch.from_numpy(S), size=31, dim=dim).numpy(), want)
    assert np.array_equal(median_filter(torch.from_numpy(S), size=31, dim=dim).numpy(), want)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("shape", [(5, 40, 50), (1, 7, 5), (2, 1025, 12), (40, 50)])
@pytest.mark.parametrize("dim", [-1, -2])
def test_the_cpu_median_on_threads_equals_bottlenecks(shape, dim, threads):
    """Sliced across clips (or, with fewer clips than threads, across the other axis), one
    slice per torch thread: the same values as one call."""
    S = np.random.default_rng(2).random(shape, dtype=np.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = median_filter(torch.from_numpy(S), size=31, dim=dim).numpy()
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(got, median_filter_axis(S, size=31, axis=dim))


def test_bad_batches_are_refused():
    with pytest.raises(ParameterError, match="non-finite"):
        compute_features_torch(np.full((1, CONFIG.n_samples), np.nan, np.float32), CONFIG)
    with pytest.raises(ParameterError, match="batch, samples"):
        compute_features_torch(np.zeros((1, 1, 10), np.float32), CONFIG)


# ------------------------------------------------------------------ extract --backend --device

def test_resolve_backend():
    from deepfusion.jobs.job import resolve_backend

    assert resolve_backend("numpy", "auto") == ("numpy", None)
    assert resolve_backend(None, "cpu") == ("numpy", None)
    assert resolve_backend("torch", "cpu") == ("torch", "cpu")
    with pytest.raises(ParameterError, match="numpy backend runs on the CPU"):
        resolve_backend("numpy", "cuda")
    with pytest.raises(ParameterError, match="numpy or torch"):
        resolve_backend("jax", "cpu")
    if not HAVE_GPU:
        assert resolve_backend(None, "auto") == ("numpy", None)
        assert resolve_backend("torch", "auto") == ("torch", "cpu")


def _extract(audio, out, cache, *extra):
    result = invoke("extract", "--audio-dir", audio, "--out", out, "--cache-dir", cache,
                    "--jobs", 2, "--quiet", "--duration", 4, *extra)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_extract_torch_backend_matches_numpy_and_shares_its_cache(tmp_path):
    from deepfusion.synth import synthesize_dataset

    audio = tmp_path / "audio"
    synthesize_dataset(audio, genres=2, clips_per_genre=2, duration=4.0, seed=0)
    run = _extract(audio, tmp_path / "torch.pkl", tmp_path / "cache-torch",
                   "--backend", "torch", "--device", "cpu")
    assert "4 clips (4 computed, 0 from cache)" in run.stdout
    _extract(audio, tmp_path / "numpy.pkl", tmp_path / "cache-numpy", "--backend", "numpy")
    numpy_rows, torch_rows = (load_own_pickle(tmp_path / f"{b}.pkl") for b in ("numpy", "torch"))
    assert [r["path"] for r in torch_rows] == [r["path"] for r in numpy_rows]
    for a, b in zip(torch_rows, numpy_rows):
        assert (a["label"], a["file_sha"], a["audio_sha"]) == (b["label"], b["file_sha"],
                                                              b["audio_sha"])
        _assert_close(a["features"], b["features"], a["path"])
    # one namespace: entries are interchangeable, so the torch run reuses the numpy cache
    run = _extract(audio, tmp_path / "again.pkl", tmp_path / "cache-numpy",
                   "--backend", "torch", "--device", "cpu")
    assert "4 clips (0 computed, 4 from cache)" in run.stdout
    assert sorted(p.name for p in (tmp_path / "cache-numpy").iterdir()) == \
        sorted(p.name for p in (tmp_path / "cache-torch").iterdir())


@pytest.mark.slow
def test_extract_torch_batches_in_the_main_process(tmp_path, monkeypatch):
    """The one torch pipeline, on the CPU as on a GPU: workers decode, this process analyses
    batches of 3 (5 clips: a full batch and a remainder of 2); a batch that fails is redone
    clip by clip, and a clip that fails alone is reported as that file's error, the others
    kept."""
    import deepfusion.features.torch_views as ft
    import deepfusion.jobs.batcher as device_batches
    from deepfusion.synth import synthesize_dataset

    audio = tmp_path / "audio"
    synthesize_dataset(audio, genres=2, clips_per_genre=2, duration=4.0, seed=0)
    data = (audio / "rock" / "rock.00000.wav").read_bytes()
    (audio / "rock" / "copy.wav").write_bytes(data[:-8] + b"\x01" * 8)   # other bytes, a 5th key
    _extract(audio, tmp_path / "numpy.pkl", tmp_path / "cache-numpy", "--backend", "numpy")

    real, sizes = ft.compute_features_torch, []

    def flaky(y, config, *, device):
        y = np.atleast_2d(np.asarray(y))
        sizes.append(len(y))
        if len(sizes) == 1:
            raise RuntimeError("CUDA out of memory (pretend)")
        if len(sizes) == 2:
            raise RuntimeError("this clip is cursed")
        return real(y, config, device=device)

    monkeypatch.setattr(device_batches, "TORCH_BATCH_SAMPLES", 3 * CONFIG.sample_rate * 4)
    monkeypatch.setattr(ft, "compute_features_torch", flaky)
    run = invoke("extract", "--audio-dir", audio, "--out", tmp_path / "torch.pkl",
                 "--cache-dir", tmp_path / "cache-torch", "--jobs", 2, "--quiet",
                 "--duration", 4, "--backend", "torch", "--device", "cpu")
    assert run.exit_code == 0, run.output
    assert sizes == [3, 1, 1, 1, 2]
    assert "4 clips (4 computed, 0 from cache)" in run.stdout
    assert ("feature computation failed (this clip is cursed); this is a fault in deepfusion or "
            "a library: please report it with this file") in run.stderr
    want = {r["path"]: r for r in load_own_pickle(tmp_path / "numpy.pkl")}
    assert len(want) == 5
    for row in load_own_pickle(tmp_path / "torch.pkl"):
        assert row["file_sha"] == want[row["path"]]["file_sha"]
        _assert_close(row["features"], want[row["path"]]["features"], row["path"])


@pytest.mark.slow
@pytest.mark.skipif(HAVE_GPU, reason="this machine has a GPU")
def test_extract_on_a_missing_gpu_is_one_line(tmp_path):
    from deepfusion.testing import run_command

    (tmp_path / "audio" / "rock").mkdir(parents=True)
    proc = run_command("extract", "--audio-dir", tmp_path / "audio", "--out", tmp_path / "f.pkl",
                       "--cache-dir", tmp_path / "cache", "--device", "cuda")
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).startswith("Error: --device cuda: CUDA is not available")
    assert not (tmp_path / "f.pkl").exists() and not (tmp_path / "cache").exists()


@pytest.mark.skipif(HAVE_GPU, reason="this machine has a GPU")
@pytest.mark.parametrize("extra", [["--device", "mps"], ["--backend", "torch", "--device", "cuda"],
                                   ["--backend", "numpy", "--device", "cuda"]])
def test_extract_refuses_a_device_it_cannot_use(tmp_path, extra):
    (tmp_path / "audio" / "rock").mkdir(parents=True)
    result = invoke("extract", "--audio-dir", tmp_path / "audio", "--out", tmp_path / "f.pkl",
                    "--cache-dir", tmp_path / "cache", *extra)
    assert result.exit_code == 2
    assert f"--device {extra[-1]}" in one_error_line(result.stderr)
