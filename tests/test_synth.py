"""The synthetic genre generator: files, determinism, valid audio, and genres that really differ."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from deepfusion.errors import OutputError, ParameterError
from deepfusion.synth import (GENRES, RECIPES, GenreRecipe, clip_params, clip_seed, render_clip,
                              synthesize_dataset)

SR = 22050
HOP = 256

# Krumhansl-Kessler key profiles, tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def documented_seed(seed: int, genre_index: int, clip_index: int) -> int:
    """The seed of a dataset's clip as the module documents it, computed here: the first
    64-bit word of numpy's SeedSequence of (seed, genre index, clip index)."""
    return int(np.random.SeedSequence([seed, genre_index, clip_index])
               .generate_state(1, dtype=np.uint64)[0])


def onset_envelope(y: np.ndarray) -> np.ndarray:
    """librosa's onset strength at a hop of HOP samples (finer tempo resolution than 512)."""
    import librosa

    return librosa.onset.onset_strength(y=y, sr=SR, hop_length=HOP)


def test_every_genre_has_a_recipe(tmp_path):
    assert 1 <= len(GENRES) <= 10
    # all of GENRES is a dataset: one folder per name, clip 0 of GENRES[g] seeded by index g
    paths = synthesize_dataset(tmp_path, genres=len(GENRES), clips_per_genre=1, duration=0.5,
                               sr=8000, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(GENRES)
    assert paths == sorted(tmp_path / g / f"{g}.00000.wav" for g in GENRES)
    for g, genre in enumerate(GENRES):
        assert clip_seed(0, g, 0) == documented_seed(0, g, 0)
        expected = render_clip(genre, seed=documented_seed(0, g, 0), duration=0.5, sr=8000)
        stored, _ = sf.read(tmp_path / genre / f"{genre}.00000.wav", dtype="int16")
        np.testing.assert_array_equal(stored, np.round(expected * 32767).astype(np.int16))
    for name, recipe in RECIPES.items():
        assert name.isascii() and name.isalpha() and name.islower()
        lo, hi = recipe.tempo
        assert 0 < lo < hi
        assert recipe.description


def test_dataset_has_gtzan_layout(tmp_path):
    out = tmp_path / "audio"
    paths = synthesize_dataset(out, genres=3, clips_per_genre=2, duration=0.5)
    expected = sorted(out / g / f"{g}.{i:05d}.wav" for g in GENRES[:3] for i in range(2))
    assert paths == expected
    # nothing else: no temp files left behind, no other genres
    assert sorted(p for p in out.rglob("*") if p.is_file()) == expected
    for path in paths:
        info = sf.info(path)
        assert (info.format, info.subtype) == ("WAV", "PCM_16")
        assert (info.samplerate, info.channels, info.frames) == (SR, 1, round(0.5 * SR))


def test_dataset_is_byte_identical_for_a_seed(tmp_path):
    kwargs = dict(genres=2, clips_per_genre=2, duration=1.0)
    first = synthesize_dataset(tmp_path / "a", seed=7, **kwargs)
    again = synthesize_dataset(tmp_path / "b", seed=7, **kwargs)
    other = synthesize_dataset(tmp_path / "c", seed=8, **kwargs)
    data = [p.read_bytes() for p in first]
    assert data == [p.read_bytes() for p in again]
    assert all(d != p.read_bytes() for d, p in zip(data, other))
    assert len(set(data)) == len(data), "every clip must get its own seed"
    # rewriting in place replaces the files with the same bytes
    assert [p.read_bytes() for p in synthesize_dataset(tmp_path / "a", seed=7, **kwargs)] == data
    assert not list((tmp_path / "a").rglob(".*"))


def test_dataset_file_holds_the_rendered_clip(tmp_path):
    paths = synthesize_dataset(tmp_path, genres=2, clips_per_genre=2, duration=0.5, seed=3)
    path = tmp_path / GENRES[1] / f"{GENRES[1]}.00000.wav"      # genre 1, clip 0: not (0, 1)
    assert path in paths
    expected = render_clip(GENRES[1], seed=documented_seed(3, 1, 0), duration=0.5)
    stored, sr = sf.read(path, dtype="int16")
    assert sr == SR
    np.testing.assert_array_equal(stored, np.round(expected * 32767).astype(np.int16))


@pytest.mark.parametrize("genre", GENRES)
def test_clip_is_valid_audio(genre):
    y = render_clip(genre, seed=11, duration=2.5)
    assert y.dtype == np.float32
    assert y.shape == (round(2.5 * SR),)
    assert np.isfinite(y).all()
    peak = np.abs(y).max()
    assert 0.3 <= peak <= 0.9 + 1e-6
    assert np.sqrt(np.mean(y ** 2)) > 0.02 * peak, "clip is (nearly) silent"


@pytest.mark.parametrize("sr,duration", [(8000, 0.001), (16000, 1.3), (44100, 0.75),
                                         (22050, 1 / 22050)])
def test_clip_length_follows_duration_and_rate(sr, duration):
    for genre in GENRES:
        y = render_clip(genre, seed=2, duration=duration, sr=sr)
        assert y.shape == (round(duration * sr),)
        assert np.isfinite(y).all() and 0 < np.abs(y).max() <= 0.99


def test_clip_depends_on_seed_and_genre():
    y = render_clip("techno", seed=5, duration=1.0)
    np.testing.assert_array_equal(y, render_clip("techno", seed=5, duration=1.0))
    assert not np.array_equal(y, render_clip("techno", seed=6, duration=1.0))
    assert not np.array_equal(y, render_clip("rock", seed=5, duration=1.0))


_N = len(GENRES)


@pytest.mark.parametrize("kwargs,message", [
    ({"genres": 0}, f"^--genres 0: synth has {_N} genres; give 1 to {_N}$"),
    ({"genres": _N + 1}, f"^--genres {_N + 1}: synth has {_N} genres; give 1 to {_N}$"),
    ({"clips_per_genre": 0}, "^--clips-per-genre 0: give a whole number 1 or more$"),
    ({"duration": 0.0}, r"^--duration 0\.0: give a number of seconds above 0$"),
    ({"duration": -2.5}, r"^--duration -2\.5: give a number of seconds above 0$"),
    ({"sr": 0}, "got 0$"),
    ({"sr": -22050}, "got -22050$"),
    ({"seed": -1}, "got -1$"),
])
def test_dataset_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ParameterError, match=message) as caught:
        synthesize_dataset(tmp_path / "out", **kwargs)
    assert isinstance(caught.value, ValueError)
    assert not (tmp_path / "out").exists(), "nothing is written before arguments are checked"


def test_unwritable_file_is_an_output_error(tmp_path):
    blocker = tmp_path / GENRES[0] / f"{GENRES[0]}.00000.wav"
    blocker.mkdir(parents=True)   # a folder where the file should go
    with pytest.raises(OutputError, match=re.escape(str(blocker))):
        synthesize_dataset(tmp_path, genres=1, clips_per_genre=1, duration=0.1)
    assert [p.name for p in blocker.parent.iterdir()] == [blocker.name], "temp file left behind"


def test_recipe_rejects_malformed_pattern():
    with pytest.raises(ParameterError, match="'x...'"):
        GenreRecipe(description="", tempo=(100.0, 120.0), kick="x...",
                    chord_pattern="x...............")


def test_import_is_light():
    # tests and the CLI import synth; librosa (seconds to import) must wait until needed
    code = "import sys, deepfusion.synth; print(sorted({'librosa', 'torch'} & set(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def test_render_rejects_unknown_genre():
    with pytest.raises(ParameterError, match="'polka'"):
        render_clip("polka", seed=0)


@pytest.mark.parametrize("genre,seed,lo,hi", [("techno", 0, 122, 132), ("techno", 1, 122, 132),
                                               ("reggae", 0, 66, 84), ("reggae", 1, 66, 84),
                                               ("march", 0, 104, 124), ("rock", 2, 110, 140)])
def test_estimated_tempo_is_the_drawn_tempo(genre, seed, lo, hi):
    import librosa

    # the ranges are the documented ones, written out so that a recipe change must be deliberate
    drawn = clip_params(genre, seed=seed).tempo
    assert lo <= drawn <= hi
    env = onset_envelope(render_clip(genre, seed=seed, duration=10.0))
    estimate = float(librosa.feature.tempo(onset_envelope=env, sr=SR, hop_length=HOP)[0])
    # a tempo estimator may lock onto half or double the beat; any other answer means the
    # rhythm does not follow the recipe (the 4% covers the estimator's lag quantisation)
    errors = [abs(estimate * octave / drawn - 1) for octave in (0.5, 1.0, 2.0)]
    assert min(errors) < 0.04, f"{genre}: estimated {estimate:.1f} BPM, drawn {drawn:.1f} BPM"


@pytest.mark.parametrize("genre,seed,beats_per_bar", [("waltz", 0, 3), ("waltz", 1, 3),
                                                      ("march", 0, 4), ("march", 1, 4)])
def test_meter_shows_in_onset_periodicity(genre, seed, beats_per_bar):
    # waltz and march share their chord progression: only the meter tells them apart here.
    # In 3/4 the onsets repeat after three beats and clash after two or four; in 4/4 the
    # reverse.
    env = onset_envelope(render_clip(genre, seed=seed, duration=8.0))
    env = env - env.mean()
    ac = np.correlate(env, env, mode="full")[env.size - 1:]
    beat = 60.0 / clip_params(genre, seed=seed).tempo * SR / HOP   # frames per beat

    def at(beats: int) -> float:
        lag = int(round(beats * beat))
        return float(ac[lag - 1:lag + 2].max())

    triple = at(3) > max(at(2), at(4))
    assert triple == (beats_per_bar == 3), \
        f"ac(2)={at(2):.1f}, ac(3)={at(3):.1f}, ac(4)={at(4):.1f}"


@pytest.mark.parametrize("genre,seed,mode", [("techno", 0, "minor"), ("techno", 3, "minor"),
                                             ("ambient", 0, "minor"), ("rock", 0, "major"),
                                             ("waltz", 1, "major"), ("march", 2, "major")])
def test_mode_shows_in_chroma(genre, seed, mode):
    import librosa

    tonic = clip_params(genre, seed=seed).tonic
    y = render_clip(genre, seed=seed, duration=8.0)
    profile = np.roll(librosa.feature.chroma_stft(y=y, sr=SR).mean(axis=1), -tonic)
    r_major = np.corrcoef(profile, MAJOR_PROFILE)[0, 1]
    r_minor = np.corrcoef(profile, MINOR_PROFILE)[0, 1]
    assert (r_major > r_minor) == (mode == "major"), f"major {r_major:.2f}, minor {r_minor:.2f}"
    assert max(r_major, r_minor) > 0.3, "chroma does not follow the drawn key"


# --------------------------------------------------------------------------------------------
# Domains: the same genres with another production (a generalisation check without real data)

# SHA-256 (first 16 hex digits) of the 16-bit PCM of render_clip(genre, seed=1, duration=0.5),
# taken from the generator before domains existed (commit bf595e0, deepfusion/synth.py; run
# there again, it gives these). The module promises byte-identical datasets across runs and
# machines; a mismatch means the default production changed (or numpy/scipy changed a
# filter's last bits, which breaks that promise too).
DEFAULT_PCM_SHA256 = {
    "techno": "2d9b0a88690d8ff3", "rock": "6513bcd8148d2c7f", "waltz": "43683784cb710da8",
    "reggae": "36dd260fb6587885", "ambient": "afdef82b7283e776", "funk": "c9f00fd3f1f2b3f7",
    "march": "eefa7f1003897607", "ballad": "1fde43400e768de2", "bossa": "2cef4e23c59cc778",
    "noise": "2ee4b5761960a1f0",
}


# The same for the PCM of each file of synthesize_dataset(genres=3, clips_per_genre=2,
# duration=0.5, seed=4), from the same commit's generator: the seeds of a dataset's clips,
# the genres' order and the quantisation, not this code's own output.
DATASET_PCM_SHA256 = {
    "rock/rock.00000.wav": "277f41026b363d71", "rock/rock.00001.wav": "8b2a41d96dde1eab",
    "techno/techno.00000.wav": "99dc4588f95c353b", "techno/techno.00001.wav": "2caf51509e5118cc",
    "waltz/waltz.00000.wav": "75c9d300a21ee6db", "waltz/waltz.00001.wav": "b380be46e960c3fa",
}


def spectral_centroid(y: np.ndarray) -> float:
    """Power-weighted mean frequency of the whole clip, Hz."""
    power = np.abs(np.fft.rfft(y.astype(np.float64))) ** 2
    return float((power * np.fft.rfftfreq(y.size, 1.0 / SR)).sum() / power.sum())


def test_default_domain_is_the_production_of_before():
    import hashlib

    assert set(DEFAULT_PCM_SHA256) == set(GENRES)
    for genre in GENRES:
        y = render_clip(genre, seed=1, duration=0.5)
        np.testing.assert_array_equal(y, render_clip(genre, seed=1, duration=0.5,
                                                     domain="default"))
        pcm = np.round(np.clip(y, -1.0, 1.0) * 32767.0).astype("<i2")
        assert hashlib.sha256(pcm.tobytes()).hexdigest()[:16] == DEFAULT_PCM_SHA256[genre], genre
        assert clip_params(genre, seed=1, domain="default") == clip_params(genre, seed=1)
        assert clip_params(genre, seed=1).tilt == 0.0


def test_default_domain_dataset_is_the_dataset_without_the_argument(tmp_path):
    import hashlib

    kwargs = dict(genres=3, clips_per_genre=2, duration=0.5, seed=4)
    plain = synthesize_dataset(tmp_path / "a", **kwargs)
    named = synthesize_dataset(tmp_path / "b", domain="default", **kwargs)
    assert [p.read_bytes() for p in plain] == [p.read_bytes() for p in named]
    pcm = {p.relative_to(tmp_path / "a").as_posix(): sf.read(p, dtype="int16")[0] for p in plain}
    assert {name: hashlib.sha256(y.astype("<i2").tobytes()).hexdigest()[:16]
            for name, y in pcm.items()} == DATASET_PCM_SHA256


def test_shifted_render_is_deterministic_and_not_the_default():
    for genre in ("techno", "ambient"):
        y = render_clip(genre, seed=5, duration=1.0, domain="shifted")
        np.testing.assert_array_equal(y, render_clip(genre, seed=5, duration=1.0,
                                                     domain="shifted"))
        assert not np.array_equal(y, render_clip(genre, seed=5, duration=1.0))
        assert not np.array_equal(y, render_clip(genre, seed=6, duration=1.0, domain="shifted"))


def test_shifted_dataset_is_byte_identical_and_differs_from_default(tmp_path):
    kwargs = dict(genres=2, clips_per_genre=2, duration=0.5, seed=7)
    first = synthesize_dataset(tmp_path / "a", domain="shifted", **kwargs)
    again = synthesize_dataset(tmp_path / "b", domain="shifted", **kwargs)
    default = synthesize_dataset(tmp_path / "c", **kwargs)
    assert [p.relative_to(tmp_path / "a") for p in first] == \
        [p.relative_to(tmp_path / "c") for p in default]
    data = [p.read_bytes() for p in first]
    assert data == [p.read_bytes() for p in again]
    assert all(d != p.read_bytes() for d, p in zip(data, default))
    # the file is the shifted render of the clip's seed
    path = tmp_path / "a" / GENRES[0] / f"{GENRES[0]}.00001.wav"
    assert path in first
    stored, _ = sf.read(path, dtype="int16")
    expected = render_clip(GENRES[0], seed=documented_seed(7, 0, 1), duration=0.5,
                           domain="shifted")
    np.testing.assert_array_equal(stored, np.round(expected * 32767).astype(np.int16))


@pytest.mark.parametrize("genre", GENRES)
def test_shifted_clip_is_valid_audio(genre):
    y = render_clip(genre, seed=11, duration=1.5, domain="shifted")
    assert y.dtype == np.float32 and y.shape == (round(1.5 * SR),)
    assert np.isfinite(y).all()
    assert 0.3 <= np.abs(y).max() <= 0.9 + 1e-6
    assert np.sqrt(np.mean(y ** 2)) > 0.02 * np.abs(y).max(), "clip is (nearly) silent"


def test_shift_changes_production_not_genre_parameters():
    db = lambda ratio: 20 * np.log10(ratio)   # noqa: E731
    timbre_role = {"saw": "square", "square": "saw", "sine": "organ", "organ": "sine",
                   "fm": "pluck", "pluck": "fm", "bell": "fm"}
    for genre in GENRES:
        lo, hi = RECIPES[genre].tempo
        for seed in range(20):
            p = clip_params(genre, seed=seed)
            q = clip_params(genre, seed=seed, domain="shifted")
            assert q == clip_params(genre, seed=seed, domain="shifted")
            assert (p.domain, q.domain) == ("default", "shifted")
            # the genre: key, register, swing, chord level, drives, cutoffs, crackle as drawn
            for name in ("genre", "tonic", "register", "swing", "chord_level", "drum_drive",
                         "chord_drive", "drive", "chord_cutoff", "bass_cutoff", "crackle",
                         "peak", "events_seed"):
                assert getattr(q, name) == getattr(p, name), name
            # tempo: the upper half of the genre's own range, never slower than the twin
            assert (lo + hi) / 2 - 1e-9 <= q.tempo <= hi and q.tempo >= p.tempo
            assert q.tempo - p.tempo == pytest.approx((hi - p.tempo) / 2)
            # production
            assert -6.0 - 1e-9 <= db(q.drum_level / p.drum_level) <= -3.0 + 1e-9
            assert 2.0 - 1e-9 <= db(q.bass_level / p.bass_level) <= 4.0 + 1e-9
            assert -4.0 - 1e-9 <= db(q.noise_level / p.noise_level) <= -2.0 + 1e-9
            assert -2.0 <= q.tilt <= -1.0
            assert q.chord_timbre == timbre_role[p.chord_timbre]
            assert q.bass_timbre == timbre_role[p.bass_timbre]
            assert 0.6 <= q.kick_decay / p.kick_decay <= 0.8
            assert 1.2 <= q.snare_decay / p.snare_decay <= 1.5
            assert 1.3 <= q.hat_decay / p.hat_decay <= 1.6


def test_tilt_has_the_slope_it_is_asked_for():
    from deepfusion.synth.dsp import _tilt

    noise = np.random.default_rng(0).standard_normal(4 * SR)
    tilted = _tilt(noise, sr=SR, db_per_octave=-1.5)
    power = np.abs(np.fft.rfft(tilted)) ** 2 / np.abs(np.fft.rfft(noise)) ** 2
    freqs = np.fft.rfftfreq(noise.size, 1.0 / SR)

    def level(f0: float) -> float:   # mean gain in dB over a third of an octave about f0
        band = (freqs >= f0 * 2 ** -(1 / 6)) & (freqs < f0 * 2 ** (1 / 6))
        return float(10 * np.log10(power[band].mean()))

    assert level(1000.0) == pytest.approx(0.0, abs=0.1)
    for f0 in (250.0, 500.0, 2000.0, 4000.0, 8000.0):
        assert level(f0) == pytest.approx(-1.5 * np.log2(f0 / 1000.0), abs=0.2), f0
    # flat below 100 Hz: 3.3 octaves below the pivot at most
    assert level(50.0) == pytest.approx(level(80.0), abs=0.2)
    assert level(50.0) == pytest.approx(-1.5 * np.log2(100.0 / 1000.0), abs=0.2)


def test_shifted_mix_is_darker():
    # the darker tilt and louder bass pull the mix's spectral centroid down; a swapped timbre
    # can brighten one clip, so the check is on the average of a few
    ratios = [spectral_centroid(render_clip(genre, seed=100, duration=2.0, domain="shifted"))
              / spectral_centroid(render_clip(genre, seed=100, duration=2.0))
              for genre in ("techno", "rock", "waltz", "reggae", "ambient", "bossa")]
    assert np.exp(np.mean(np.log(ratios))) < 0.7, np.round(ratios, 2)
    assert sum(r < 1 for r in ratios) >= 5, np.round(ratios, 2)


@pytest.mark.parametrize("genre,seed", [("techno", 0), ("reggae", 1), ("rock", 2)])
def test_shifted_clip_keeps_its_tempo(genre, seed):
    import librosa

    drawn = clip_params(genre, seed=seed, domain="shifted").tempo
    env = onset_envelope(render_clip(genre, seed=seed, duration=10.0, domain="shifted"))
    estimate = float(librosa.feature.tempo(onset_envelope=env, sr=SR, hop_length=HOP)[0])
    errors = [abs(estimate * octave / drawn - 1) for octave in (0.5, 1.0, 2.0)]
    assert min(errors) < 0.04, f"{genre}: estimated {estimate:.1f} BPM, drawn {drawn:.1f} BPM"


@pytest.mark.parametrize("genre,seed,mode", [("techno", 0, "minor"), ("rock", 0, "major")])
def test_shifted_clip_keeps_its_mode(genre, seed, mode):
    import librosa

    tonic = clip_params(genre, seed=seed, domain="shifted").tonic
    y = render_clip(genre, seed=seed, duration=8.0, domain="shifted")
    profile = np.roll(librosa.feature.chroma_stft(y=y, sr=SR).mean(axis=1), -tonic)
    r_major = np.corrcoef(profile, MAJOR_PROFILE)[0, 1]
    r_minor = np.corrcoef(profile, MINOR_PROFILE)[0, 1]
    assert (r_major > r_minor) == (mode == "major"), f"major {r_major:.2f}, minor {r_minor:.2f}"


@pytest.mark.parametrize("bad", ["loud", "Shifted", "", None, 1])
def test_unknown_domain_is_a_parameter_error(tmp_path, bad):
    message = f"got {re.escape(repr(bad))}$"
    with pytest.raises(ParameterError, match=message):
        render_clip("techno", seed=0, duration=0.1, domain=bad)
    with pytest.raises(ParameterError, match=message):
        clip_params("techno", seed=0, domain=bad)
    with pytest.raises(ParameterError, match=message):
        synthesize_dataset(tmp_path / "out", duration=0.1, domain=bad)
    assert not (tmp_path / "out").exists(), "nothing is written before arguments are checked"


def test_cli_synth_writes_the_shifted_domain(tmp_path):
    from deepfusion.testing import invoke

    args = ["synth", "--genres", "1", "--clips-per-genre", "1", "--duration", "0.3"]
    result = invoke(*args, "--out", tmp_path / "cli", "--domain", "shifted")
    assert result.exit_code == 0, result.output
    expected = synthesize_dataset(tmp_path / "api", genres=1, clips_per_genre=1, duration=0.3,
                                  domain="shifted")
    written = sorted(p for p in (tmp_path / "cli").rglob("*.wav"))
    assert [p.read_bytes() for p in written] == [p.read_bytes() for p in expected]
    refused = invoke(*args, "--out", tmp_path / "x", "--domain", "loud")
    assert refused.exit_code != 0 and not (tmp_path / "x").exists()
