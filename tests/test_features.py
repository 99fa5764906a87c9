"""Feature functions on synthetic signals whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

from deepfusion.config import VERSION_1_VIEWS, FeatureConfig
from deepfusion.errors import ParameterError
from deepfusion.features.numpy_views import compute_features, median_filter_axis
from deepfusion.testing.reference import reference_features
from deepfusion.views import FEATURE_KEYS, PRETRAINED_KEY

SR = 22050
CONFIG = FeatureConfig(duration=6.0)


def tone(freq: float, seconds: float = 6.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def clicks(bpm: float, seconds: float = 6.0, amp: float = 0.9) -> np.ndarray:
    y = np.zeros(int(seconds * SR), np.float32)
    burst = np.random.default_rng(0).uniform(-amp, amp, 44).astype(np.float32)  # 2 ms, broadband
    for k in np.arange(0.25, seconds, 60.0 / bpm):
        i = int(k * SR)
        y[i:i + burst.size] = burst
    return y


@pytest.mark.parametrize("size", [3, 7, 31])
@pytest.mark.parametrize("axis", [0, 1])
def test_median_filter_matches_scipy(size, axis):
    rng = np.random.default_rng(size + axis)
    S = rng.random((64, 90), dtype=np.float32)
    shape = [1, 1]
    shape[axis] = size
    expected = scipy.ndimage.median_filter(S, size=shape, mode="reflect")
    np.testing.assert_array_equal(median_filter_axis(S, size=size, axis=axis), expected)


def test_shapes_and_dtypes():
    # written out from the definitions, not asked of the config: a centred STFT of 6 s at
    # 22,050 Hz, hop 512, has 1 + 132,300 // 512 = 259 frames; 128 mel bands, 20 MFCCs,
    # 12 chroma bins, 384 tempogram lags; musicnn's 200 penultimate units and 50 tags for
    # one patch (6 s holds two whole 3-s patches, and one in every 4 is taken)
    frames = 1 + int(6.0 * SR) // 512
    assert frames == 259
    expected = {"mel_spec_orig": (128, frames), "mel_spec_harm": (128, frames),
                "mel_spec_perc": (128, frames), "mfcc": (20, frames), "chroma": (12, frames),
                "tempogram": (384, frames), "musicnn": (200 + 50, 1)}
    feats = compute_features(tone(440.0), CONFIG)
    assert tuple(feats) == CONFIG.keys and set(FEATURE_KEYS) < set(feats)
    # the seven views of the feature code's first version (a view added since is sized by its
    # row: tests/test_views.py)
    assert {k: s for k, s in CONFIG.feature_shapes().items() if k in expected} == expected
    for key, shape in expected.items():
        assert feats[key].shape == shape, key
        assert feats[key].dtype == np.float32
        assert feats[key].flags.c_contiguous


def test_silence_has_no_nan():
    feats = compute_features(np.zeros(CONFIG.n_samples, np.float32), CONFIG)
    for key, value in feats.items():
        assert np.isfinite(value).all(), key


@pytest.mark.parametrize("freq,pitch_class", [(440.0, 9), (261.63, 0), (392.0, 7)])
def test_tone_puts_chroma_peak_on_its_pitch_class(freq, pitch_class):
    chroma = compute_features(tone(freq), CONFIG)["chroma"]
    assert int(np.argmax(chroma.mean(axis=1))) == pitch_class


@pytest.mark.parametrize("bpm", [120.0, 90.0])
def test_click_train_peaks_tempogram_at_its_lag(bpm):
    config = FeatureConfig(duration=12.0)
    tempogram = compute_features(clicks(bpm, 12.0), config)["tempogram"]
    lag = 60.0 / bpm * SR / config.hop_length            # 21.53 frames at 120 BPM
    profile = tempogram.mean(axis=1)
    # the period falls between two integer lags, so its energy is shared by a pair of them;
    # lags below 5 frames (over 500 BPM) are the trivial peak at zero
    pairs = profile[5:200] + profile[6:201]
    found = 5 + int(np.argmax(pairs)) + 0.5
    assert abs(found - lag) <= 1.0


def test_hpss_puts_tone_in_harmonic_and_clicks_in_percussive():
    y = tone(440.0, amp=0.3) + clicks(120.0)
    feats = compute_features(y, CONFIG)
    mel_freqs = __import__("librosa").mel_frequencies(n_mels=CONFIG.n_mels + 2, fmax=SR / 2)[1:-1]
    tone_band = int(np.argmin(np.abs(mel_freqs - 440.0)))
    high = mel_freqs > 4000.0
    harm, perc = feats["mel_spec_harm"], feats["mel_spec_perc"]
    # frames at click onsets: where the percussive high bands are loudest
    click_frames = perc[high].mean(axis=0) > np.percentile(perc[high].mean(axis=0), 90)
    quiet_frames = ~np.convolve(click_frames, np.ones(9), mode="same").astype(bool)
    # the tone dominates the harmonic view and is far below the top of the percussive view
    assert harm[tone_band, quiet_frames].mean() > -3.0
    assert perc[tone_band, quiet_frames].mean() < -30.0
    # the clicks' high-frequency energy is in the percussive view, not the harmonic one
    assert perc[high][:, click_frames].mean() > harm[high][:, click_frames].mean() + 20.0


def test_matches_plain_librosa_definitions():
    rng = np.random.default_rng(0)
    y = tone(330.0, amp=0.2) + clicks(100.0, amp=0.5) + 0.01 * rng.standard_normal(CONFIG.n_samples).astype(np.float32)
    fast, slow = compute_features(y, CONFIG), reference_features(y, CONFIG)
    assert set(slow) == set(VERSION_1_VIEWS) - {PRETRAINED_KEY}     # the six hand-made ones
    for key in slow:
        np.testing.assert_allclose(fast[key], slow[key], atol=1e-3, rtol=0, err_msg=key)


@pytest.mark.parametrize("bad", [dict(n_fft=0), dict(hpss_kernel=30), dict(duration=-1.0),
                                 dict(fmax=20000.0), dict(hpss_margin=0.5), dict(n_mfcc=200)])
def test_bad_config_values_are_named(bad):
    """The message names the command-line flag (``--n-fft 0: ...``), the error the field."""
    from deepfusion.config import flag_of

    name = next(iter(bad))
    with pytest.raises(ParameterError, match=f"^{flag_of(name)} ") as err:
        FeatureConfig(**bad)
    assert err.value.field == name


def test_config_round_trips_through_a_dict():
    config = FeatureConfig(n_mels=64, chroma_tuning=0.0)
    assert FeatureConfig.from_dict(config.to_dict()) == config
    assert FeatureConfig(n_mels=64).fingerprint() != FeatureConfig().fingerprint()
