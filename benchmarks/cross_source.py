"""Music it never heard: train on one real collection, test on another from other sources.

The headline protocol of the README. Two collections of the same four genres (ambient,
electronic, metal, orchestral) whose recordings, artists and productions differ:
``../shared/data/minigenres`` and the corpus ``benchmarks/crossgenres.py`` builds from other
Debian packages. Each is extracted twice through ``deepfusion.extract`` (the default seven
views, and ``pretrained_view=None``: the six hand-made ones), then for both directions and
every seed each recipe is trained on the whole of one collection exactly as ``deepfusion
train`` does (its own train/validation split of that collection) and evaluated with
``deepfusion.evaluate`` on every clip of the other (``split="all"``) under each adaptation
(``none``, ``inputs``, ``full``; see :mod:`deepfusion.inference.adapt`).

Rows: the network with the six views, the network with the pretrained view (what ``deepfusion
train --features features.pkl --backbone light`` trains), and the linear probe on the same
features (the probe is deterministic: its seeds differ only in the split of the training
collection). Each cell is the mean clip accuracy over both directions and all seeds, with the
standard deviation over those runs and each direction's mean.

Usage::

    python benchmarks/crossgenres.py --out data/crossgenres      # once: the second corpus
    python benchmarks/cross_source.py                             # light network, seeds 0-2
    python benchmarks/cross_source.py --seeds 0 --json cross.json

Runs on the CPU (the light backbone: about 2 minutes per network on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deepfusion.config import FeatureConfig, RuntimeConfig, TrainConfig
from deepfusion.evaluate import evaluate
from deepfusion.extract import extract
from deepfusion.train.run import train

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_A = ROOT.parent / "shared" / "data" / "minigenres"
DEFAULT_B = ROOT / "data" / "crossgenres"
ADAPTS = ("none", "inputs", "full")
#: (row name, model, views): views 7 is the default extraction, 6 without the pretrained view
RECIPES = (("network, six views", "net", 6), ("network, + pretrained view", "net", 7),
           ("linear probe, six views", "probe", 6), ("linear probe, + pretrained view", "probe", 7))


def corpus_features(audio_dir: Path, work: Path, cache: Path, jobs: int) -> dict[int, Path]:
    """The two features files of one collection (6 and 7 views), with its manifest's groups."""
    manifest = audio_dir / "manifest.csv"
    out = {}
    for views, config in ((7, FeatureConfig()), (6, FeatureConfig(pretrained_view=None))):
        path = work / f"{audio_dir.name}-{views}.pkl"
        t0 = time.perf_counter()
        result = extract(audio_dir, out=path, cache_dir=cache, jobs=jobs, config=config,
                         manifest=manifest if manifest.exists() else None, quiet=True)
        print(f"extract {audio_dir.name} ({views} views): {result.n_items} clips, "
              f"{result.computed} computed, in {time.perf_counter() - t0:.1f} s", flush=True)
        if result.errors:
            print(f"  {len(result.errors)} unreadable: {result.errors[:3]}", flush=True)
        out[views] = path
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, default=DEFAULT_A, help="first collection (GTZAN layout)")
    ap.add_argument("--b", type=Path, default=DEFAULT_B, help="second collection")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--backbone", default="light")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", type=Path, help="keep features and models here (default: a temp dir)")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / "data" / "cache")
    ap.add_argument("--recipes", nargs="+", default=[r[0] for r in RECIPES],
                    help="rows to run (names as in the table)")
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args()
    for folder in (args.a, args.b):
        if not folder.is_dir():
            print(f"error: {folder}: not found (build the second corpus with "
                  "benchmarks/crossgenres.py)", file=sys.stderr)
            return 2
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cross-source-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        feats = {name: corpus_features(folder, work, args.cache_dir, args.jobs)
                 for name, folder in (("A", args.a), ("B", args.b))}
        runs: list[dict] = []
        for src, dst in (("A", "B"), ("B", "A")):
            for name, kind, views in RECIPES:
                if name not in args.recipes:
                    continue
                for seed in args.seeds:
                    model_dir = work / f"{src}-{kind}{views}-s{seed}"
                    t0 = time.perf_counter()
                    train(feats[src][views], model_dir=model_dir,
                          config=TrainConfig(seed=seed, model=kind), runtime=RuntimeConfig(),
                          backbone=args.backbone if kind == "net" else None, overwrite=True,
                          quiet=True, echo=lambda *_: None)
                    seconds = time.perf_counter() - t0
                    row = {"recipe": name, "train": src, "test": dst, "seed": seed,
                           "train_seconds": round(seconds, 1)}
                    for adapt in ADAPTS:
                        report = evaluate(model_dir / "best.pth", features=feats[dst][views],
                                          split="all", out_dir=model_dir / f"eval-{adapt}",
                                          adapt=adapt, n_boot=200, echo=lambda *_: None)
                        row[adapt] = round(float(report.metrics["accuracy"]), 4)
                    runs.append(row)
                    print(f"{name:34s} {src}->{dst} seed {seed}: "
                          + "  ".join(f"{a} {row[a]:.3f}" for a in ADAPTS)
                          + f"  ({seconds:.0f} s)", flush=True)
    print()
    print(f"A = {args.a.name}, B = {args.b.name}; {args.backbone} backbone; seeds "
          f"{' '.join(map(str, args.seeds))}; clip accuracy on every clip of the other collection, "
          f"mean +- sd over {2 * len(args.seeds)} runs [A->B mean / B->A mean]")
    print(f"{'recipe':34s} " + "  ".join(f"{'adapt ' + a:>26s}" for a in ADAPTS))
    table = {}
    for name, _, _ in RECIPES:
        mine = [r for r in runs if r["recipe"] == name]
        if not mine:
            continue
        cells = []
        for adapt in ADAPTS:
            acc = np.array([r[adapt] for r in mine])
            ab = np.mean([r[adapt] for r in mine if r["train"] == "A"])
            ba = np.mean([r[adapt] for r in mine if r["train"] == "B"])
            table.setdefault(name, {})[adapt] = {"mean": float(acc.mean()), "sd": float(acc.std()),
                                                 "A->B": float(ab), "B->A": float(ba)}
            cells.append(f"{acc.mean():.3f} +- {acc.std():.3f} [{ab:.3f}/{ba:.3f}]")
        print(f"{name:34s} " + "  ".join(f"{c:>26s}" for c in cells))
    print(f"\n{platform.node()}: {platform.processor() or platform.machine()}, "
          f"{time.perf_counter() - t_start:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "table": table, "a": str(args.a),
                                         "b": str(args.b), "backbone": args.backbone}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
