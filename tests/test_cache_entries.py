"""The cache's one entry format and its validation (:mod:`deepfusion.io.cache`), function by
function: what reads as valid, missing or damaged (damaged, forged, of another shape or
format, not finite), what is counted, what is written and that a failed write leaves the entry
there was. The commands that repair damaged entries are tested in ``test_cache_repair.py``.

In-process and fast: ``benchmarks/mutation.py`` runs these against each mutant of the module.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from deepfusion.config import FeatureConfig
from deepfusion.errors import OutputError
from deepfusion.io.atomic import _WHERE
from deepfusion.io.cache import (DAMAGED, MISSING, VALID, CacheEntry, Entries, FeatureCache,
                                 OutputsCache, audio_digest, file_digest, file_stamp, stamp_or_none)

#: small views (44 frames) so that entries are a few kilobytes
CONFIG = FeatureConfig(duration=1.0, n_mels=8, n_mfcc=4, n_chroma=3, tempogram_win_length=5,
                       pretrained_view=None)
KEY = "ab" + "0" * 62
META = {"audio_sha": "c" * 32, "source_sr": 44100, "channels": 2, "source_seconds": 1.5}


def _npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def _meta(value) -> np.ndarray:
    return np.array(json.dumps(value))


def _features(dtype=np.float32, **shapes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(shapes.get(k, shape)).astype(dtype)
            for k, shape in CONFIG.feature_shapes().items()}


# ------------------------------------------------------------------------ digests and stamps

def test_a_file_digest_is_the_sha256_of_all_its_bytes(tmp_path):
    data = np.random.default_rng(1).bytes((1 << 20) + 5)        # more than one block read
    path = tmp_path / "a.wav"
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
    path.write_bytes(b"")
    assert file_digest(path) == hashlib.sha256(b"").hexdigest()


def test_a_file_is_hashed_a_bounded_block_at_a_time(tmp_path, monkeypatch):
    from deepfusion.io import cache

    path = tmp_path / "a.wav"
    path.write_bytes(bytes(3 << 20))
    asked = []

    class Counted(io.FileIO):
        def read(self, size=-1):
            asked.append(size)
            return super().read(size)

    monkeypatch.setattr(cache, "open", lambda p, mode: Counted(p, mode), raising=False)
    assert file_digest(path) == hashlib.sha256(bytes(3 << 20)).hexdigest()
    # a file of 20 GB is never read whole into memory
    assert asked and all(size is not None and 0 < size <= 16 << 20 for size in asked)


def test_a_file_stamp_moves_when_the_file_is_written(tmp_path):
    path = tmp_path / "a.wav"
    path.write_bytes(b"one")
    st = os.stat(path)
    assert file_stamp(path) == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    assert stamp_or_none(str(path)) == file_stamp(path)
    assert stamp_or_none(tmp_path / "gone.wav") is None
    with pytest.raises(FileNotFoundError):
        file_stamp(tmp_path / "gone.wav")


def test_the_audio_digest_is_of_the_samples_as_float32():
    y = np.linspace(-1, 1, 101)
    digest = audio_digest(y.astype(np.float32))
    assert digest == hashlib.sha256(y.astype(np.float32).tobytes()).hexdigest()[:32]
    assert audio_digest(y) == digest                           # float64 samples: the same audio
    stereo = np.stack([y, -y], axis=1)
    assert audio_digest(stereo[:, 0]) == digest                # not contiguous: the same
    assert audio_digest(y[:-1]) != digest


# --------------------------------------------------------------------------------- Entries

def _sound_if(flag: list):
    return lambda arrays, meta: flag[0]


def test_an_entry_written_reads_back_and_its_folder_is_made(tmp_path):
    entries = Entries(tmp_path / "root")
    assert entries.path(KEY) == tmp_path / "root" / "ab" / f"{KEY}.npz"
    arrays = {"x": np.arange(3, dtype=np.float32), "y": np.ones((2, 2))}
    entries.write(KEY, arrays, {"b": 1, "a": [1, 2]})
    entries.write("ab" + "1" * 62, arrays, {"b": 2, "a": []})    # one folder, two entries
    state, found, meta = entries.read(KEY, ("x", "y"), {"a", "b"}, lambda a, m: True)
    assert state == VALID and meta == {"b": 1, "a": [1, 2]}
    assert sorted(found) == ["x", "y"]
    for k in arrays:
        np.testing.assert_array_equal(found[k], arrays[k])
        assert found[k].dtype == arrays[k].dtype
    assert sorted(p.name for p in (tmp_path / "root" / "ab").iterdir()) == \
        sorted([f"{KEY}.npz", f"ab{'1' * 62}.npz"])               # no temporary file left
    assert entries.read("cd" + "0" * 62, ("x", "y"), set(), lambda a, m: True) == \
        (MISSING, None, None)


def test_a_failed_write_leaves_the_entry_there_was(tmp_path):
    entries = Entries(tmp_path)
    entries.write(KEY, {"x": np.zeros(2)}, {"n": 1})
    with pytest.raises(TypeError):
        entries.write(KEY, {"x": np.ones(2)}, {"n": object()})    # fails half-way: meta last
    state, found, meta = entries.read(KEY, ("x",), {"n"}, lambda a, m: True)
    assert state == VALID and meta == {"n": 1} and not found["x"].any()
    assert [p.name for p in (tmp_path / "ab").iterdir()] == [f"{KEY}.npz"]


def test_entries_that_are_not_sound_read_as_damaged(tmp_path):
    entries = Entries(tmp_path)
    path = entries.path(KEY)
    x, y = np.zeros(3), np.ones(2)
    meta = _meta({"n": 1, "more": 2})
    sound = [True]

    def read():
        return entries.read(KEY, ("x", "y"), {"n"}, _sound_if(sound))

    _npz(path, x=x, y=y, __meta__=meta)
    assert read()[0] == VALID
    sound[0] = False
    assert read() == (DAMAGED, None, None)                       # the caller's own check
    sound[0] = True
    nan, inf = x.copy(), y.copy()
    nan[1], inf[0] = np.nan, -np.inf
    forged = {
        "another array": dict(x=x, y=y, z=x, __meta__=meta),
        "an array missing": dict(x=x, __meta__=meta),
        "no meta": dict(x=x, y=y),
        "meta not JSON": dict(x=x, y=y, __meta__=np.array("{n: 1")),
        "meta not an object": dict(x=x, y=y, __meta__=_meta([["n", 1]])),
        "a meta key missing": dict(x=x, y=y, __meta__=_meta({"m": 1})),
        "not a number": dict(x=x, y=y, __meta__=_meta({"n": 1})) | {"x": nan},
        "not finite": dict(x=x, y=inf, __meta__=meta),
        "integers": dict(x=np.zeros(3, np.int64), y=y, __meta__=meta),
        "a pickle": dict(x=x, y=y, __meta__=np.array(json.dumps({"n": 1}), dtype=object)),
    }
    for what, arrays in forged.items():
        _npz(path, **arrays)
        assert read() == (DAMAGED, None, None), what
    for damage in (lambda b: b[: len(b) // 2], lambda b: bytes(len(b))):
        _npz(path, x=x, y=y, __meta__=meta)
        path.write_bytes(damage(path.read_bytes()))
        assert read() == (DAMAGED, None, None)
    _npz(path, x=np.arange(300.0), y=y, __meta__=meta)
    data = bytearray(path.read_bytes())
    data[len(data) // 4] ^= 0x55                                 # inside x: its CRC-32 sees it
    path.write_bytes(bytes(data))
    assert read() == (DAMAGED, None, None)


def test_an_entry_that_cannot_be_there_is_missing_not_damaged(tmp_path):
    entries = Entries(tmp_path)
    (tmp_path / "ab").write_text("a file where the entries' folder goes")
    assert entries.read(KEY, ("x",), set(), lambda a, m: True) == (MISSING, None, None)
    (tmp_path / "ab").unlink()
    (tmp_path / "ab").mkdir()
    entries.path(KEY).symlink_to(tmp_path / "nowhere.npz")       # a dangling link
    assert entries.read(KEY, ("x",), set(), lambda a, m: True) == (MISSING, None, None)


# ---------------------------------------------------------------------------- FeatureCache

def test_features_stored_load_back_as_float32_of_the_configs_views(tmp_path):
    cache = FeatureCache(tmp_path, CONFIG)
    assert cache.root == tmp_path / f"features-{CONFIG.fingerprint()}" and cache.config is CONFIG
    assert cache.check(KEY) == MISSING and cache.load(KEY) is None and not cache.has(KEY)
    features = _features(np.float64)
    cache.store(KEY, {**features, "extra": np.zeros(2)}, META)   # only the config's views
    assert cache.has(KEY) and cache.check(KEY) == VALID
    entry = cache.load(KEY)
    assert isinstance(entry, CacheEntry) and entry.meta == META
    assert list(entry.features) == list(CONFIG.keys)
    for k, a in entry.features.items():
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, features[k].astype(np.float32))


def test_features_of_other_shapes_types_or_metadata_read_as_damaged(tmp_path):
    cache = FeatureCache(tmp_path, CONFIG)
    path = cache.path(KEY)
    good = _features()
    cases = {
        "a view of other rows": (_features(mfcc=(5, 44)), META),
        "a view of other frames": (_features(chroma=(3, 43)), META),
        "float64 views": (_features(np.float64), META),
        "a float16 view": ({**good, "tempogram": good["tempogram"].astype(np.float16)}, META),
        "audio_sha not a string": (good, {**META, "audio_sha": 7}),
        "source_sr missing": (good, {k: v for k, v in META.items() if k != "source_sr"}),
        "channels missing": (good, {k: v for k, v in META.items() if k != "channels"}),
        "source_seconds missing": (good, {k: v for k, v in META.items() if k != "source_seconds"}),
    }
    for what, (features, meta) in cases.items():
        _npz(path, **features, __meta__=_meta(meta))
        assert cache.check(KEY) == DAMAGED, what
        assert cache.load(KEY) is None, what
    _npz(path, **good, __meta__=_meta(META))
    assert cache.check(KEY) == VALID and cache.load(KEY).meta == META


def test_prepare_makes_the_namespace_records_its_config_and_clears_dead_writers(tmp_path):
    cache = FeatureCache(tmp_path / "new" / "cache", CONFIG)
    cache.prepare()                              # the folders above it too
    assert cache.root.is_dir()
    dead = cache.root / "ab" / f".{KEY}.npz.{2**22 + 12345}.{_WHERE}.{'1' * 8}.tmp"
    dead.parent.mkdir()
    dead.write_bytes(b"half")
    live = cache.root / "ab" / f".{KEY}.npz.{os.getpid()}.{_WHERE}.{'1' * 8}.tmp"
    live.write_bytes(b"half")
    cache.prepare()
    config = cache.root / "config.json"
    # for humans: one setting a line, sorted
    assert config.read_text() == json.dumps(CONFIG.to_dict(), indent=2, sort_keys=True)
    assert not dead.exists() and live.exists()
    config.write_text("kept")                    # an existing record is not written again
    cache.prepare()
    assert config.read_text() == "kept"


def test_a_cache_folder_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    cache = FeatureCache(tmp_path / "file", CONFIG)
    with pytest.raises(OutputError) as info:
        cache.prepare()
    assert str(info.value) == (f"{cache.root}: cannot create the feature cache folder (Not a "
                               "directory); choose another --cache-dir")

    def refuse(self, *args, **kwargs):
        raise OSError("quota exceeded")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(OutputError) as info:
        FeatureCache(tmp_path / "c", CONFIG).prepare()
    assert str(info.value).endswith(": cannot create the feature cache folder (quota exceeded); "
                                    "choose another --cache-dir")


# ---------------------------------------------------------------------------- OutputsCache

SHAPES = (4, 5, 6)          # classes, embedding width, views


def _outputs(tmp_path, model="m1", shapes=SHAPES) -> OutputsCache:
    return OutputsCache(FeatureCache(tmp_path, CONFIG), model, shapes)


def _sums(n_classes=4, width=5, views=6):
    return np.linspace(0.1, 1, n_classes), np.full(views, 0.1), np.arange(width) / 3


def test_outputs_kept_come_back_as_float64_sums_and_frames(tmp_path):
    kept = _outputs(tmp_path)
    assert kept.root == FeatureCache(tmp_path, CONFIG).root / "outputs" / "m1"
    assert kept.get(KEY, 2) is None and kept.damaged == 0
    logits, attention, embedding = _sums()
    kept.put(KEY, 2, logits, attention.tolist(), embedding, np.int64(7))
    assert kept.path(f"{KEY}-2").is_file()
    got = kept.get(KEY, 2.0)
    assert len(got) == 4 and got[3] == 7 and type(got[3]) is int
    for a, b in zip(got, (logits, attention, embedding)):
        assert a.dtype == np.float64
        np.testing.assert_array_equal(a, b)
    assert kept.get(KEY, 3) is None and kept.damaged == 0        # other windows: another entry
    kept.put(KEY, 3, [1, 2, 3, 4], [0, 1, 0, 0, 0, 0], np.zeros(5, np.float32), 1)  # integers
    assert [a.tolist() for a in kept.get(KEY, 3)[:2]] == [[1, 2, 3, 4], [0, 1, 0, 0, 0, 0]]
    # width 0: any embedding width
    assert _outputs(tmp_path, shapes=(4, 0, 6)).get(KEY, 2)[2].shape == (5,)
    # another model's entries are its own
    assert _outputs(tmp_path, model="m2").get(KEY, 2) is None


def test_without_a_model_nothing_is_kept(tmp_path):
    kept = _outputs(tmp_path, model=None)
    assert kept.model is None
    kept.put(KEY, 2, *_sums(), 7)
    assert not list(tmp_path.rglob("*.npz"))
    _outputs(tmp_path, model="None").put(KEY, 2, *_sums(), 7)   # a model named None is kept
    assert kept.get(KEY, 2) is None and kept.damaged == 0


def test_outputs_damaged_or_of_the_old_format_are_counted(tmp_path):
    kept = _outputs(tmp_path)
    path = kept.path(f"{KEY}-2")
    logits, attention, embedding = _sums()
    frames = {"frames": 7}
    cases = {
        "the old format": dict(logits=logits, attention=attention, embedding=embedding,
                               frames=np.asarray(7)),
        "logits of another model": dict(logits=logits[:3], attention=attention,
                                        embedding=embedding, __meta__=_meta(frames)),
        "logits of two dimensions": dict(logits=logits[None], attention=attention,
                                         embedding=embedding, __meta__=_meta(frames)),
        "7 views": dict(logits=logits, attention=np.full(7, 0.1), embedding=embedding,
                        __meta__=_meta(frames)),
        "another width": dict(logits=logits, attention=attention, embedding=embedding[:4],
                              __meta__=_meta(frames)),
        "an embedding of two dimensions": dict(logits=logits, attention=attention,
                                               embedding=embedding[None],
                                               __meta__=_meta(frames)),
        "no frames": dict(logits=logits, attention=attention, embedding=embedding,
                          __meta__=_meta({"windows": 2})),
        "a logit not finite": dict(logits=np.r_[logits[:3], np.inf], attention=attention,
                                   embedding=embedding, __meta__=_meta(frames)),
    }
    for frames_value in (0, -3, 2**31, 7.0, True, "7", None, [7]):
        cases[f"frames {frames_value!r}"] = dict(
            logits=logits, attention=attention, embedding=embedding,
            __meta__=_meta({"frames": frames_value}))
    for n, (what, arrays) in enumerate(cases.items(), start=1):
        _npz(path, **arrays)
        assert kept.get(KEY, 2) is None, what
        assert kept.damaged == n, what
    # the one replaced reads as it was put; the bounds of frames are in
    for n, frames_value in enumerate((1, 2**31 - 1), start=1):
        kept.put(KEY, 2, logits, attention, embedding, frames_value)
        assert kept.get(KEY, 2)[3] == frames_value
    assert kept.damaged == len(cases)
    assert _outputs(tmp_path, shapes=(4, 0, 6)).damaged == 0


def test_outputs_that_cannot_be_written_cost_only_the_next_run(tmp_path):
    kept = _outputs(tmp_path)
    kept.root.parent.mkdir(parents=True)
    kept.root.write_text("a file where the model's folder goes")
    kept.put(KEY, 2, *_sums(), 7)                         # the folder cannot be made: OSError
    kept.root.unlink()
    kept.path(f"{KEY}-2").mkdir(parents=True)             # a folder where the entry goes
    kept.put(KEY, 2, *_sums(), 7)                         # the rename fails: OutputError
    assert kept.get(KEY, 2) is None and kept.damaged == 1
