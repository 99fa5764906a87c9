"""The restricted unpickler (``deepfusion.io.unpickle``): security code with its own threat model.

A features pickle may come from anyone. The loader must read everything a features file
legitimately holds, in every pickle protocol, and refuse (one clear error, never a crash)
anything that would run code, hand numpy a state it trusts blindly, or allocate more than the
file holds, or work more than in proportion to its size (shared, deep or colliding structures:
every file under 1 MB is loaded or refused within 2 s and 300 MB). The commands' handling of
malicious files (train, evaluate, predict, resume) is tested through the real commands in
``tests/test_hardening.py``; of costly ones, here.
"""

from __future__ import annotations

import json
import lzma
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deepfusion.config import FEATURE_KEYS
from deepfusion.errors import FeaturesFileError
from deepfusion.io.unpickle import safe_pickle_load
from deepfusion.testing import damage, invoke, one_error_line, subprocess_env


def _reduce(rv):
    """An object that pickles as exactly ``rv`` (a callable, its arguments, a state)."""
    class Raw:
        def __reduce__(self):
            return rv
    return Raw()


def test_hostile_numpy_state_is_refused_not_a_segfault(tmp_path):
    """numpy trusts the state a pickle hands ``dtype.__setstate__``: a 6-field dtype state
    crashes the plain (and the formerly restricted) unpickler with SIGSEGV. It names only
    allowed globals, so refusing it needs the states to be checked, in a process of its own here
    so that a regression cannot take pytest down with it."""
    _reconstruct = np.zeros(1).__reduce__()[0]   # numpy.(_)core.multiarray._reconstruct

    dtype = _reduce((np.dtype, ("f4", False, True), (3, "<", None, "ab", -1, 0)))
    array = _reduce((_reconstruct, (np.ndarray, (0,), b"b"), (1, (3, 4), dtype, False, bytes(48))))
    hostile = {
        "dtype-state": [{"features": {"mfcc": array}, "label": "rock"}],
        "short-data": [_reduce((_reconstruct, (np.ndarray, (0,), b"b"),
                                (1, (10**6,), np.dtype("f4"), False, bytes(4))))],
        "object-array": [np.array([1, "x"], dtype=object)],
        "huge-length": b"\x80\x05\x96" + (2**40).to_bytes(8, "little") + b".",
        "list-of-range": b"\x80\x02c__builtin__\nlist\nc__builtin__\nxrange\nJ\x00\xca\x9a;\x85R\x85R.",
    }
    for name, obj in hostile.items():
        data = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2)
        (tmp_path / f"{name}.pkl").write_bytes(data)
    good = [{"features": {k: np.random.default_rng(i).random((4, 5), np.float32) for k in FEATURE_KEYS},
             "label": "rock", "path": f"rock/{i}.wav", "source_sr": 22050} for i in range(3)]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / f"good{protocol}.bin").write_bytes(pickle.dumps(good, protocol=protocol))
    script = f"""
import random
from pathlib import Path
from deepfusion.io.unpickle import safe_pickle_load
from deepfusion.errors import FeaturesFileError

def outcome(path):
    try:
        safe_pickle_load(path)
        return "loaded"
    except FeaturesFileError as exc:
        return "refused" if "refused" in str(exc) else "unreadable"

folder = Path({str(tmp_path)!r})
for name in {sorted(hostile)!r}:
    print(name, outcome(folder / (name + ".pkl")))
rng = random.Random(0)                     # and 300 random mutations of a good features file
blobs = [path.read_bytes() for path in sorted(folder.glob("good*.bin"))]
for i in range(300):
    data = bytearray(rng.choice(blobs))
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(1, len(data))
        if rng.random() < 0.7:
            data[pos] = rng.randrange(256)
        else:
            del data[pos:]
    (folder / "fuzz.pkl").write_bytes(bytes(data))
    outcome(folder / "fuzz.pkl")
print("fuzz done")
"""
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"loader died with {proc.returncode}:\n{proc.stderr[-2000:]}"
    outcome = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert outcome.pop("fuzz") == "done"
    assert outcome == {"dtype-state": "refused", "short-data": "refused", "object-array": "refused",
                       "huge-length": "unreadable", "list-of-range": "refused"}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_safe_loader_reads_what_pickle_writes(tmp_path, protocol):
    """Every container, scalar and array kind a features file may hold, in every protocol."""
    import collections

    rng = np.random.default_rng(protocol)
    data = [{"features": {"c": rng.random((3, 4), np.float32),
                          "f": np.asfortranarray(rng.random((3, 4))),
                          "big-endian": np.arange(6, dtype=">i4")[::2],
                          "empty": np.zeros((0, 3), np.float32),
                          "text": np.array(["ab", "cé"]), "bytes": np.array([b"x"]),
                          "bool": np.array([True, False]),
                          "complex": np.array([1 + 2j], np.complex64)},
             "label": "rock", "label_id": np.int64(3), "seconds": np.float32(1.5),
             "name": np.str_("hé"),
             "pair": (1, 2.5), "tags": {"a", "b"}, "frozen": frozenset([3]), "raw": b"\x00\xff",
             "buffer": bytearray(b"ab"), "z": complex(1, 2), "ordered": collections.OrderedDict(a=1),
             "none": None, "huge": 2**100, "window": slice(1, 2)}]
    blob = pickle.dumps(data, protocol=protocol)
    (tmp_path / "ok.pkl").write_bytes(blob)
    got, want = safe_pickle_load(tmp_path / "ok.pkl")[0], pickle.loads(blob)[0]
    for key, value in want.items():
        if key == "features":
            for name, array in value.items():
                assert got[key][name].dtype == array.dtype and got[key][name].shape == array.shape
                assert np.array_equal(got[key][name], array), name
        else:
            assert got[key] == value and type(got[key]) is type(value), key


@pytest.mark.parametrize("payload", [damage.RunsShell, damage.RunsPython])
def test_code_in_a_pickle_is_refused_before_it_runs(tmp_path, payload):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pkl"
    protocol = 2 if payload is damage.RunsPython else 5
    path.write_bytes(pickle.dumps([{"features": payload(marker), "label": "rock"}], protocol=protocol))
    with pytest.raises(FeaturesFileError, match="unsafe pickle, refused"):
        safe_pickle_load(path)
    assert not marker.exists()


def test_missing_and_folder_inputs_are_named(tmp_path):
    with pytest.raises(FeaturesFileError, match="features file not found"):
        safe_pickle_load(tmp_path / "absent.pkl")
    with pytest.raises(FeaturesFileError, match="a folder, not a features file"):
        safe_pickle_load(tmp_path)


# ------------------------------------------------------------------ the cost of loading (issue 21)
#
# A few bytes can name one object many times (the memo), so a loader bounded only by allocations
# can still work for minutes: every file below is under 1 MB and must be refused (or loaded)
# within LOAD_SECONDS and LOAD_MB, in a process of its own so that a regression is measured,
# not suffered. The fuzzer (benchmarks/fuzz_unpickle.py) keeps what it finds in FIXTURES.

FIXTURES = Path(__file__).parent / "data" / "unpickle"
LOAD_SECONDS, LOAD_MB = 2.0, 300
P61 = (1 << 61) - 1          # ints k * P61 all have one hash


def _get(i: int) -> bytes:
    return b"h" + bytes([i])


def _long1(value: int) -> bytes:
    body = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(body)]) + body


def shared_lists_str(depth: int = 27) -> bytes:
    """``str(a[d])`` with ``a[0] = []``, ``a[k] = [a[k-1], a[k-1]]``: 271 bytes, and the
    string would be 800 M characters (29 s and 1.2 GB before the meter)."""
    body = b"".join(b"(" + _get(i) + _get(i) + b"lq" + bytes([i + 1]) + b"0" for i in range(depth))
    return b"\x80\x02c__builtin__\nstr\n]q\x000" + body + _get(depth) + b"\x85R."


def shared_tuple_key(depth: int = 31) -> bytes:
    """``{t[d]: None}`` with ``t[k] = (t[k-1], t[k-1])``: hashing walks 2**31 paths (14 s)."""
    body = b"".join(_get(i) + _get(i) + b"\x86q" + bytes([i + 1]) + b"0" for i in range(1, depth + 1))
    return b"\x80\x02}q\x00)q\x010" + body + _get(depth + 1) + b"Ns."


def _binbytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


COSTLY = {   # name: (pickle, what the refusal says)
    "str-of-shared-lists": (shared_lists_str(), "expands to"),
    "shared-tuple-as-key": (shared_tuple_key(), "expands to"),
    "frozenset-of-shared-tuples": (b"\x80\x04)q\x010" + b"".join(
        _get(i) + _get(i) + b"\x86q" + bytes([i + 1]) + b"0" for i in range(1, 40))
        + b"(" + _get(40) + b"\x91.", "expands to"),
    "set-call-on-shared-tuples": (b"\x80\x02c__builtin__\nset\n)q\x010" + b"".join(
        _get(i) + _get(i) + b"\x86q" + bytes([i + 1]) + b"0" for i in range(1, 40))
        + b"]" + _get(40) + b"a\x85R.", "expands to"),
    "str-by-INST": (b"\x80\x02(]i__builtin__\nstr\n.", "a call of str on []"),
    "deep-tuples": (b"\x80\x02N" + b"\x85" * 200_000 + b".", "nested more than 64 deep"),
    "deep-lists": (b"\x80\x02" + b"(" * 100_000 + b"]" + b"l" * 100_000 + b".", "nested more"),
    "int-key-flood": (b"\x80\x02}(" + b"".join(_long1(k * P61) + b"N" for k in range(1, 60_000))
                      + b"u.", "hash flooding"),
    "set-flood": (b"\x80\x04\x8f(" + b"".join(_long1(k * P61) for k in range(1, 60_000)) + b"\x90.",
                  "hash flooding"),
    "memo-index-flood": (b"\x80\x02N" + b"".join(b"p%d\n" % (k * P61) for k in range(1, 40_000))
                         + b".", "PUT index"),
    "list-holding-itself": (b"\x80\x02]q\x00h\x00a.", "holds itself"),
    "list-changed-after-use": (b"\x80\x02]q\x00]q\x01h\x00a0h\x00h\x01a.", "changed after"),
    "huge-int": (b"\x80\x02]\x8b" + struct.pack("<i", 900_000) + b"\x01" * 900_000 + b"a.",
                 "an int of 7199993 bits"),
    "int-of-100k-digits": (b"\x80\x02c__builtin__\nint\nX" + struct.pack("<I", 100_000)
                           + b"9" * 100_000 + b"\x85R.", "int() of 100000 characters"),
    "bytearray-copies": (b"\x80\x02c__builtin__\nbytearray\nq\x00" + _binbytes(b"x" * 400_000)
                         + b"\x85q\x01" + b"h\x00h\x01R0" * 100_000 + b"N.", "more work"),
    "tuple-copies": (b"\x80\x02c__builtin__\ntuple\nq\x00]q\x01(" + b"N" * 300_000 + b"e\x85q\x02"
                     + b"h\x00h\x02R0" * 100_000 + b"N.", "more work"),
    "shared-long-string": (b"\x80\x02]q\x00X" + struct.pack("<I", 500_000) + b"x" * 500_000
                           + b"q\x010(" + b"h\x01" * 200_000 + b"e.", "expands to"),
    "empty-sets": (b"\x80\x04" + b"\x8f" * ((1 << 20) - 10) + b".", "more work"),
}

_MEASURE = r"""
import json, sys, time
from deepfusion.errors import FeaturesFileError
from deepfusion.io.unpickle import safe_pickle_load

def peak_mb():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:")) / 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")

for path in sys.argv[1:]:
    reset_peak()
    start = time.perf_counter()
    try:
        safe_pickle_load(path)
        message = None
    except FeaturesFileError as exc:
        message = str(exc)
    print(json.dumps([path, message, time.perf_counter() - start, peak_mb()]), flush=True)
"""


def _measure(paths: list) -> dict:
    """{path: (refusal message or None, seconds, peak MB)}, each loaded in one child process."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, paths)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=60 + 10 * len(paths))
    assert proc.returncode == 0, f"loader died with {proc.returncode}:\n{proc.stderr[-2000:]}"
    return {path: tuple(rest) for path, *rest in map(json.loads, proc.stdout.splitlines())}


def test_costly_pickles_are_refused_within_the_bound(tmp_path):
    """Exponential sharing (str of shared lists, hashing shared tuples), deep nesting, hash
    flooding, cycles, copies, huge numbers: refused in one line, in time and memory bounded
    by the file size, never walked."""
    paths = {}
    for name, (data, _) in COSTLY.items():
        assert len(data) < 1 << 20, name
        paths[name] = tmp_path / f"{name}.pkl"
        paths[name].write_bytes(data)
    got = _measure(list(paths.values()))
    for name, (_, expected) in COSTLY.items():
        message, seconds, mb = got[str(paths[name])]
        assert message is not None and expected in message, (name, message)
        assert str(paths[name]) in message and "\n" not in message and len(message) < 600, name
        assert seconds < LOAD_SECONDS and mb < LOAD_MB, (name, seconds, mb)


def test_fuzz_findings_stay_within_the_bound(tmp_path):
    """Every file the fuzzer kept (tests/data/unpickle: the cases that found something, xz-
    compressed, and the two attack files of issue 21) loads or is refused within the bound."""
    paths = []
    for fixture in sorted(FIXTURES.iterdir()):
        path = tmp_path / fixture.name.removesuffix(".xz")
        data = fixture.read_bytes()
        path.write_bytes(lzma.decompress(data) if fixture.suffix == ".xz" else data)
        assert path.stat().st_size < 1 << 20, fixture.name
        paths.append(path)
    assert len(paths) >= 4
    for path, (message, seconds, mb) in _measure(paths).items():
        assert message is None or (path in message and "\n" not in message), (path, message)
        assert seconds < LOAD_SECONDS and mb < LOAD_MB, (path, seconds, mb)


@pytest.mark.slow
def test_legitimate_files_share_and_nest_within_the_meter(tmp_path):
    """The meter's floor and per-byte allowance leave room for what real files do: clips that
    share one feature_config dict and one label string, sets and frozensets of tuples, nested
    config dicts, 2**100, and the arrays of many clips shared through the memo (refused later,
    by the features file's own expansion check, with its own message)."""
    config = {"sample_rate": 22050, "nested": {"a": [1, 2, (3, (4, 5))]}, "views": ["mfcc"] * 6}
    shared = {k: np.zeros((64, 1000), np.float32) for k in FEATURE_KEYS}
    items = [{"features": shared if i % 2 else {k: np.ones((8, 9), np.float32) for k in FEATURE_KEYS},
              "label": "rock", "path": f"rock/{i}.wav", "feature_config": config,
              "pairs": {(i, i + 1), (0, 1)}, "frozen": frozenset([(1, 2)]), "huge": 2**100}
             for i in range(400)]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"{protocol}.pkl"
        path.write_bytes(pickle.dumps(items, protocol=protocol))
        got = safe_pickle_load(path)
        assert len(got) == 400 and got[1]["features"] is got[3]["features"]
        assert got[5]["feature_config"] == config and got[7]["pairs"] == {(7, 8), (0, 1)}


def _pointing_at(checkpoint: Path, features: Path) -> Path:
    """A copy of ``checkpoint`` whose recorded features file is ``features``."""
    import torch

    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["features_file"] = str(features)
    out = features.with_name("pointing.pth")
    torch.save(ckpt, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["str-of-shared-lists", "shared-tuple-as-key"])
def test_costly_features_pickle_is_one_line_from_every_command(tmp_path, trained_model_dir, name):
    """train, train --folds and evaluate, given the file or finding it in the checkpoint (every
    command that loads a features pickle; export falls back to synthetic windows on any
    FeaturesFileError) refuse the issue's two attack files in one line, at once."""
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(COSTLY[name][0])
    runs = {
        "train": ("train", "--features", bad, "--model-dir", tmp_path / "m", "--backbone", "light",
                  "--no-pretrained", "--epochs", "1"),
        "train --folds": ("train", "--features", bad, "--model-dir", tmp_path / "cv", "--folds", "2",
                          "--backbone", "light", "--no-pretrained", "--epochs", "1"),
        "evaluate": ("evaluate", "--checkpoint", trained_model_dir / "best.pth", "--features", bad,
                     "--split", "all", "--out-dir", tmp_path / "report"),
        "evaluate (the checkpoint's features file)": (
            "evaluate", "--checkpoint", _pointing_at(trained_model_dir / "best.pth", bad),
            "--split", "all", "--out-dir", tmp_path / "report"),
    }
    for command, args in runs.items():
        start = time.perf_counter()
        result = invoke(*args)
        assert time.perf_counter() - start < 30, command     # torch's import included
        assert result.exit_code != 0, (command, result.output)
        line = one_error_line(result.stderr)
        assert str(bad) in line and "unsafe pickle, refused" in line and "expands to" in line, \
            (command, line)
    assert not (tmp_path / "m" / "last.pth").exists()
    assert not (tmp_path / "report" / "evaluation.json").exists()


def test_group_ids_that_collide_in_hash_stay_linear():
    """ints k * (2**61 - 1) share one hash: as dict keys they would make grouping quadratic."""
    import time

    from deepfusion.io.featureset import merge_groups

    items = [{"group": k * (2**61 - 1)} for k in range(30_000)]
    t0 = time.perf_counter()
    groups = merge_groups(items)
    assert time.perf_counter() - t0 < 2.0
    assert len(set(groups.tolist())) == 30_000
    same = merge_groups([{"group": 5}, {"group": 5.0}, {"group": np.int64(5)}, {"group": "5"}])
    assert same.tolist() == [0, 0, 0, 1]
