"""Support for deepfusion's test suite and benchmark scripts, as ``numpy.testing`` is numpy's.

One home for what the tests and ``benchmarks/`` share, importable by both without path tricks:
running the real command (in-process through click's ``CliRunner``, or as ``python -m
deepfusion`` in a subprocess with a controlled environment), the one-error-line check,
comparisons of two runs' outputs, and writing a feature store from a loaded FeatureSet.
:mod:`deepfusion.testing.damage` makes good and damaged audio files and kills commands at a
chosen moment; :mod:`deepfusion.testing.reference` computes the six views the textbook way.
Nothing on the extract/train/evaluate/predict path imports this package.
"""

from __future__ import annotations

import csv
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from deepfusion.config import FeatureConfig
from deepfusion.views import FEATURE_KEYS, PRETRAINED_KEY

#: The suite's tiny dataset: 3 synthetic genres x 6 clips of 6 s, and its feature settings.
TINY_DATASET = dict(genres=3, clips_per_genre=6, duration=6.0, seed=0)
TINY_FEATURES = FeatureConfig(duration=6.0)

# ------------------------------------------------------------------------ running the command


def invoke(*args: Any):
    """Run ``deepfusion ARGS`` in this process (monkeypatches apply) through click's
    ``CliRunner``; the result has ``exit_code``, ``stdout``, ``stderr`` and ``output``."""
    from click.testing import CliRunner

    from deepfusion.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(stderr: str) -> str:
    """The single ``Error: ...`` line a refused input or an impossible output must produce.

    Fails (AssertionError) on a traceback, several error lines, any other line, or an
    "internal error" (a bug). One-line ``warning: ...`` notes said before the failure (train's
    on a collection without groups, say) may precede it; they are not part of the error.
    """
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert "internal error" not in lines[0], stderr
    return lines[0]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a ``python -m deepfusion`` subprocess.

    Not the caller's ``DEEPFUSION_CACHE`` but a temporary one of this process (a predict
    without ``--cache-dir`` must not fill the working folder's ``data/cache``); this checkout
    first on ``PYTHONPATH``; one BLAS/OpenMP thread (on a shared 2-core machine two spinning
    threads make torch 30x slower, and kill trials compare runs bit for bit); unbuffered output.
    """
    repo = str(Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if k != "DEEPFUSION_CACHE"}
    env["DEEPFUSION_CACHE"] = _scratch_cache()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


_SCRATCH: list[str] = []


def _scratch_cache() -> str:
    """A feature cache folder for this process's subprocesses, removed when it exits."""
    if not _SCRATCH:
        import atexit
        import shutil
        import tempfile

        _SCRATCH.append(tempfile.mkdtemp(prefix="deepfusion-cache-"))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return _SCRATCH[0]


def cli_command(*args: Any) -> list[str]:
    """``python -m deepfusion ARGS`` as an argument list."""
    return [sys.executable, "-m", "deepfusion", *map(str, args)]


def run_command(*args: Any, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """The real command in a subprocess, to completion (text output captured).

    Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds: a hang, never a stall.
    """
    return subprocess.run(cli_command(*args), env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=timeout)


#: ``python -c HOLD_LOCK PATH``: takes the lock file PATH as a run or store writer would,
#: prints "held" and keeps it until killed (a live writer in another process).
HOLD_LOCK = """
import sys, time
from pathlib import Path
from deepfusion.io.lock import exclusive
with exclusive(Path(sys.argv[1]), wait=False, what="x"):
    print("held", flush=True)
    time.sleep(600)
"""


#: Names no file system refuses on Linux and that a careless tool garbles: bytes that are not
#: UTF-8, a comma and quotes, a newline; the last file is not audio (it must be reported).
ODD_NAMES = (b"rock/caf\xe9 \xff,\"q\".wav", b"jazz\xe9/two\nlines.wav", b"rock/broken\xfe.wav")


def write_odd_names(root: Path, clip: Path) -> list[bytes]:
    """Copies of ``clip`` under :data:`ODD_NAMES` in ``root`` (the last one a damaged file);
    returns their full paths as bytes."""
    paths = []
    for name in ODD_NAMES:
        path = os.fsencode(root) + b"/" + name
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(b"RIFF...." if name == ODD_NAMES[-1] else Path(clip).read_bytes())
        paths.append(path)
    return paths


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- comparing outputs

def leftovers(*folders: Path) -> list[Path]:
    """Temporary files (``.name.<pid>.<hex>.tmp``) under ``folders``."""
    return [p for f in folders if f.exists() for p in f.rglob("*") if p.name.endswith(".tmp")]


def check_cache_entry(entry: Path) -> None:
    """Assert that a cache entry loads with the hand-made finite float32 views (and the pretrained
    one, if it has it) and its metadata."""
    with np.load(entry, allow_pickle=False) as npz:
        keys = set(npz.files) - {"__meta__"}
        assert keys in ({*FEATURE_KEYS}, {*FEATURE_KEYS, PRETRAINED_KEY}) and "__meta__" in npz.files, entry
        for key in keys:
            assert npz[key].dtype == np.float32 and np.isfinite(npz[key]).all(), (entry, key)


def load_own_pickle(path: Path) -> list[dict]:
    """A features file deepfusion wrote (a plain load is the reference reader of our own output)."""
    with open(path, "rb") as fh:
        return pickle.load(fh)


def assert_same_features(a: Path, b: Path) -> None:
    """Two extract outputs hold the same clips, views, metadata and error reports."""
    items_a, items_b = load_own_pickle(a), load_own_pickle(b)
    assert [(it["path"], it["label"]) for it in items_a] == \
        [(it["path"], it["label"]) for it in items_b], "clips"
    for x, y in zip(items_a, items_b):
        assert x["features"].keys() == y["features"].keys(), (x["path"], "views")
        for key in x["features"]:
            assert np.array_equal(x["features"][key], y["features"][key]), (x["path"], key)
        for meta in ("audio_sha", "file_sha", "source_sr", "channels", "duplicate_group"):
            assert x[meta] == y[meta], (x["path"], meta)
    assert a.with_name("extract_errors.csv").read_text() == \
        b.with_name("extract_errors.csv").read_text(), "extract_errors.csv"


def history_rows(model_dir: Path) -> list[dict]:
    """``training_history.csv`` without its wall-time column."""
    with open(model_dir / "training_history.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def assert_same_training(a: Path, b: Path) -> None:
    """Two model folders hold the same history (but wall time) and the same best checkpoint:
    weights, epoch and metrics."""
    import torch

    assert history_rows(a) == history_rows(b), "history"
    ca, cb = (torch.load(d / "best.pth", map_location="cpu", weights_only=True) for d in (a, b))

    def metrics(ckpt: dict) -> dict:
        return {**ckpt["metrics"], "val": {k: v for k, v in ckpt["metrics"]["val"].items()
                                           if k != "seconds"}}

    assert ca["epoch"] == cb["epoch"], "best epoch"
    assert metrics(ca) == metrics(cb), "metrics"
    for key, tensor in ca["model_state"].items():
        assert torch.equal(tensor, cb["model_state"][key]), key


# ------------------------------------------------------------------------------- feature stores

def small_rows(n_mels: int = 8, **rows: int) -> dict[str, int]:
    """Rows of small hand-made views, for tests that make their own features: ``n_mels`` for
    every mel view, ``rows`` by view name (``mfcc=5``), 4 for any other view of the registry
    (so a view added to :data:`deepfusion.views.VIEWS` needs no change in those tests)."""
    from deepfusion.views import FEATURE_KEYS, MEL_KEYS

    unknown = sorted(set(rows) - set(FEATURE_KEYS) | set(rows) & set(MEL_KEYS))
    if unknown:
        raise ValueError(f"small_rows: {', '.join(unknown)} is not a vector view")
    return {k: n_mels if k in MEL_KEYS else int(rows.get(k, 4)) for k in FEATURE_KEYS}


def save_store(fs, folder: Path) -> None:
    """Write a loaded :class:`~deepfusion.io.featureset.FeatureSet` as a feature store, one
    clip at a time (extract writes stores from the cache; tests start from a FeatureSet)."""
    from deepfusion.io.store_writer import StoreWriter

    names = fs.label_names or [fs.class_names[c] for c in fs.labels]
    with StoreWriter(Path(folder), n_clips=len(fs), rows=fs.rows(), frames=fs.n_frames,
                     patches=fs.n_patches) as writer:
        for i in range(len(fs)):
            writer.put({k: a[i] for k, a in fs.arrays.items()})
        writer.commit([{"path": p, "label": n, "group": int(g)}
                       for p, n, g in zip(fs.paths, names, fs.groups)],
                      feature_config=fs.feature_config, source=fs.source)
