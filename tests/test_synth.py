"""The synthetic genre generator: files, determinism, valid audio, and genres that really differ."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from deepfusion.errors import OutputError, ParameterError
from deepfusion.synth import (GENRES, RECIPES, GenreRecipe, clip_params, clip_seed,
                              render_clip, synthesize_dataset)

SR = 22050
HOP = 256

# Krumhansl-Kessler key profiles, tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def onset_envelope(y: np.ndarray) -> np.ndarray:
    """librosa's onset strength at a hop of HOP samples (finer tempo resolution than 512)."""
    import librosa

    return librosa.onset.onset_strength(y=y, sr=SR, hop_length=HOP)


def test_every_genre_has_a_recipe():
    assert 1 <= len(GENRES) <= 10
    assert GENRES == tuple(RECIPES)
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
    path = tmp_path / GENRES[1] / f"{GENRES[1]}.00001.wav"
    assert path in paths
    expected = render_clip(GENRES[1], seed=clip_seed(3, 1, 1), duration=0.5)
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


@pytest.mark.parametrize("kwargs,bad", [
    ({"genres": 0}, "0"),
    ({"genres": len(GENRES) + 1}, str(len(GENRES) + 1)),
    ({"clips_per_genre": 0}, "0"),
    ({"duration": 0.0}, "0.0"),
    ({"duration": -2.5}, "-2.5"),
    ({"sr": 0}, "0"),
    ({"sr": -22050}, "-22050"),
    ({"seed": -1}, "-1"),
])
def test_dataset_rejects_bad_arguments(tmp_path, kwargs, bad):
    with pytest.raises(ParameterError, match=f"got {re.escape(bad)}$") as caught:
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
