"""The restricted unpickler (``deepfusion.io.unpickle``): security code with its own threat model.

A features pickle may come from anyone. The loader must read everything a features file
legitimately holds, in every pickle protocol, and refuse (one clear error, never a crash)
anything that would run code, hand numpy a state it trusts blindly, or allocate more than the
file holds. The commands' handling of malicious files (train, evaluate, predict, resume) is
tested through the real commands in ``tests/test_hardening.py``.
"""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from deepfusion.config import FEATURE_KEYS
from deepfusion.errors import FeaturesFileError
from deepfusion.io.unpickle import safe_pickle_load
from deepfusion.testing import damage, subprocess_env


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
    with pytest.raises(FeaturesFileError, match="is a folder"):
        safe_pickle_load(tmp_path)
