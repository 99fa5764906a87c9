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

import collections
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

from deepfusion.errors import FeaturesFileError
from deepfusion.io.unpickle import safe_pickle_load
from deepfusion.testing import damage, invoke, one_error_line, subprocess_env
from deepfusion.views import FEATURE_KEYS


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
    with pytest.raises(FeaturesFileError) as info:
        safe_pickle_load(tmp_path / "absent.pkl")
    assert str(info.value) == (f"{tmp_path / 'absent.pkl'}: features file not found; run "
                               "deepfusion extract first, or give --features")
    with pytest.raises(FeaturesFileError) as info:
        safe_pickle_load(tmp_path)
    assert str(info.value) == (f"{tmp_path}: a folder, not a features file; give the --out of "
                               "deepfusion extract")


@pytest.mark.parametrize("error, reason", [(RecursionError, "damaged features file (nested too deep)"),
                                           (MemoryError, "too large to load here (out of memory)")])
def test_a_load_that_runs_out_of_stack_or_memory_says_so(tmp_path, monkeypatch, error, reason):
    from deepfusion.io import unpickle

    def load(self):
        raise error()
    monkeypatch.setattr(unpickle._RestrictedUnpickler, "load", load)
    path = tmp_path / "deep.pkl"
    path.write_bytes(pickle.dumps([1], protocol=2))
    with pytest.raises(FeaturesFileError) as info:
        safe_pickle_load(path)
    assert str(info.value).startswith(f"{path}: {reason}")


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


# ------------------------------------------ every refusal, in its own words (issue 23, in process)
#
# The loader's checks one by one, each with the line it refuses in: what a pickle names, calls,
# builds or hands numpy. In this process (the cases numpy could crash on are refused before
# numpy sees them; the crash itself is tested above, in a process of its own).

_RECONSTRUCT = np.zeros(1).__reduce__()[0]          # numpy.(_)core.multiarray._reconstruct
_SCALAR = np.float32(1).__reduce__()[0]             # numpy.(_)core.multiarray.scalar
_FROMBUFFER = np.zeros(3).__reduce_ex__(5)[0]       # numpy.(_)core.numeric._frombuffer
F4 = np.dtype("f4")


def _pickled(rv, protocol: int = 2) -> bytes:
    return pickle.dumps(_reduce(rv), protocol=protocol)


def _global(module: str, name: str, protocol: int = 2) -> bytes:
    return b"\x80" + bytes([protocol]) + f"c{module}\n{name}\n".encode() + b"."


def _dtype_state(state, spec: str = "f4") -> bytes:
    """A dtype whose BUILD hands numpy ``state``."""
    return _pickled((np.dtype, (spec, False, True), state))


def _array_state(state) -> bytes:
    """An array whose BUILD hands numpy ``state``."""
    return _pickled((_RECONSTRUCT, (np.ndarray, (0,), b"b"), state))


def _newobj(module: bytes, name: bytes, args: bytes, op: bytes = b"\x81", protocol: int = 2) -> bytes:
    """NEWOBJ (or NEWOBJ_EX) of ``module.name`` on the pickled ``args``."""
    return b"\x80" + bytes([protocol]) + b"c" + module + b"\n" + name + b"\n" + args + op + b"."


def _encode(*args):
    import _codecs

    return _pickled((_codecs.encode, args))


REFUSED = {   # name: (pickle, what "refused to load" names)
    "eval": (_pickled((eval, ("1",))), "builtins.eval"),
    "eval, protocol 4": (_pickled((eval, ("1",)), 4), "builtins.eval"),
    "long names": (_global("a" * 100, "b" * 100), "a" * 80 + "." + "b" * 80),
    "xrange, protocol 2": (_global("__builtin__", "xrange"), "builtins.range"),
    "xrange, protocol 3": (_global("__builtin__", "xrange", 3), "__builtin__.xrange"),
    "__builtin__.str, protocol 3": (_global("__builtin__", "str", 3), "__builtin__.str"),
    "a dtype class elsewhere": (_global("os", "Float32DType"), "os.Float32DType"),
    "no such dtype class": (_global("numpy.dtypes", "NoSuchDType"), "numpy.dtypes.NoSuchDType"),
    "a call of ndarray": (_pickled((np.ndarray, ((2,),))), "a call of ndarray"),
    "a call of ndarray by INST": (b"(K\x02inumpy\nndarray\n.", "a call of ndarray"),
    "a call of a dtype class": (_pickled((type(F4), ())), f"a call of {type(F4).__name__}"),
    "a call of an int": (b"\x80\x02K\x01)R.", "a call of int"),
    "a call with a list": (b"\x80\x02c__builtin__\nlist\n]R.", "a call of list with []"),
    "a slice of 4": (_pickled((slice, (1, 2, 3, 4))), "a slice of 4 values"),
    "int of a list": (_pickled((int, ([1],))), "a call of int on [1]"),
    "float of 5001 characters": (_pickled((float, (" " * 4998 + "1.5",))),
                                 "float() of 5001 characters"),
    "str of numbers": (_pickled((str, (1, 2))), "a call of str on 1, 2"),
    "list of 2": (_pickled((list, ([1], [2]))), "a call of list with 2 arguments"),
    "list of 2 by NEWOBJ": (_newobj(b"__builtin__", b"list", b"]]\x86"), "a call of list with 2 arguments"),
    "list of an int": (_pickled((list, (1,))), "a list from 1"),
    "dict of non-pairs": (_pickled((dict, ([1, 2],))), "a dict from [1, 2]"),
    "dict of triples": (_pickled((dict, ([(1, 2, 3)],))), "a dict from a list of 1 items"),
    "NEWOBJ of ndarray": (_newobj(b"numpy", b"ndarray", b"K\x02\x85"), "an object of ndarray"),
    "NEWOBJ of an int": (b"\x80\x02K\x01)\x81.", "an object of int"),
    "NEWOBJ_EX with a list": (_newobj(b"builtins", b"dict", b")]", b"\x92", 4), "a call of dict with ()"),
    "NEWOBJ_EX with int keys": (_newobj(b"builtins", b"dict", b")}K\x01K\x02s", b"\x92", 4),
                                "a call of dict with keywords that are not names"),
    "a state for a list": (b"\x80\x02]}b.", "a state for list"),
    "bytes of a size": (_pickled((bytes, (10,))), "bytes of a given size"),
    "bytearray of a size": (_pickled((bytearray, (10,))), "bytearray of a given size"),
    "bytes in rot13": (_pickled((bytes, ("a", "rot13"))), "the codec 'rot13'"),
    "bytes, errors 1": (_pickled((bytes, ("a", "ascii", 1))), "the error handler 1"),
    "bytes of a dict": (_pickled((bytes, ({},))), "bytes from a dict of 0 items"),
    "encode in rot13": (_encode("a", "rot13"), "the codec 'rot13'"),
    "encode an int": (_encode(1, "ascii"), "the codec 'ascii'"),
    "encode, errors 1": (_encode("a", "ascii", 1), "the codec 'ascii'"),
    "dtype of an int": (_pickled((np.dtype, (5, False, True))),
                        "dtype 5 (only numbers, booleans and fixed-size strings)"),
    "dtype of objects": (_pickled((np.dtype, ("O8", False, True))),
                         "dtype 'O8' (only numbers, booleans and fixed-size strings)"),
    "dtype of size 0": (_pickled((np.dtype, ("S0", False, True))), "dtype 'S0'"),
    "dtype order x": (_dtype_state((3, "x", None, None, None, -1, -1, 0)),
                      "dtype state (3, 'x', None, None, None, -1, -1, 0)"),
    "dtype state of 9": (_dtype_state((3, "<", None, None, None, -1, -1, 0, 1)),
                         "dtype state a tuple of 9 items"),
    "dtype state a list": (_dtype_state([3, "<", None, None, None, -1, -1, 0]),
                           "dtype state [3, '<', None, None, None, -1, -1, 0]"),
    "dtype state version 2": (_dtype_state((2, "<", None, None, None, -1, -1, 0)),
                              "dtype state (2, '<', None, None, None, -1, -1, 0)"),
    "bytes dtype with an order": (_dtype_state((3, "<", None, None, None, 4, 1, 8), "S4"),
                                  "dtype state (3, '<', None, None, None, 4, 1, 8)"),
    "array state version 2": (_array_state((2, (2,), F4, False, bytes(8))),
                              "array state a tuple of 5 items"),
    "array state version True": (_array_state((True, (2,), F4, False, bytes(8))),
                                 "array state a tuple of 5 items"),
    "array order x": (_array_state((1, (2,), F4, "x", bytes(8))), "array state a tuple of 5 items"),
    "array data text": (_array_state((1, (2,), F4, False, "abcdefgh")),
                        "array state a tuple of 5 items"),
    "array state of 6": (_array_state((1, (2,), F4, False, bytes(8), 5)),
                         "array state a tuple of 6 items"),
    "array state a list": (_array_state([1, (2,), F4, False, bytes(8)]), "array state a list of 5 items"),
    "array shape a list": (_array_state((1, [2], F4, False, bytes(8))), "array shape [2]"),
    "array of 33 dimensions": (_array_state((1, (1,) * 33, F4, False, bytes(4))),
                               "array shape a tuple of 33 items"),
    "array dimension True": (_array_state((1, (True,), F4, False, bytes(4))), "array shape (True,)"),
    "array too wide": (_array_state((1, (0, 2**20 + 1), F4, False, b"")), "array shape (0, 1048577)"),
    "array data short": (_array_state((1, (10,), F4, False, bytes(4))),
                         "array shape (10,) of float32 over 4 bytes of data"),
    "array of a list": (_pickled((_RECONSTRUCT, (list, (0,), b"b"))), "an array of type a type"),
    "array dtype a string": (_array_state((1, (2,), "f4", False, bytes(8))), "an array of dtype 'f4'"),
    "scalar dtype a string": (_pickled((_SCALAR, ("f4", bytes(4)))), "an array of dtype 'f4'"),
    "scalar of text": (_pickled((_SCALAR, (F4, "abcd"))), "a scalar of float32 from str"),
    "scalar short": (_pickled((_SCALAR, (F4, b"ab"))), "a scalar of float32 from bytes"),
    "frombuffer of text": (_pickled((_FROMBUFFER, ("abcd", F4, (1,), "C"))),
                           "an array from str in order 'C'"),
    "frombuffer order X": (_pickled((_FROMBUFFER, (bytes(4), F4, (1,), "X"))),
                           "an array from bytes in order 'X'"),
    "frombuffer order 1": (_pickled((_FROMBUFFER, (bytes(4), F4, (1,), 1))),
                           "an array from bytes in order 1"),
    "frombuffer shape": (_pickled((_FROMBUFFER, (bytes(24), F4, (2, 2), "C"))),
                         "array shape (2, 2) of float32 over 24 bytes of data"),
    "axis order repeated": (_pickled((_FROMBUFFER, (bytes(24), F4, (2, 3), "K", (0, 0)))),
                            "axis order (0, 0)"),
    "axis order of 3": (_pickled((_FROMBUFFER, (bytes(24), F4, (2, 3), "K", (0, 1, 2)))),
                        "axis order (0, 1, 2)"),
    "axis order True": (_pickled((_FROMBUFFER, (bytes(24), F4, (2, 3), "K", (True, 0)))),
                        "axis order (True, 0)"),
    "axis order text": (_pickled((_FROMBUFFER, (bytes(24), F4, (2, 3), "K", "10"))),
                        "axis order '10'"),
    "dtype order X": (_dtype_state((3, "X", None, None, None, -1, -1, 0)),
                      "dtype state (3, 'X', None, None, None, -1, -1, 0)"),
    "dict of 2": (_pickled((dict, ([], []))), "a call of dict with 2 arguments"),
    "NEWOBJ_EX list with a keyword": (_newobj(b"builtins", b"list", b"]\x85}X\x01\x00\x00\x00xK\x01s",
                                              b"\x92", 4), "a call of list with 2 arguments"),
    "dtype called on an int": (b"\x80\x02cnumpy\ndtype\nK\x05R.", "a call of _dtype with 5"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_each_refusal_names_what_it_refused(tmp_path, name):
    data, what = REFUSED[name]
    path = tmp_path / "refused.pkl"
    path.write_bytes(data)
    with pytest.raises(FeaturesFileError) as info:
        safe_pickle_load(path)
    assert str(info.value) == (f"{path}: unsafe pickle, refused to load {what} (only containers, "
                               "numbers, strings and numpy arrays are allowed)")


_BIG = np.arange(30_000, dtype=np.float32)       # 120 KB: read outside a pickle frame
_I4 = np.arange(6, dtype="<i4")

LOADED = {   # name: (pickle, what it loads as; None: what pickle.loads makes of it)
    "a dtype class": (_global("numpy.dtypes", type(F4).__name__, 4), type(F4)),
    "float of 5000 characters": (_pickled((float, (" " * 4997 + "1.5",))), 1.5),
    "str of 6000 characters": (_pickled((str, ("x" * 6000,))), "x" * 6000),
    "a slice of 3": (_pickled((slice, (1, 2, 3))), slice(1, 2, 3)),
    "list of text": (_pickled((list, ("ab",))), ["a", "b"]),
    "list of lists": (_pickled((list, ([[1], [2]],))), [[1], [2]]),
    "dict of pairs": (_pickled((dict, ([("a", [1])],))), {"a": [1]}),
    "dict of a dict": (_pickled((dict, ({"a": 1},))), {"a": 1}),
    "OrderedDict of pairs": (_pickled((collections.OrderedDict, ([("b", 1), ("a", 2)],))),
                             collections.OrderedDict([("b", 1), ("a", 2)])),
    "set of ints": (_pickled((set, ([1, 2, 1],))), {1, 2}),
    "NEWOBJ tuple": (_newobj(b"__builtin__", b"tuple", b"K\x01K\x02\x86\x85"), (1, 2)),
    "NEWOBJ OrderedDict": (_newobj(b"collections", b"OrderedDict", b")"), collections.OrderedDict()),
    "NEWOBJ unicode": (_newobj(b"__builtin__", b"unicode", b"X\x02\x00\x00\x00ab\x85"), "ab"),
    "NEWOBJ_EX dict": (_newobj(b"builtins", b"dict", b"](X\x01\x00\x00\x00aK\x01\x86e\x85"
                               b"}X\x01\x00\x00\x00bK\x02s", b"\x92", 4), {}),
    "NEWOBJ_EX tuple": (_newobj(b"builtins", b"tuple", b"K\x01K\x02\x86\x85}", b"\x92", 4), (1, 2)),
    "INST list": (b"(S'ab'\ni__builtin__\nlist\n.", ["a", "b"]),
    "OBJ list": (b"(c__builtin__\nlist\nS'ab'\no.", ["a", "b"]),
    "bytes of ints": (_pickled((bytes, ([1, 2],))), b"\x01\x02"),
    "bytes in LATIN1": (_pickled((bytes, ("\xe9", "LATIN1"))), b"\xe9"),
    "bytearray, errors strict": (_pickled((bytearray, ("ab", "ascii", "strict"))), bytearray(b"ab")),
    "encode, errors replace": (_encode("\xe9", "ascii", "replace"), b"?"),
    "encode in UTF-8": (_encode("\xe9"), b"\xc3\xa9"),
    "frombuffer K, axes": (_pickled((_FROMBUFFER, (_I4.tobytes(), _I4.dtype, (3, 2), "K", (1, 0)))),
                           _I4.reshape(3, 2).T),
    "frombuffer K": (_pickled((_FROMBUFFER, (_I4.tobytes(), _I4.dtype, (2, 3), "K"))),
                     _I4.reshape(2, 3)),
    "frombuffer F": (_pickled((_FROMBUFFER, (_I4.tobytes(), _I4.dtype, (2, 3), "F"))),
                     _I4.reshape((2, 3), order="F")),
    "array wide and empty": (_array_state((1, (0, 2**20), F4, False, b"")), np.zeros((0, 2**20), F4)),
    "array of 32 dimensions": (_array_state((1, (1,) * 32, F4, False, bytes(4))),
                               np.zeros((1,) * 32, F4)),
    "big array, protocol 2": (pickle.dumps(_BIG, protocol=2), _BIG),
    "big array, protocol 5": (pickle.dumps(_BIG, protocol=5), _BIG),
    "big bytearray, protocol 5": (pickle.dumps(bytearray(100_000), protocol=5), bytearray(100_000)),
    "big-endian, protocol 2": (pickle.dumps(np.arange(3, dtype=">f8"), protocol=2), None),
    "big-endian, protocol 5": (pickle.dumps(np.arange(3, dtype=">f8"), protocol=5), None),
    "NEWOBJ_EX int, base 2": (_newobj(b"builtins", b"int", b"X\x02\x00\x00\x0010\x85}X\x04\x00\x00\x00"
                                      b"baseK\x02s", b"\x92", 4), 2),
    "frombuffer K, 3 axes": (_pickled((_FROMBUFFER, (_I4.tobytes(), _I4.dtype, (1, 2, 3), "K", (2, 0, 1)))),
                             _I4.reshape(1, 2, 3).transpose(2, 0, 1)),
    "an array written by numpy 1": (pickle.dumps(np.arange(3.0), protocol=2).replace(
        b"numpy._core.multiarray", b"numpy.core.multiarray"), None),
    "a scalar written by numpy 1": (pickle.dumps(np.float32(2), protocol=2).replace(
        b"numpy._core.multiarray", b"numpy.core.multiarray"), None),
    "frombuffer named by numpy 1": (_pickled((_FROMBUFFER, (_I4.tobytes(), _I4.dtype, (6,), "C"))).replace(
        b"numpy._core.numeric", b"numpy.core.numeric"), _I4),
    "2 MB of text": (pickle.dumps([f"{i:05d}" + "x" * 995 for i in range(2000)], protocol=4), None),
}


@pytest.mark.parametrize("name", list(LOADED))
def test_each_allowed_construction_loads_as_pickle_would(tmp_path, name):
    data, want = LOADED[name]
    path = tmp_path / "allowed.pkl"
    path.write_bytes(data)
    got = safe_pickle_load(path)
    want = pickle.loads(data) if want is None else want
    if isinstance(want, np.ndarray):
        assert type(got) is np.ndarray and got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    else:
        assert got == want and type(got) is type(want)


def test_a_dtype_may_be_as_wide_as_the_file_and_64_bytes(tmp_path):
    path = tmp_path / "dtype.pkl"
    n = 100
    while n != len(_pickled((np.dtype, (f"S{n}", False, True)))) + 64:   # the bound, exactly
        n = len(_pickled((np.dtype, (f"S{n}", False, True)))) + 64
    path.write_bytes(_pickled((np.dtype, (f"S{n}", False, True))))
    assert safe_pickle_load(path) == np.dtype(f"S{n}")
    path.write_bytes(_pickled((np.dtype, (f"S{n + 1}", False, True))))
    with pytest.raises(FeaturesFileError, match=f"refused to load dtype 'S{n + 1}' "):
        safe_pickle_load(path)


@pytest.mark.parametrize("data, reason", [
    (b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b".", "damaged features file (cut short)"),
    (b"\x80\x05\x96" + (2**63).to_bytes(8, "little") + b".", "damaged features file (cut short)"),
    (pickle.dumps(bytearray(100_000), protocol=5)[:50_000], "damaged features file (cut short)"),
    (pickle.dumps(_BIG, protocol=2)[:50_000], "damaged features file (cut short)"),
    (b"\x80\x02", "damaged features file (cut short)"),
    (b"\x80\x05\x96" + (1000).to_bytes(8, "little") + b"x" * 10, "damaged features file (cut short)"),
    (b"\x80\x02h\x05.", "damaged features file (not a well-formed pickle: Memo value not found at "
                        "index 5); run deepfusion extract again"),
    (b"\x80\x02\xff.", "damaged features file (not a well-formed pickle); run deepfusion extract again"),
    (b"\x80\x02K\x01K\x02s.", "damaged features file (not a well-formed pickle)"),
    (b"genre,path\nrock,a.wav\n", "not a features file (not a pickle)"),
])
def test_damaged_files_say_how(tmp_path, data, reason):
    path = tmp_path / "damaged.pkl"
    path.write_bytes(data)
    with pytest.raises(FeaturesFileError) as info:
        safe_pickle_load(path)
    assert str(info.value).startswith(f"{path}: {reason}"), str(info.value)


def test_a_load_keeps_nothing_and_leaves_the_collector_as_it_was(tmp_path):
    """The loaded objects are the caller's alone (the unpickler's memo, in a reference cycle, is
    released at once), and the garbage collector is switched back on, or left off."""
    import gc
    import weakref

    path = tmp_path / "one.pkl"
    path.write_bytes(pickle.dumps([np.zeros(1000)], protocol=5))
    assert gc.isenabled()
    got = safe_pickle_load(path)
    assert gc.isenabled()
    ref = weakref.ref(got[0])
    del got
    assert ref() is None
    gc.disable()
    try:
        safe_pickle_load(path)
        assert not gc.isenabled()
    finally:
        gc.enable()
