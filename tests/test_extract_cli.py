"""The real ``deepfusion extract`` command on folders of generated audio.

Every clip is written here with numpy + soundfile, in every format and shape a dataset
throws at the command (8/16/24-bit and float WAV, 44.1/48 kHz, stereo and 6 channels, FLAC,
OGG, AU, MP3) next to every kind of bad input (corrupt, empty, text, a folder, NaN samples, too
short). Tests assert on exit codes, on the summary lines, on the features pickle (read with a
plain ``pickle.load``) and on ``extract_errors.csv``. Where a real process is needed (``kill
-9``, a C locale) the command runs as ``python -m deepfusion`` in a subprocess.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import soundfile as sf

from deepfusion.config import FeatureConfig
from deepfusion.testing import cli_command, invoke, subprocess_env
from deepfusion.views import FEATURE_KEYS

SR = 22050
DURATION = 3.0          # --duration of most runs: short clips keep the suite fast
CONFIG = FeatureConfig(duration=DURATION)
HAVE_MP3 = "MPEG_LAYER_III" in sf.available_subtypes("MP3")


# ----------------------------------------------------------------------------- helpers

def _clip(seed: int, *, seconds: float = DURATION, sr: int = SR, channels: int = 1) -> np.ndarray:
    """A deterministic clip, different for every seed: two harmonics, clicks and a little noise.

    Returns float32 ``(n,)`` for mono, ``(n, channels)`` otherwise (one seed per channel).
    """
    if channels > 1:
        return np.stack([_clip(seed * 100 + c, seconds=seconds, sr=sr) for c in range(channels)],
                        axis=1)
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    f0 = 110.0 * 2 ** (rng.integers(0, 24) / 12)
    y = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(2 * np.pi * 2 * f0 * t + rng.uniform(0, 6))
    period = int(sr * rng.uniform(0.3, 0.7))
    y[::period] += 0.8                                   # a beat for the tempogram
    y += 0.01 * rng.standard_normal(t.size)
    return (0.9 * y / np.abs(y).max()).astype(np.float32)


def _write(path: Path, y: np.ndarray, sr: int = SR, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), y, sr, **kwargs)
    return path


def _extract(audio: Path, out: Path, cache: Path, *extra: str, jobs: int = 2,
             duration: float = DURATION):
    """Run ``deepfusion extract`` in-process; a crash (not a clean exit) fails the test."""
    args = ["extract", "--audio-dir", str(audio), "--out", str(out), "--cache-dir", str(cache),
            "--jobs", str(jobs), "--quiet", "--duration", str(duration), *extra]
    result = invoke(*args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"extract crashed: {result.exception!r}\n{result.output}") \
            from result.exception
    assert "Traceback" not in result.output
    return result


def _summary(result) -> tuple[int, int, int]:
    """(clips, computed, from cache) from the summary line on stdout."""
    match = re.search(r"^(\d+) clips \((\d+) computed, (\d+) from cache\)", result.stdout, re.M)
    assert match, result.output
    return tuple(int(g) for g in match.groups())


def _skipped(stderr: str) -> list[tuple[str, str]]:
    """Every ``skipped <path>: <reason>`` line, in order."""
    out = []
    for line in stderr.splitlines():
        if line.startswith("skipped "):
            path, reason = line[len("skipped "):].split(": ", 1)
            out.append((path, reason))
    return out


def _errors_csv(out: Path) -> list[tuple[str, str]]:
    with open(out.with_name("extract_errors.csv"), newline="", encoding="utf-8",
              errors="surrogateescape") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["path", "reason"]
    return [tuple(r) for r in rows[1:]]


def _load(out: Path) -> list[dict]:
    with open(out, "rb") as fh:
        return pickle.load(fh)


def _check_item(item: dict, config: FeatureConfig = CONFIG) -> None:
    """The configured views (six, and the pretrained one by default), float32, of the
    configured shapes, all finite."""
    shapes = config.feature_shapes()
    assert tuple(item["features"]) == config.keys
    for key in config.keys:
        x = item["features"][key]
        assert isinstance(x, np.ndarray), key
        assert x.dtype == np.float32, (item["path"], key, x.dtype)
        assert x.shape == shapes[key], (item["path"], key, x.shape)
        assert np.isfinite(x).all(), (item["path"], key)


def _tmp_files(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob("*.tmp")]


# ----------------------------------------------------------------------------- 1. every input

#: The reason of a file libsndfile cannot decode: its format unknown, or libsndfile's words.
UNDECODABLE = (r"^cannot decode(: not an audio format libsndfile reads \(format not recognised\); "
               r"convert it to WAV or FLAC| \(.+\))$")
#: Bad inputs: relative path -> pattern its reason must match.
BAD = {
    "jazz/corrupt.wav": UNDECODABLE,
    "jazz/empty.wav": r"^empty file \(0 bytes\)$",
    "jazz/notes.wav": UNDECODABLE,
    "jazz/folder.wav": r"^is a folder, not an audio file$",
    "jazz/short.wav": r"^too short \(0\.50 s; --min-duration is 1 s\)$",
    "jazz/nan.wav": r"^contains NaN or infinite samples$",
    "jazz/header_only.wav": r"^no audio samples$",
    "jazz/bad_riff.wav": UNDECODABLE,
    "música/rota ñ.wav": UNDECODABLE,
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A dataset of good clips in every format next to every kind of bad file, extracted once.

    Returns a dict: ``base`` (the temporary folder), ``root``, ``out``, ``cache``, ``result``
    and ``good`` (relative path -> (source rate, channels)).
    """
    base = tmp_path_factory.mktemp("mixed")
    root = base / "audio"
    good: dict[str, tuple[int, int]] = {}

    def add(rel, seed, *, sr=SR, channels=1, seconds=DURATION, **kwargs):
        _write(root / rel, _clip(seed, sr=sr, channels=channels, seconds=seconds), sr, **kwargs)
        good[rel] = (sr, channels)

    add("rock/pcm16.wav", 1, subtype="PCM_16")
    add("rock/pcm24.wav", 2, subtype="PCM_24")
    add("rock/float32.wav", 3, subtype="FLOAT")
    add("rock/unsigned8.wav", 4, subtype="PCM_U8")
    add("rock/rate44100.wav", 5, sr=44100)
    add("rock/rate48000.wav", 6, sr=48000, subtype="PCM_24")
    add("rock/long.wav", 7, seconds=7.0)                       # trimmed to --duration
    add("jazz/stereo.wav", 8, channels=2, sr=44100)
    add("jazz/six.wav", 9, channels=6, sr=48000)
    add("jazz/clip.flac", 10)
    add("jazz/clip.ogg", 11, format="OGG", subtype="VORBIS")
    add("jazz/clip.au", 12, format="AU", subtype="PCM_16")
    if HAVE_MP3:
        add("jazz/clip.mp3", 13, sr=44100, format="MP3", subtype="MPEG_LAYER_III")
    _write(root / "jazz/silent.wav", np.zeros(int(DURATION * SR), np.float32))
    good["jazz/silent.wav"] = (SR, 1)
    add("música/canción ñ.wav", 14)
    add("blues/日本語 clip.wav", 15)

    rng = np.random.default_rng(1234)
    (root / "jazz/corrupt.wav").write_bytes(rng.bytes(20_000))
    (root / "jazz/empty.wav").write_bytes(b"")
    (root / "jazz/notes.wav").write_text("this is a text file, not a recording\n" * 50)
    (root / "jazz/folder.wav").mkdir()
    _write(root / "jazz/short.wav", _clip(16, seconds=0.5))
    nan = _clip(17)
    nan[1000] = np.nan
    _write(root / "jazz/nan.wav", nan, subtype="FLOAT")
    _write(root / "jazz/header_only.wav", np.zeros(0, np.float32))
    (root / "jazz/bad_riff.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(40)))
    (root / "música/rota ñ.wav").write_bytes(rng.bytes(5000))
    # not audio, or hidden: never looked at, never reported
    (root / "jazz/README.txt").write_text("notes")
    (root / "jazz/.DS_Store").write_bytes(rng.bytes(100))
    (root / "jazz/._clip.wav").write_bytes(rng.bytes(100))

    out, cache = base / "out" / "features.pkl", base / "cache"
    result = _extract(root, out, cache)
    return {"root": root, "out": out, "cache": cache, "result": result, "good": good,
            "base": base}


def test_mixed_exit_and_summary(mixed):
    result = mixed["result"]
    assert result.exit_code == 0, result.output
    n = len(mixed["good"])
    assert _summary(result) == (n, n, 0)
    # every file written named once, at the end, by absolute path
    written = [l for l in result.stdout.splitlines() if l.startswith("wrote ")]
    assert written == [f"wrote {Path(mixed['out']).absolute()}",
                       f"wrote {Path(mixed['out']).absolute().with_name('extract_errors.csv')}"]
    assert result.stdout.splitlines()[-2:] == written[-1:] + [
        f"cache {Path(mixed['cache']).absolute()}: {n} new entries"]
    expected_genres = {"blues": 1, "música": 1, "rock": 7, "jazz": 6 + HAVE_MP3}
    line = next(l for l in result.stdout.splitlines() if l.startswith("genres: "))
    assert line == "genres: " + ", ".join(f"{k} {v}" for k, v in sorted(expected_genres.items()))
    assert f"{len(BAD)} files skipped; reasons in " in result.stderr


def test_mixed_each_bad_file_reported_once(mixed):
    result = mixed["result"]
    skipped = _skipped(result.stderr)
    assert sorted(p for p, _ in skipped) == sorted(BAD)      # each exactly once, nothing else
    rows = _errors_csv(mixed["out"])
    assert [p for p, _ in rows] == sorted(BAD)
    assert dict(rows) == dict(skipped)                       # the same reasons in both places
    for path, reason in rows:
        assert re.match(BAD[path], reason), (path, reason)
    for ignored in ("README.txt", ".DS_Store", "._clip.wav"):
        assert ignored not in result.output


def test_mixed_good_files_in_pickle(mixed):
    items = _load(mixed["out"])
    paths = [it["path"] for it in items]
    assert paths == sorted(paths)
    assert set(paths) == set(mixed["good"])
    for it in items:
        assert it["label"] == PurePosixPath(it["path"]).parent.name   # parent folder = genre
        assert not Path(it["path"]).is_absolute()
        _check_item(it)
        sr, channels = mixed["good"][it["path"]]
        assert it["source_sr"] == sr, it["path"]
        assert it["channels"] == channels, it["path"]
    by_path = {it["path"]: it for it in items}
    assert by_path["rock/long.wav"]["source_seconds"] == pytest.approx(7.0)
    # silence is a clip like any other: finite everywhere (checked above), and flat
    silent = by_path["jazz/silent.wav"]["features"]
    assert np.ptp(silent["mel_spec_orig"]) == 0
    # every generated clip is different audio
    assert len({it["duplicate_group"] for it in items}) == len(items)


def test_mixed_strict_exits_1_and_reuses_cache(mixed):
    out = mixed["base"] / "strict" / "features.pkl"
    result = _extract(mixed["root"], out, mixed["cache"], "--strict")
    assert result.exit_code == 1, result.output
    n = len(mixed["good"])
    assert _summary(result) == (n, 0, n)
    assert len(_skipped(result.stderr)) == len(BAD)
    assert len(_load(out)) == n                              # strict still writes what it could


def test_no_readable_file_exits_nonzero(tmp_path):
    audio = tmp_path / "audio"
    (audio / "rock").mkdir(parents=True)
    (audio / "rock/empty.wav").write_bytes(b"")
    (audio / "rock/notes.wav").write_text("not audio")
    out = tmp_path / "out" / "features.pkl"
    result = _extract(audio, out, tmp_path / "cache")
    assert result.exit_code == 1, result.output
    assert ("Error: none of the 2 files under "
            f"{audio} could be used (reasons above and in extract_errors.csv); nothing written"
            ) in result.stderr
    assert "clips (" not in result.stdout
    assert sorted(p for p, _ in _skipped(result.stderr)) == ["rock/empty.wav", "rock/notes.wav"]
    assert not out.exists()
    assert [p for p, _ in _errors_csv(out)] == ["rock/empty.wav", "rock/notes.wav"]


@pytest.mark.parametrize("case", ["missing-folder", "empty-folder", "no-option", "a-file"])
def test_bad_audio_dir_is_a_usage_error(tmp_path, case):
    target = tmp_path / "audio"
    if case == "empty-folder":
        target.mkdir()
    elif case == "a-file":
        target.write_text("x")
    args = ["extract", "--out", str(tmp_path / "f.pkl"), "--cache-dir", str(tmp_path / "c")]
    if case != "no-option":
        args += ["--audio-dir", str(target)]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    expected = {"missing-folder": "does not exist", "empty-folder": "no audio files found",
                "no-option": "Missing option '--audio-dir'", "a-file": "is a file"}[case]
    assert expected in result.stderr
    if case == "empty-folder":                       # deepfusion's own error: one line
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "f.pkl").exists() and not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- 2. decoding

def test_multichannel_is_channel_mean_and_rate_does_not_change_shape(tmp_path):
    audio = tmp_path / "audio"
    for ch in (2, 6):
        y = _clip(30 + ch, channels=ch)                                  # (n, ch)
        _write(audio / f"g/ch{ch}.wav", y, subtype="FLOAT")
        _write(audio / f"g/ch{ch}_mean.wav", y.mean(axis=1, dtype=np.float32), subtype="FLOAT")
        _write(audio / f"g/ch{ch}_first.wav", y[:, 0], subtype="FLOAT")
    t = np.arange(int(DURATION * 44100)) / 44100
    _write(audio / "g/a440_44100.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
           44100, subtype="FLOAT")
    t = np.arange(int(DURATION * SR)) / SR
    _write(audio / "g/a440_22050.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
           SR, subtype="FLOAT")
    out = tmp_path / "features.pkl"
    # a fixed tuning keeps chroma a continuous function of the samples (no per-clip estimate)
    result = _extract(audio, out, tmp_path / "cache", "--chroma-tuning", "0")
    assert result.exit_code == 0, result.output
    items = {it["path"]: it for it in _load(out)}
    for it in items.values():
        _check_item(it)
    for ch in (2, 6):
        multi = items[f"g/ch{ch}.wav"]
        assert multi["channels"] == ch
        for key in FEATURE_KEYS:
            np.testing.assert_allclose(multi["features"][key],
                                       items[f"g/ch{ch}_mean.wav"]["features"][key],
                                       rtol=0, atol=1e-3, err_msg=key)
        first = items[f"g/ch{ch}_first.wav"]["features"]["mel_spec_orig"]
        assert np.abs(multi["features"]["mel_spec_orig"] - first).max() > 1.0  # not channel 0
    hi, lo = items["g/a440_44100.wav"], items["g/a440_22050.wav"]
    assert hi["source_sr"] == 44100 and lo["source_sr"] == SR
    for key in FEATURE_KEYS:
        assert hi["features"][key].shape == lo["features"][key].shape == CONFIG.feature_shapes()[key]
    # the resampled tone is the same tone: chroma peaks on A, spectra agree
    for it in (hi, lo):
        assert it["features"]["chroma"].mean(axis=1).argmax() == 9
    assert np.abs(hi["features"]["mel_spec_orig"] - lo["features"]["mel_spec_orig"]).mean() < 0.5


# ----------------------------------------------------------------------------- 3. cache

def test_cache_reuse_new_file_config_change_and_rename(tmp_path):
    audio, cache, out = tmp_path / "audio", tmp_path / "cache", tmp_path / "out" / "f.pkl"
    duration = 3.0
    for i, rel in enumerate(["rock/a.wav", "rock/b.wav", "jazz/c.wav", "jazz/d.wav"]):
        _write(audio / rel, _clip(40 + i, seconds=duration))

    def run(*extra):
        result = _extract(audio, out, cache, *extra, jobs=1, duration=duration)
        assert result.exit_code == 0, result.output
        return result

    first = run()
    assert _summary(first) == (4, 4, 0)
    items_first = _load(out)

    second = run()   # the speed-up itself is measured by benchmarks/extract_speed.py
    assert _summary(second) == (4, 0, 4)
    items_second = _load(out)
    assert [it["path"] for it in items_second] == [it["path"] for it in items_first]
    for a, b in zip(items_first, items_second):
        for key in FEATURE_KEYS:
            assert np.array_equal(a["features"][key], b["features"][key])

    _write(audio / "jazz/e.wav", _clip(50, seconds=duration))
    added = run()
    assert _summary(added) == (5, 1, 4)

    mels = run("--n-mels", "64")
    assert _summary(mels) == (5, 5, 0)
    config64 = FeatureConfig(duration=duration, n_mels=64)
    for it in _load(out):
        _check_item(it, config64)
        assert it["features"]["mel_spec_orig"].shape[0] == 64

    # back to the default config: its entries are still there, keyed by content, not path
    features_a = next(it for it in items_first if it["path"] == "rock/a.wav")["features"]
    (audio / "rock/a.wav").rename(audio / "rock/renamed a.wav")
    (audio / "pop").mkdir()
    shutil.copyfile(audio / "jazz/c.wav", audio / "pop/copy of c.wav")
    moved = run()
    assert _summary(moved) == (6, 0, 6)
    items = {it["path"]: it for it in _load(out)}
    assert set(items) == {"rock/renamed a.wav", "rock/b.wav", "jazz/c.wav", "jazz/d.wav",
                          "jazz/e.wav", "pop/copy of c.wav"}
    assert items["pop/copy of c.wav"]["label"] == "pop"
    for key in FEATURE_KEYS:
        assert np.array_equal(items["rock/renamed a.wav"]["features"][key], features_a[key])
        assert np.array_equal(items["pop/copy of c.wav"]["features"][key],
                              items["jazz/c.wav"]["features"][key])

    # a damaged entry is computed again (and counted as computed), never loaded half
    namespace = cache / f"features-{FeatureConfig(duration=duration).fingerprint()}"
    entry = next(namespace.rglob(f"{items['rock/b.wav']['file_sha']}.npz"))
    entry.write_bytes(entry.read_bytes()[:100])
    out.unlink()
    repaired = run()
    assert _summary(repaired) == (6, 1, 5)
    again = {it["path"]: it for it in _load(out)}
    for key in FEATURE_KEYS:
        assert np.array_equal(again["rock/b.wav"]["features"][key],
                              items["rock/b.wav"]["features"][key])


# ----------------------------------------------------------------------------- 4. duplicates

def test_identical_audio_is_grouped(tmp_path):
    audio = tmp_path / "audio"
    a = _clip(60)
    _write(audio / "rock/a.wav", a, subtype="PCM_16")
    _write(audio / "rock/b.wav", _clip(61))
    _write(audio / "pop/c.wav", _clip(62))
    _write(audio / "pop/silence.wav", np.zeros(int(DURATION * SR), np.float32))
    (audio / "jazz").mkdir()
    shutil.copyfile(audio / "rock/a.wav", audio / "jazz/a.wav")               # byte-identical
    out = tmp_path / "features.pkl"
    result = _extract(audio, out, tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert _summary(result) == (5, 4, 1)                      # identical bytes computed once
    assert "1 group of identical audio (2 clips)" in result.stdout
    assert "  jazz/a.wav = rock/a.wav" in result.stdout.splitlines()
    items = {it["path"]: it for it in _load(out)}
    assert items["jazz/a.wav"]["duplicate_group"] == items["rock/a.wav"]["duplicate_group"]
    assert items["jazz/a.wav"]["file_sha"] == items["rock/a.wav"]["file_sha"]
    assert items["jazz/a.wav"]["label"] == "jazz" and items["rock/a.wav"]["label"] == "rock"
    others = [items[p]["duplicate_group"] for p in ("rock/b.wav", "pop/c.wav", "pop/silence.wav")]
    assert len(set(others)) == 3
    assert items["rock/a.wav"]["duplicate_group"] not in others


def test_same_audio_in_another_format_is_grouped(tmp_path):
    audio = tmp_path / "audio"
    y = np.round(_clip(63) * 32767).astype(np.int16)   # integers: both files hold exactly these
    _write(audio / "rock/a.wav", y, subtype="PCM_16")
    _write(audio / "blues/a.flac", y, subtype="PCM_16")          # lossless: the same samples
    _write(audio / "rock/b.wav", _clip(64))
    out = tmp_path / "features.pkl"
    result = _extract(audio, out, tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert _summary(result) == (3, 3, 0)                      # different bytes: computed twice
    assert "  blues/a.flac = rock/a.wav" in result.stdout.splitlines()
    items = {it["path"]: it for it in _load(out)}
    assert items["blues/a.flac"]["duplicate_group"] == items["rock/a.wav"]["duplicate_group"]
    assert items["rock/b.wav"]["duplicate_group"] != items["rock/a.wav"]["duplicate_group"]


# ----------------------------------------------------------------------------- 5. manifest

def _manifest(path: Path, rows: list[tuple[str, str]], header=("path", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("header", [("path", "label"), ("path", "genre")])
def test_manifest_selects_and_labels(tmp_path, header):
    audio = tmp_path / "audio"
    _write(audio / "clips/one.wav", _clip(70))
    _write(audio / "clips/two.flac", _clip(71))
    _write(audio / "clips/tres ñ.wav", _clip(72))
    _write(audio / "other/not listed.wav", _clip(73))
    manifest = _manifest(tmp_path / "list.csv", [
        ("clips/one.wav", "rock"), ("clips/two.flac", "jazz"), ("./clips/tres ñ.wav", "rock"),
        ("clips/missing.wav", "rock")], header)
    out = tmp_path / "features.pkl"
    result = _extract(audio, out, tmp_path / "cache", "--manifest", str(manifest))
    assert result.exit_code == 0, result.output
    assert _skipped(result.stderr) == [("clips/missing.wav", "file not found")]
    items = _load(out)
    assert [(it["path"], it["label"]) for it in items] == [
        ("clips/one.wav", "rock"), ("clips/tres ñ.wav", "rock"), ("clips/two.flac", "jazz")]
    for it in items:
        _check_item(it)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "clips/../../outside.wav"])
def test_manifest_path_outside_root_is_refused(tmp_path, bad):
    audio = tmp_path / "audio"
    _write(audio / "clips/one.wav", _clip(74))
    manifest = _manifest(tmp_path / "list.csv", [("clips/one.wav", "rock"), (bad, "rock")])
    out, cache = tmp_path / "out" / "features.pkl", tmp_path / "cache"
    result = _extract(audio, out, cache, "--manifest", str(manifest))
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and "line 3" in lines[0] and repr(bad) in lines[0]
    assert "leaves the dataset root" in lines[0]
    assert result.stdout == ""
    assert not out.exists() and not cache.exists()


def test_manifest_without_label_column(tmp_path):
    audio = tmp_path / "audio"
    _write(audio / "clips/one.wav", _clip(75))
    manifest = _manifest(tmp_path / "list.csv", [("clips/one.wav", "rock")], ("file", "label"))
    result = _extract(audio, tmp_path / "f.pkl", tmp_path / "cache", "--manifest", str(manifest))
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "needs a header with 'path' and 'label'" in result.stderr


# ----------------------------------------------------------------------------- 6. crash safety

@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs kill -9")
def test_kill_9_then_rerun_equals_uninterrupted_run(tmp_path):
    audio = tmp_path / "audio"
    for i in range(12):
        _write(audio / ("rock", "jazz", "pop")[i % 3] / f"clip{i:02d}.wav", _clip(80 + i, seconds=4))
    duration = "20"         # clips padded to 20 s: each takes long enough to kill in between
    cache, out = tmp_path / "cache", tmp_path / "out" / "features.pkl"
    cmd = cli_command("extract", "--audio-dir", str(audio), "--out", str(out), "--cache-dir",
               str(cache), "--jobs", "1", "--quiet", "--duration", duration)

    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(cache.rglob("*.npz"))) < 3:
            assert proc.poll() is None, "extract ended before it could be killed:\n" + \
                proc.stderr.read().decode(errors="replace")
            assert time.monotonic() < deadline, "no cache entries appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    done = len(list(cache.rglob("*.npz")))
    assert 3 <= done < 12

    # leftovers as a kill in mid-write leaves them: a dead writer's temporaries go, a live
    # writer's (this test process) stay
    namespace = next(cache.glob("features-*"))
    dead = [namespace / "ab" / f".ab{'0' * 62}.npz.{proc.pid}.deadbeef.tmp",
            out.parent / f".{out.name}.{proc.pid}.0badf00d.tmp"]
    live = namespace / "cd" / f".cd{'0' * 62}.npz.{os.getpid()}.12345678.tmp"
    for path in dead + [live]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half an entry")

    rerun = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert re.search(rf"^12 clips \({12 - done} computed, {done} from cache\)", rerun.stdout, re.M), \
        rerun.stdout
    assert live.exists()
    live.unlink()
    assert _tmp_files(cache, out.parent) == []

    ref_out = tmp_path / "ref" / "features.pkl"
    ref = _extract(audio, ref_out, tmp_path / "ref-cache", jobs=2, duration=float(duration))
    assert ref.exit_code == 0, ref.output
    resumed, reference = _load(out), _load(ref_out)
    assert [(it["path"], it["label"]) for it in resumed] == \
        [(it["path"], it["label"]) for it in reference]
    assert len(resumed) == 12
    for a, b in zip(resumed, reference):
        for key in FEATURE_KEYS:
            assert a["features"][key].dtype == b["features"][key].dtype == np.float32
            assert np.array_equal(a["features"][key], b["features"][key]), (a["path"], key)
        for meta in ("audio_sha", "file_sha", "source_sr", "channels", "duplicate_group"):
            assert a[meta] == b[meta], (a["path"], meta)
    assert _tmp_files(tmp_path / "ref-cache", ref_out.parent) == []


# ----------------------------------------------------------------------------- 7. outputs

def _small_dataset(root: Path) -> Path:
    _write(root / "rock/a.wav", _clip(90))
    return root


def test_read_only_output_folder_fails_before_work(tmp_path):
    audio = _small_dataset(tmp_path / "audio")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("chmod does not stop this user from writing (root?)")
        cache = tmp_path / "cache"
        result = _extract(audio, locked / "features.pkl", cache)
        assert result.exit_code != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
        assert str(locked / "features.pkl") in lines[0] and "cannot write" in lines[0]
        assert not cache.exists()                                   # no work was done
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("blocked", ["out", "cache"])
def test_output_or_cache_path_blocked_by_a_file(tmp_path, blocked):
    """A file where a folder must go: the same one-line error, also for root."""
    audio = _small_dataset(tmp_path / "audio")
    (tmp_path / "file").write_text("in the way")
    out = tmp_path / ("file" if blocked == "out" else "out") / "features.pkl"
    cache = tmp_path / ("file" if blocked == "cache" else "cache") / "cache"
    result = _extract(audio, out, cache)
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert str(tmp_path / "file") in lines[0]
    assert not (tmp_path / "out" / "features.pkl").exists()
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- file names

@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX locale and byte file names")
def test_non_ascii_names_under_c_locale(tmp_path):
    """No UTF-8 locale: names still decode, and the reports are still UTF-8."""
    audio = tmp_path / "audio"
    _write(audio / "música/canción.wav", _clip(91))
    (audio / "música/rota ñ.wav").write_bytes(np.random.default_rng(5).bytes(3000))
    out = tmp_path / "out" / "features.pkl"
    env = subprocess_env(LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    proc = subprocess.run(cli_command("extract", "--audio-dir", str(audio), "--out", str(out),
                               "--cache-dir", str(tmp_path / "cache"), "--jobs", "1",
                               "--quiet", "--duration", str(DURATION)),
                          env=env, capture_output=True, timeout=300)
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    items = _load(out)
    assert [os.fsencode(it["path"]) for it in items] == ["música/canción.wav".encode()]
    rows = _errors_csv(out)
    assert len(rows) == 1 and rows[0][0] == "música/rota ñ.wav"
    assert re.match(UNDECODABLE, rows[0][1]), rows[0][1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="byte file names")
def test_file_names_that_are_not_utf8(tmp_path):
    audio = tmp_path / "audio"
    genre = audio / "latin"
    genre.mkdir(parents=True)
    good = os.path.join(os.fsencode(genre), b"caf\xe9.wav")
    bad = os.path.join(os.fsencode(genre), b"mal\xe9.wav")
    wav = io.BytesIO()
    sf.write(wav, _clip(92), SR, format="WAV")
    try:
        with open(good, "wb") as fh:
            fh.write(wav.getvalue())
        with open(bad, "wb") as fh:
            fh.write(b"not audio at all" * 100)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    out = tmp_path / "features.pkl"
    result = _extract(audio, out, tmp_path / "cache")
    assert result.exit_code == 0, result.output
    items = _load(out)
    assert [os.fsencode(it["path"]) for it in items] == [b"latin/caf\xe9.wav"]
    _check_item(items[0])
    rows = _errors_csv(out)           # the report is valid UTF-8: the odd byte as an escape
    out.with_name("extract_errors.csv").read_bytes().decode("utf-8")
    assert [p for p, _ in rows] == ["latin/mal\\xe9.wav"]
