"""Memory of extract and train with a features pickle against a memory-mapped feature store.

Runs, side by side on one collection (default ``../shared/data/minigenres``; any GTZAN-layout
folder works):
  1. ``deepfusion extract`` twice through one cache, ``--format pickle`` and ``--format store``
     (the first run computes the features, the second reads them from the cache; a third,
     untimed, warm-up run makes both timings cache-hot);
  2. ``deepfusion train --backbone light --no-pretrained`` for a few epochs on each output.

Each command is a child process whose ``/proc/<pid>/status`` is sampled every 5 ms. Printed per
command: peak anonymous memory (``RssAnon``: heap, the features a pickle is read into; the
kernel cannot drop it, only swap it), peak resident file pages (``RssFile``: the mapped store,
libraries; clean pages the kernel drops and re-reads under memory pressure), peak total RSS, and
wall time. The anonymous peak is the one that decides whether a collection fits in RAM: for a
pickle it grows with the collection, for a store it does not. Finally it checks that both
training runs wrote the same history (timings aside).

Usage: python benchmarks/feature_memory.py [--audio-dir DIR] [--manifest CSV] [--epochs 2]
About 1 minute on 2 cores for minigenres (80 clips, 315 MiB of features).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_AUDIO = ROOT.parent / "shared" / "data" / "minigenres"


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def measure(cmd: list[str]) -> dict[str, float]:
    """Run ``cmd``; peak RssAnon / RssFile / VmRSS in MiB (5-ms samples) and wall seconds."""
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample() -> None:
        while proc.poll() is None:
            for key, kb in _status_kb(proc.pid).items():
                peak[key] = max(peak[key], kb)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stderr}")
    return {"anon": peak["RssAnon"] / 1024, "file": peak["RssFile"] / 1024,
            "rss": peak["VmRSS"] / 1024, "wall": wall, "stdout": stdout}


def _history(model_dir: Path) -> list[dict]:
    with open(model_dir / "training_history.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio-dir", type=Path, default=DEFAULT_AUDIO)
    parser.add_argument("--manifest", type=Path, help="default: AUDIO_DIR/manifest.csv if present")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if not args.audio_dir.is_dir():
        sys.exit(f"{args.audio_dir}: no such folder (give --audio-dir)")
    manifest = args.manifest or (args.audio_dir / "manifest.csv")
    cli = [sys.executable, "-m", "deepfusion"]
    work = Path(tempfile.mkdtemp(prefix="feature-memory-"))
    try:
        outs = {"pickle": work / "features.pkl", "store": work / "features.store"}
        extract = {fmt: [*cli, "extract", "--audio-dir", str(args.audio_dir), "--out", str(out),
                         "--format", fmt, "--cache-dir", str(work / "cache"), "--quiet",
                         *(["--manifest", str(manifest)] if manifest.is_file() else [])]
                   for fmt, out in outs.items()}
        first = measure(extract["pickle"])
        print(f"collection {args.audio_dir}: {first['stdout'].splitlines()[0]}")
        for out in outs.values():      # fresh outputs, cache-hot, for a fair extract comparison
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        rows = {}
        for fmt in outs:
            rows[f"extract --format {fmt}"] = measure(extract[fmt])
        feature_mb = outs["pickle"].stat().st_size / 2**20
        for fmt, out in outs.items():
            rows[f"train on the {fmt}"] = measure(
                [*cli, "train", "--features", str(out), "--model-dir", str(work / f"model-{fmt}"),
                 "--backbone", "light", "--no-pretrained", "--epochs", str(args.epochs),
                 "--batch-size", "16", "--lr", "1e-3", "--val-size", "0.2", "--test-size", "0.2",
                 "--quiet"])
        print(f"features: {feature_mb:.0f} MiB as a pickle; peak memory per command (MiB), "
              f"5-ms samples, cache-hot:")
        print(f"{'command':24s} {'anonymous':>10s} {'file pages':>11s} {'total RSS':>10s} {'wall s':>7s}")
        for name, r in rows.items():
            print(f"{name:24s} {r['anon']:10.0f} {r['file']:11.0f} {r['rss']:10.0f} {r['wall']:7.1f}")
        for step in ("extract", "train on the"):
            a = rows[f"{step} --format pickle" if step == "extract" else f"{step} pickle"]
            b = rows[f"{step} --format store" if step == "extract" else f"{step} store"]
            print(f"{step.split()[0]}: anonymous memory store - pickle = {b['anon'] - a['anon']:+.0f} MiB "
                  f"({(a['anon'] - b['anon']) / feature_mb:.2f}x the feature bytes saved)")
        same = _history(work / "model-pickle") == _history(work / "model-store")
        print(f"training histories identical (timings aside): {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
