"""The musicnn port: against the original TensorFlow graph's outputs, its weights, its input.

``tests/data/musicnn_reference.npz`` was written by ``benchmarks/musicnn_tf_check.py
--write-fixture``: 3 log-mel patches of real clips and what the original graph (the musicnn
0.1.0 wheel's checkpoints, run by TensorFlow) computed from them. No TensorFlow, no network here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfusion.errors import ParameterError, WeightsNotFoundError
from deepfusion.features.pretrained import musicnn
from deepfusion.features.pretrained.musicnn import (MODELS, PATCH_FRAMES, SAMPLE_RATE, TAGS,
                                                    load_musicnn, log_mel, patches, resample_16k)

FIXTURE = Path(__file__).parent / "data" / "musicnn_reference.npz"
TOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", MODELS)
def test_port_matches_original_graph(name, reference):
    net = load_musicnn(name)
    with torch.inference_mode():
        out = net(torch.from_numpy(reference["x"]))
    for key in ("taggram", "penultimate"):
        np.testing.assert_allclose(out[key].numpy(), reference[f"{name}/{key}"], rtol=0, atol=TOL)
    # the pooled mid end reaches ~100: float32 summation order leaves ~1e-6 of that
    ref = reference[f"{name}/max_pool"]
    np.testing.assert_allclose(out["max_pool"].numpy(), ref, rtol=0,
                               atol=TOL * max(1.0, float(np.abs(ref).max())))


def test_forward_shapes_and_frozen():
    net = load_musicnn("MSD_musicnn")
    assert net is load_musicnn() is load_musicnn(name="MSD_musicnn")
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.tags == TAGS["MSD_musicnn"]
    with torch.inference_mode():
        out = net(torch.zeros(2, PATCH_FRAMES, 96))
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {"logits": (2, 50), "taggram": (2, 50), "penultimate": (2, 200),
                      "frontend": (2, 187, 561), "timbral": (2, 187, 408),
                      "temporal": (2, 187, 153), "cnn1": (2, 187, 64), "cnn2": (2, 187, 64),
                      "cnn3": (2, 187, 64), "midend": (2, 187, 753), "max_pool": (2, 753),
                      "mean_pool": (2, 753)}
    torch.testing.assert_close(out["taggram"], torch.sigmoid(out["logits"]))
    torch.testing.assert_close(out["max_pool"], out["midend"].amax(dim=1))
    with pytest.raises(ParameterError, match="96"):
        net(torch.zeros(1, PATCH_FRAMES, 128))


@pytest.mark.parametrize("name", MODELS)
def test_shipped_weights(name):
    data = musicnn.weights_file(name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == musicnn.WEIGHTS_SHA256[name]
    arrays = musicnn.read_weights(name)
    assert list(arrays) == [n for n, _ in musicnn.VARIABLES]
    assert all(arrays[n].shape == s and arrays[n].dtype == np.float32
               for n, s in musicnn.VARIABLES)
    assert sum(a.size for a in arrays.values()) == 792_079
    assert len(TAGS[name]) == len(set(TAGS[name])) == 50


@pytest.fixture
def fresh_cache():
    load_musicnn.cache_clear()
    yield
    load_musicnn.cache_clear()      # the next caller reloads the shipped weights


def test_missing_weights(tmp_path, monkeypatch, fresh_cache):
    missing = tmp_path / "MSD_musicnn.npz"
    monkeypatch.setattr(musicnn, "weights_file", lambda name: missing)
    with pytest.raises(WeightsNotFoundError, match="MSD_musicnn.npz") as err:
        load_musicnn("MSD_musicnn")
    assert str(err.value).endswith("reinstall deepfusion (pip install --force-reinstall deepfusion)")
    assert "\n" not in str(err.value)


def test_damaged_weights(tmp_path, monkeypatch, fresh_cache):
    data = bytearray(musicnn.weights_file("MTT_musicnn").read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged = tmp_path / "MTT_musicnn.npz"
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(musicnn, "weights_file", lambda name: damaged)
    with pytest.raises(WeightsNotFoundError, match="MTT_musicnn.npz.*damaged"):
        load_musicnn("MTT_musicnn")
    with pytest.raises(WeightsNotFoundError, match="reinstall"):
        musicnn.read_weights("MTT_musicnn", tmp_path / "nothing.npz")


def test_unknown_model():
    with pytest.raises(ParameterError, match="MSD_musicnn, MTT_musicnn") as err:
        load_musicnn("msd_musicnn")
    assert "'msd_musicnn'" in str(err.value)


# ------------------------------------------------------------------ input representation

@pytest.mark.parametrize("seconds, n_patches", [(30.0, 10), (2.9, 0), (6.0, 2)])
def test_patches_of_a_clip(seconds, n_patches):
    y = np.random.default_rng(0).standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32)
    mel = log_mel(y)
    assert mel.shape == (1 + len(y) // 256, 96) and mel.dtype == np.float32
    x = patches(mel)
    assert x.shape == (n_patches, PATCH_FRAMES, 96) and x.dtype == np.float32
    if n_patches:
        np.testing.assert_array_equal(x[-1], mel[(n_patches - 1) * 187:n_patches * 187])


@pytest.mark.parametrize("frames, n", [(186, 0), (187, 1), (373, 1), (374, 2)])
def test_patches_drop_the_partial_last(frames, n):
    mel = np.arange(frames * 96, dtype=np.float32).reshape(frames, 96)
    x = patches(mel)
    assert x.shape == (n, 187, 96)
    np.testing.assert_array_equal(x.reshape(-1, 96), mel[:n * 187])


def test_patches_rejects_other_shapes():
    with pytest.raises(ParameterError, match=r"\(200, 128\)"):
        patches(np.zeros((200, 128), np.float32))


def test_resample_identity_at_16k():
    y = np.random.default_rng(1).standard_normal(12345)
    out = resample_16k(y, 16000)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, y.astype(np.float32))


def test_resample_22050():
    sr = 22050
    t = np.arange(sr) / sr                                       # 1 s of 1 kHz
    out = resample_16k(np.sin(2 * np.pi * 1000 * t), sr)
    assert out.shape == (16000,) and out.dtype == np.float32    # ceil(n * 16000 / sr)
    ref = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    np.testing.assert_allclose(out[500:-500], ref[500:-500], atol=1e-3)
    assert resample_16k(np.zeros(1001, np.float32), sr).shape == (727,)   # ceil(726.3)


@pytest.mark.parametrize("sr", [22050, 44100, 48000, 11025, 8000, 22051])
@pytest.mark.parametrize("n", [7, 1000, 100_003])
def test_resampler_is_resampys_kaiser_best(sr, n):
    """The polyphase form gives resampy's own output (22051 Hz: resampy itself runs)."""
    import resampy

    from deepfusion.features.pretrained.musicnn_input import _kaiser_best

    y = (np.random.default_rng(n).standard_normal(n) * 0.3).astype(np.float32)
    want = resampy.resample(y, sr, 16000, filter="kaiser_best")
    got = _kaiser_best(y, sr)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_sine_lands_in_its_mel_band():
    import librosa

    y = 0.5 * np.sin(2 * np.pi * 440 * np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE)
    mel = log_mel(y.astype(np.float32))
    centres = librosa.mel_frequencies(96 + 2, fmin=0, fmax=SAMPLE_RATE / 2)[1:-1]
    assert mel.mean(axis=0).argmax() == np.abs(centres - 440).argmin()
    # musicnn's compression: silence is log10(1) = 0, nothing negative
    assert log_mel(np.zeros(4000, np.float32)).max() == 0.0
