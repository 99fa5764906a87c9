"""Damaged cache entries are noticed, computed again, replaced and counted, by every reader.

An entry of the per-clip feature cache or of the model-output cache is damaged in each way a
disk, a killed copy or another program can damage it (truncated, zeroed, bits flipped, other
arrays, other shapes, values that are not finite); every stage that reads the cache (extract
on joblib workers and on Dask, its up-to-date shortcut, predict, embed, tag) must then give
exactly a clean run's output, leave sound entries behind and say how many it repaired.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from deepfusion.config import FeatureConfig
from deepfusion.io.cache import DAMAGED, VALID, FeatureCache
from deepfusion.testing import TINY_FEATURES, assert_same_features, invoke


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55          # inside an array's data: the zip's CRC-32 sees it
    path.write_bytes(bytes(data))


def _other_arrays(path: Path) -> None:
    path.write_bytes(_npz_bytes(x=np.zeros(3, np.float32)))


def _other_shapes(path: Path) -> None:
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays = {k: (v[..., :-1] if v.ndim else v) for k, v in arrays.items()}
    path.write_bytes(_npz_bytes(**arrays))


def _not_finite(path: Path) -> None:
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    for k, v in arrays.items():
        if v.dtype.kind == "f" and v.size:
            v = v.copy()
            v.flat[0] = np.nan
            arrays[k] = v
            break
    path.write_bytes(_npz_bytes(**arrays))


DAMAGES = (_truncate, _zero, _flip, _other_arrays, _other_shapes, _not_finite)


def _entries(cache_dir: Path, config: FeatureConfig = TINY_FEATURES, *, outputs: bool = False,
             of: list[Path] | None = None) -> list[Path]:
    """The cache's entry files (``outputs``: the model-output cache's), or only those of the
    audio files ``of``."""
    from deepfusion.io.cache import file_digest

    root = FeatureCache(cache_dir, config).root
    found = sorted(p for p in root.rglob("*.npz") if ("outputs" in p.parts) == outputs)
    if of is not None:
        keys = {file_digest(p) for p in of}
        found = [p for p in found if p.stem.split("-")[0] in keys]
    assert found, f"no entries under {root}"
    return found


def _damage(entries: list[Path]) -> int:
    """Each kind of damage to its own entry, in turn; returns how many were damaged."""
    for damage, path in zip(DAMAGES, entries):
        damage(path)
    return min(len(DAMAGES), len(entries))


def _all_sound(cache_dir: Path, config: FeatureConfig = TINY_FEATURES, **which) -> None:
    cache = FeatureCache(cache_dir, config)
    for path in _entries(cache_dir, config, **which):
        assert cache.check(path.stem) == VALID, path


@pytest.fixture(scope="module")
def clean(tiny_audio, tmp_path_factory):
    """A clean cache and the outputs of every stage computed from it."""
    work = tmp_path_factory.mktemp("clean")
    long_dir = work / "long"
    long_dir.mkdir()
    import soundfile as sf

    clips = sorted(tiny_audio.rglob("*.wav"))
    y = np.concatenate([sf.read(clips[0], dtype="float32")[0], sf.read(clips[7], dtype="float32")[0]])
    sf.write(long_dir / "long.wav", y, 22050)          # two windows of the 6-s clips
    inputs = [clips[0], clips[7], clips[13], long_dir / "long.wav"]
    return {"work": work, "inputs": inputs}


def _run_all(tiny_audio, inputs, checkpoint: Path, cache: Path, out: Path, *jobs: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, args in {
        "extract": ("extract", "--audio-dir", tiny_audio, "--out", out / "features.pkl",
                    "--duration", "6", "--cache-dir", cache, "--quiet", *jobs),
        "predict": ("predict", *inputs, "--checkpoint", checkpoint, "--out", out / "p.csv",
                    "--cache-dir", cache, "--quiet", "--adapt", "none", *jobs),
        "embed": ("embed", *inputs, "--checkpoint", checkpoint, "--out", out / "e.npz",
                  "--cache-dir", cache, "--quiet", *jobs),
    }.items():
        result = invoke(*args)
        assert result.exit_code == 0, (name, result.output)
        results[name] = result
    return results


def _same(a: Path, b: Path) -> None:
    assert_same_features(a / "features.pkl", b / "features.pkl")
    assert (a / "p.csv").read_bytes() == (b / "p.csv").read_bytes()
    with np.load(a / "e.npz") as x, np.load(b / "e.npz") as y:
        assert sorted(x.files) == sorted(y.files)
        for k in x.files:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.slow
def test_every_reader_repairs_each_kind_of_damage(tiny_audio, trained_model_dir, clean):
    work, inputs = clean["work"], clean["inputs"]
    checkpoint = trained_model_dir / "best.pth"
    ref_cache, cache = work / "ref-cache", work / "cache"
    _run_all(tiny_audio, inputs, checkpoint, ref_cache, work / "ref", "--jobs", "1")
    shutil.copytree(ref_cache, cache)
    clips = sorted(tiny_audio.rglob("*.wav"))
    n = _damage(_entries(cache, of=clips))
    for path in _entries(cache, of=clips)[:n]:
        assert FeatureCache(cache, TINY_FEATURES).check(path.stem) == DAMAGED, path

    results = _run_all(tiny_audio, inputs, checkpoint, cache, work / "again", "--jobs", "1")
    _same(work / "ref", work / "again")
    assert f"({n} computed, {18 - n} from cache)" in results["extract"].stdout
    assert f"repaired {n} damaged cache entries" in results["extract"].stderr
    _all_sound(cache)

    # predict and embed alone: features of whole files and of later windows, damaged again
    for damage in DAMAGES:
        for path in _entries(cache, of=inputs):
            damage(path)
        for name in ("predict", "embed"):
            out = work / f"{damage.__name__}-{name}"
            args = {"predict": ("predict", *inputs, "--checkpoint", checkpoint, "--out", out / "p.csv",
                                "--adapt", "none"),
                    "embed": ("embed", *inputs, "--checkpoint", checkpoint, "--out", out / "e.npz")}[name]
            out.mkdir()
            result = invoke(*args, "--cache-dir", cache, "--quiet", "--jobs", "1")
            assert result.exit_code == 0, result.output
            assert "repaired" in result.stderr and "damaged cache entr" in result.stderr, result.stderr
            ref = work / "ref" / ("p.csv" if name == "predict" else "e.npz")
            got = out / ref.name
            if name == "predict":
                assert got.read_bytes() == ref.read_bytes(), damage.__name__
            else:
                with np.load(got) as x, np.load(ref) as y:
                    np.testing.assert_array_equal(x["embeddings"], y["embeddings"])
            _all_sound(cache, of=inputs)
            if name == "predict":     # embed must find damage of its own to repair
                for path in _entries(cache, of=inputs):
                    damage(path)


@pytest.mark.slow
def test_damaged_model_outputs_are_recomputed(tiny_audio, trained_model_dir, clean, tmp_path):
    inputs, checkpoint = clean["inputs"], trained_model_dir / "best.pth"
    cache = tmp_path / "cache"
    ref = tmp_path / "ref.csv"
    args = (*inputs, "--checkpoint", checkpoint, "--cache-dir", cache, "--quiet", "--jobs", "1",
            "--adapt", "none")
    assert invoke("predict", *args, "--out", ref).exit_code == 0
    kept = _entries(cache, outputs=True)
    assert len(kept) == len(inputs)
    for damage in DAMAGES:
        for path in kept:
            damage(path)
        out = tmp_path / f"{damage.__name__}.csv"
        result = invoke("predict", *args, "--out", out)
        assert result.exit_code == 0, result.output
        assert f"repaired {len(kept)} damaged cache entries" in result.stderr, (damage, result.stderr)
        assert out.read_bytes() == ref.read_bytes(), damage.__name__
        # the replaced entries are used as they are: the next run repairs nothing
        again = invoke("predict", *args, "--out", out)
        assert "repaired" not in again.stderr and again.exit_code == 0


def test_the_up_to_date_shortcut_looks_at_its_entries(tiny_audio, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "features.pkl"
    args = ("extract", "--audio-dir", tiny_audio, "--out", out, "--duration", "6",
            "--cache-dir", cache, "--quiet", "--jobs", "1")
    assert invoke(*args).exit_code == 0
    ref = tmp_path / "ref.pkl"
    shutil.copy(out, ref)
    assert "0 computed" in invoke(*args).output            # the shortcut: nothing read
    entries = _entries(cache)
    _truncate(entries[0])
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "(1 computed, 17 from cache)" in result.stdout, result.output
    assert "repaired 1 damaged cache entry (computed again" in result.stderr, result.output
    assert_same_features(out, ref)
    _all_sound(cache)
    # an entry removed since (a cache cleaned to save space) is no reason to run again
    entries[1].unlink()
    assert "0 computed" in invoke(*args).output


@pytest.mark.slow
def test_dask_workers_repair_damaged_entries(tiny_audio, tmp_path):
    pytest.importorskip("distributed")
    cache = tmp_path / "cache"
    base = ("extract", "--audio-dir", tiny_audio, "--duration", "6", "--cache-dir", cache, "--quiet")
    assert invoke(*base, "--out", tmp_path / "ref.pkl", "--jobs", "1").exit_code == 0
    n = _damage(_entries(cache))
    result = invoke(*base, "--out", tmp_path / "dask.pkl", "--scheduler", "local:2")
    assert result.exit_code == 0, result.output
    assert f"({n} computed, {18 - n} from cache)" in result.stdout, result.output
    assert f"repaired {n} damaged cache entries" in result.stderr, result.output
    assert_same_features(tmp_path / "ref.pkl", tmp_path / "dask.pkl")
    _all_sound(cache)


@pytest.mark.slow
def test_tag_repairs_damaged_entries(clean, tmp_path):
    files = clean["inputs"][:2]
    cache = tmp_path / "cache"
    args = ("tag", *files, "--json", "--cache-dir", cache, "--quiet", "--jobs", "1")
    ref = invoke(*args)
    assert ref.exit_code == 0, ref.output
    config = FeatureConfig(pretrained_view="MTT_musicnn", pretrained_stride=1)
    for damage in (_truncate, _other_shapes):
        for path in _entries(cache, config):
            damage(path)
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert "repaired 2 damaged cache entries" in result.stderr, result.stderr
        assert [json.loads(x) for x in result.stdout.splitlines()] == \
            [json.loads(x) for x in ref.stdout.splitlines()]
        _all_sound(cache, config)
