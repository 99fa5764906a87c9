"""The predict stage: windows, features identical to extract's, and the real command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from deepfusion.audio import window_starts
from deepfusion.testing import invoke
from deepfusion.views import FEATURE_KEYS

GENRES = {"rock", "techno", "waltz"}
SR = 22050
LINE = re.compile(r"^(?P<path>.+): (?P<top>\w+ \d\.\d{3}(, \w+ \d\.\d{3})*)$")




def parse_top(line: str) -> tuple[str, list[tuple[str, float]]]:
    m = LINE.match(line)
    assert m, line
    pairs = [item.split() for item in m["top"].split(", ")]
    return m["path"], [(g, float(p)) for g, p in pairs]


@pytest.mark.parametrize("n, size, min_tail, expected", [
    (50, 100, 10, [0]),                      # shorter than a window: one, padded later
    (100, 100, 10, [0]),                     # exactly one window
    (300, 100, 10, [0, 100, 200]),           # exact multiple: no extra window
    (320, 100, 30, [0, 100, 200]),           # remainder 20 < min_tail: dropped
    (350, 100, 30, [0, 100, 200, 250]),      # remainder 50 >= min_tail: end-aligned window
    (330, 100, 30, [0, 100, 200, 230]),      # remainder exactly min_tail: kept
    (101, 100, 0, [0, 1]),                   # min_tail 0 still needs one sample
])
def test_window_starts(n, size, min_tail, expected):
    starts = window_starts(n, size, min_tail)
    assert starts == expected
    assert all(0 <= s <= max(0, n - size) for s in starts)


@pytest.fixture(scope="module")
def clip(tiny_audio) -> Path:
    return tiny_audio / "rock" / "rock.00000.wav"


@pytest.fixture(scope="module")
def checkpoint(trained_model_dir) -> Path:
    return trained_model_dir / "best.pth"


def test_predict_prints_top3(clip, checkpoint):
    result = invoke("predict", clip, "--checkpoint", checkpoint)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    path, top = parse_top(lines[0])
    assert path == str(clip)
    assert len(top) == 3 and {g for g, _ in top} == GENRES
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True)
    # every genre's probability, each rounded to 3 decimals: they sum to 1
    assert sum(probs) == pytest.approx(1, abs=1.5e-3), probs


def test_predict_json_one_object_per_file(tiny_audio, checkpoint):
    files = [tiny_audio / "techno" / "techno.00001.wav", tiny_audio / "waltz" / "waltz.00002.wav"]
    result = invoke("predict", *files, "--checkpoint", checkpoint, "--json", "--top-k", "2")
    assert result.exit_code == 0, result.output
    objects = [json.loads(ln) for ln in result.stdout.splitlines()]
    assert [o["path"] for o in objects] == [str(f) for f in files]
    for o in objects:
        assert len(o["top"]) == 2
        probs = [t["probability"] for t in o["top"]]
        # the two largest of three probabilities that sum to 1: at least 2/3 together
        assert probs == sorted(probs, reverse=True) and 2 / 3 - 1e-6 <= sum(probs) <= 1 + 1e-6, probs
        assert {t["genre"] for t in o["top"]} <= GENRES
        assert o["windows"] == 1 and o["seconds"] == pytest.approx(6.0)
        assert o["segments"] >= 1


def test_predict_a_folder_lists_its_files(tiny_audio, checkpoint, tmp_path):
    import shutil

    for rel in ("waltz/waltz.00001.wav", "rock/rock.00002.wav"):
        (tmp_path / rel).parent.mkdir()
        shutil.copy(tiny_audio / rel, tmp_path / rel)
    result = invoke("predict", tmp_path, "--checkpoint", checkpoint, "--top-k", "1")
    assert result.exit_code == 0, result.output
    found = [parse_top(ln) for ln in result.stdout.splitlines()]
    assert [path for path, _ in found] == [str(tmp_path / "rock" / "rock.00002.wav"),
                                           str(tmp_path / "waltz" / "waltz.00001.wav")]
    assert all(len(top) == 1 for _, top in found)
    assert all(1 / 3 - 5e-4 <= top[0][1] <= 1 for _, top in found)    # the largest of three


@pytest.fixture(scope="module")
def odd_files(tiny_audio, tmp_path_factory) -> dict[str, Path]:
    """A stereo 44.1 kHz OGG, a 2-minute WAV and a corrupt 'WAV'."""
    import librosa
    import soundfile as sf

    work = tmp_path_factory.mktemp("odd")
    y, sr = sf.read(tiny_audio / "rock" / "rock.00000.wav", dtype="float32")
    y44 = librosa.resample(y, orig_sr=sr, target_sr=44100)
    t = np.arange(len(y44)) / 44100
    stereo = np.stack([y44, 0.9 * y44 + 0.01 * np.sin(2 * np.pi * 220 * t)], axis=1)
    sf.write(work / "stereo.ogg", stereo.astype(np.float32), 44100, format="OGG")
    clips = sorted(tiny_audio.rglob("*.wav"))
    long = np.concatenate([sf.read(p, dtype="float32")[0] for p in (clips + clips)[:20]])
    assert len(long) == 120 * SR
    sf.write(work / "long.wav", long, SR, subtype="PCM_16")
    (work / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4)
    return {"stereo": work / "stereo.ogg", "long": work / "long.wav", "corrupt": work / "corrupt.wav"}


@pytest.mark.slow
def test_predict_stereo_ogg_long_file_and_a_corrupt_one(odd_files, clip, checkpoint):
    import soundfile as sf

    info = sf.info(odd_files["stereo"])
    assert (info.channels, info.samplerate, info.format) == (2, 44100, "OGG")
    inputs = [odd_files["stereo"], odd_files["corrupt"], odd_files["long"], clip]
    result = invoke("predict", *inputs, "--checkpoint", checkpoint, "--json")
    assert result.exit_code == 0, result.output
    objects = {o["path"]: o for o in map(json.loads, result.stdout.splitlines())}
    assert set(objects) == {str(odd_files["stereo"]), str(odd_files["long"]), str(clip)}
    for o in objects.values():
        assert len(o["top"]) == 3
        assert sum(t["probability"] for t in o["top"]) == pytest.approx(1, abs=1e-5)
    stereo, long, short = (objects[str(p)] for p in (odd_files["stereo"], odd_files["long"], clip))
    assert stereo["windows"] == 1 and stereo["seconds"] == pytest.approx(6.0, abs=0.01)
    assert long["windows"] == 20 and long["seconds"] == pytest.approx(120.0)
    assert long["segments"] == 20 * short["segments"]
    # the OGG is the same music as the clip: the format must not move the answer much
    as_dict = lambda o: {t["genre"]: t["probability"] for t in o["top"]}  # noqa: E731
    stereo_p, short_p = as_dict(stereo), as_dict(short)
    for g in GENRES:
        assert stereo_p[g] == pytest.approx(short_p[g], abs=0.05), g
    skipped = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(skipped) == 1, result.stderr
    assert skipped[0].startswith(f"skipped {odd_files['corrupt']}: ")
    assert "Traceback" not in result.output


def test_predict_all_bad_inputs_fail(odd_files, tmp_path, checkpoint):
    result = invoke("predict", odd_files["corrupt"], tmp_path / "missing.wav", "--checkpoint", checkpoint)
    assert result.exit_code != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"skipped {odd_files['corrupt']}: ")
    assert lines[1] == f"skipped {tmp_path / 'missing.wav'}: file not found"
    assert lines[-1].startswith("Error:") and "Traceback" not in result.output


def test_predict_with_a_bad_checkpoint(clip, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_text("no\n")
    for path in (tmp_path / "missing.pth", junk):
        result = invoke("predict", clip, "--checkpoint", path)
        assert result.exit_code != 0
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:") and str(path) in lines[0], result.output


def test_predict_features_equal_extract_features(tiny_audio, tiny_features, tmp_path):
    """A window predict computes is extract's entry, bit for bit, under extract's key."""
    from deepfusion.io.cache import FeatureCache
    from deepfusion.io.features_file import read_features_file
    from deepfusion.jobs.windows import file_windows, load_window
    from deepfusion.testing import TINY_FEATURES

    items = {it["path"]: it for it in read_features_file(tiny_features)}
    cache = FeatureCache(tmp_path, TINY_FEATURES)
    for rel in ("rock/rock.00000.wav", "techno/techno.00003.wav"):
        key, windows, seconds, reason, computed, _ = file_windows(
            str(tiny_audio / rel), str(tmp_path), TINY_FEATURES.to_dict(), 60)
        assert reason is None and (windows, computed) == (1, 1)
        assert key == items[rel]["file_sha"]
        views = load_window(cache, key, 0)
        cached = items[rel]["features"]
        assert tuple(views) == TINY_FEATURES.keys and set(FEATURE_KEYS) < set(views)
        for k in views:
            assert views[k][0].dtype == cached[k].dtype, k
            assert np.array_equal(views[k][0], cached[k]), k
