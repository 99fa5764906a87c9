"""The measurement behind train's default backbone per device (issue 22, section 2).

For each backbone, on one real collection (default: the shipped minigenres corpus, 80 clips of
30 s), run ``deepfusion train`` as a user would, for ``--epochs`` epochs with checkpoints after
every epoch, under ``/usr/bin/time -v``, and print one table:

  * the plan line's estimate of seconds per epoch (timed before the first epoch) against the
    measured seconds of the epochs after the first;
  * the whole auto recipe's time projected from the measured epochs (auto epochs x seconds);
  * peak resident memory of the process;
  * the size of ``best.pth`` and ``last.pth``, and what the auto recipe writes in all with a
    checkpoint after every epoch (the old policy) against ``--save-every`` 300 s (the default:
    one write per 5 minutes of training and one at the end).

The default (``deepfusion.backbones.DEFAULT_BACKBONES``) is light on a CPU; the table says what a
ResNet costs here. Accuracy of the recipes across collections is ``benchmarks/cross_source.py``'s.

Usage: python benchmarks/default_recipe.py [--audio-dir DIR] [--work DIR]
           [--backbones light resnet18 resnet50] [--epochs 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from deepfusion.train.recipe import recipe_defaults

HERE = Path(__file__).resolve().parent
SAVE_EVERY = 300.0


def _run(cmd: list[str]) -> tuple[str, float]:
    """stdout+stderr of ``cmd`` under /usr/bin/time -v, and its peak RSS in GiB."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return proc.stdout + proc.stderr, int(rss.group(1)) / 2**20 if rss else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio-dir", type=Path, default=HERE.parent.parent / "shared" / "data"
                        / "minigenres")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=HERE.parent / "data" / "cache")
    parser.add_argument("--backbones", nargs="+", default=["light", "resnet18", "resnet50"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="default-recipe-"))
    work.mkdir(parents=True, exist_ok=True)
    features = work / "features.pkl"
    if not features.exists():
        _run(["deepfusion", "extract", "--audio-dir", str(args.audio_dir), "--out", str(features),
              "--cache-dir", str(args.cache_dir), "--quiet"])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"device {args.device}; load average at start {os.getloadavg()[0]:.2f}")
    print(f"collection: {args.audio_dir} ({features})")
    rows = []
    for backbone in args.backbones:
        model_dir = work / backbone
        shutil.rmtree(model_dir, ignore_errors=True)
        out, rss = _run(["deepfusion", "train", "--features", str(features), "--model-dir",
                         str(model_dir), "--backbone", backbone, "--epochs", str(args.epochs),
                         "--no-pretrained", "--device", args.device, "--save-every", "0",
                         "--quiet"])
        plan = re.search(r"^training .* about .*\(([\d.]+) s a batch", out, re.M)
        batches = re.search(r"epochs? of (\d+) batch", out)
        with open(model_dir / "training_history.csv", newline="") as fh:
            seconds = [float(r["seconds"]) for r in csv.DictReader(fh)]
        later = seconds[1:] or seconds
        per_epoch = sum(later) / len(later)
        auto_epochs = recipe_defaults(backbone, False)["epochs"]
        total = per_epoch * auto_epochs
        best = (model_dir / "best.pth").stat().st_size / 2**20
        last = (model_dir / "last.pth").stat().st_size / 2**20
        writes_old = auto_epochs * (best + last) / 1024
        writes_new = (math.floor(total / SAVE_EVERY) + 1) * (best + last) / 1024
        rows.append((backbone, plan.group(1) if plan else "?", batches.group(1) if batches else "?",
                     per_epoch, auto_epochs, total, rss, best, last, writes_old, writes_new))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print()
    print("| backbone | timed step (s a batch) | batches | measured s/epoch (after the first) "
          "| auto epochs | projected run | peak RSS | best.pth | last.pth "
          "| written per run, every epoch | written per run, every 300 s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (b, step, n, per_epoch, epochs, total, rss, best, last, old, new) in rows:
        print(f"| {b} | {step} | {n} | {per_epoch:.1f} | {epochs} | {total / 60:.1f} min "
              f"| {rss:.2f} GiB | {best:.1f} MiB | {last:.1f} MiB | {old:.2f} GiB | {new:.2f} GiB |")
    light = next((r for r in rows if r[0] == "light"), None)
    if light:
        for r in rows:
            if r[0] != "light":
                print(f"{r[0]}: {r[3] / light[3]:.1f}x light's seconds per epoch, "
                      f"{r[6] / light[6]:.1f}x its peak memory")


if __name__ == "__main__":
    main()
