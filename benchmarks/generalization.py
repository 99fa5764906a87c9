"""What a recipe does on music it never saw: grouped cross-validation and a domain shift.

Two checks, each over several seeds, each printing mean, standard deviation and min-max of
clip accuracy beside the linear probe (logistic regression on the mean and standard deviation
over time of every row of the six views) on the same folds:

1. **Grouped K-fold on a real collection** (default ``../shared/data/minigenres`` with its
   ``manifest.csv``): stratified K-fold whose groups are the manifest's artists when every
   genre has at least K of them, else its source tracks (never a random clip split). Per seed
   the folds are drawn anew and every clip is predicted once, by a model that never saw its
   group; the seed's score is that pooled clip accuracy.
2. **Synthetic domain shift** (needs no data): train on the generator's default production,
   test on the same genres rendered with another mix, EQ tilt, tempo range and instrument
   timbres (``synthesize_dataset(domain="shifted")``). A recipe that learns production rather
   than genre falls here.

Usage::

    python benchmarks/generalization.py                       # the default recipe per backbone
    python benchmarks/generalization.py --backbones light resnet18 --seeds 0 1 2
    python benchmarks/generalization.py --recipe "ema:ema=0.99" --recipe "mixup:mixup=0.4"

A ``--recipe NAME:field=value,...`` changes :class:`deepfusion.config.TrainConfig` fields of the
default recipe (``--recipe baseline:`` is the default itself); each is measured on the same
folds and seeds. ``--json FILE`` keeps every number.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from deepfusion.config import FeatureConfig, TrainConfig
from deepfusion.extract import extract
from deepfusion.io.features_file import load_features
from deepfusion.train.crossval import cross_validate

CPU_BACKBONES = ("light",)


def parse_recipe(spec: str) -> tuple[str, dict[str, Any]]:
    """``name:field=value,field=value`` -> (name, TrainConfig overrides)."""
    name, _, body = spec.partition(":")
    types = {f.name: f.type for f in fields(TrainConfig)}
    defaults = TrainConfig()
    overrides: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, _, value = part.partition("=")
        if key.startswith("model."):            # a ModelConfig field, e.g. model.band_stats=1
            overrides.setdefault("model_options", {})[key[6:]] = value.lower() in ("1", "true", "yes")
            continue
        if key not in types:
            raise SystemExit(f"--recipe {spec!r}: {key!r} is not a TrainConfig field")
        current = getattr(defaults, key)
        if value.lower() in ("none", "full"):
            overrides[key] = None
        elif isinstance(current, bool):
            overrides[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(current, int) or key in ("epochs", "batch_size", "patience"):
            overrides[key] = int(value)
        elif isinstance(current, float) or key in ("lr", "segment_seconds"):
            overrides[key] = float(value)
        else:
            overrides[key] = value
    return name or "default", overrides


def artist_or_track_groups(fs, manifest: Path, folds: int) -> tuple[np.ndarray, str]:
    """Group ids per clip: artists when every genre has >= ``folds`` of them, else tracks."""
    with open(manifest, newline="", encoding="utf-8-sig") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    artist = [rows.get(p, {}).get("artist") or f"?{p}" for p in fs.paths]
    enough = all(len({a for a, c in zip(artist, fs.labels) if c == g}) >= folds
                 for g in np.unique(fs.labels))
    if enough:
        ids = {a: i for i, a in enumerate(sorted(set(artist)))}
        return np.array([ids[a] for a in artist], np.int64), "artist"
    return fs.groups, "track (some genre has fewer artists than folds)"


def stats(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "values": [round(x, 4) for x in v]}


def fmt(s: dict[str, float]) -> str:
    return (f"{s['mean']:.3f} +- {s['sd']:.3f}   {s['min']:.3f}-{s['max']:.3f} "
            f"({100 * (s['max'] - s['min']):.1f} pts)")


def run_cv(features: Path, fs, work: Path, *, folds: int, seeds: list[int], config: TrainConfig,
           backbone: str, pretrained: str, model_options: Any = None) -> dict[str, Any]:
    """Pooled clip accuracy per seed of K-fold CV (folds drawn from the seed)."""
    per_seed, per_fold, seconds = [], [], []
    for seed in seeds:
        t0 = time.perf_counter()
        cv = cross_validate(features, folds=folds, model_dir=work / f"s{seed}",
                            config=replace(config, seed=seed), feature_set=fs, fold_seed=seed,
                            backbone=backbone, pretrained=pretrained, quiet=True, overwrite=True,
                            echo=lambda s: None, model_options=model_options)
        per_seed.append(cv.pooled_accuracy)
        per_fold.append([row["clip_accuracy"] for row in cv.folds])
        seconds.append(time.perf_counter() - t0)
        shutil.rmtree(work / f"s{seed}", ignore_errors=True)
    return {"accuracy": stats(per_seed), "fold_accuracy": per_fold,
            "seconds_per_seed": round(float(np.mean(seconds)), 1)}


def shifted_check(work: Path, *, seeds: list[int], recipes: dict[str, TrainConfig],
                  backbone: str, clips: int, duration: float,
                  model_options: Any = None, probe: bool = True) -> dict[str, Any]:
    """Train on default-production synthetic clips, test on shifted-production ones."""
    from deepfusion.evaluate import evaluate
    from deepfusion.synth import synthesize_dataset
    from deepfusion.train.run import train

    config = FeatureConfig(duration=duration)
    sets = {}
    for domain, seed in (("default", 11), ("shifted", 12)):
        sets[domain] = work / f"{domain}.pkl"
        if sets[domain].is_file():           # made for an earlier backbone
            continue
        audio = work / f"synth-{domain}"
        synthesize_dataset(audio, genres=4, clips_per_genre=clips, duration=duration, seed=seed,
                           domain=domain)
        extract(audio, out=sets[domain], cache_dir=work / "cache", config=config, quiet=True)
    results: dict[str, Any] = {}
    runs = dict(recipes)
    if probe:
        runs["linear probe"] = replace(TrainConfig(), model="probe")
    for name, recipe in runs.items():
        in_domain, shifted = [], []
        for seed in seeds:
            out = work / f"shift-{seed}"
            r = train(sets["default"], model_dir=out, config=replace(recipe, seed=seed, val_size=0.2,
                                                                      test_size=0.2),
                      backbone=backbone, pretrained="never", quiet=True, overwrite=True,
                      echo=lambda s: None, model_options=(model_options or {}).get(name))
            in_domain.append(r.test_acc)
            report = evaluate(out / "best.pth", features=sets["shifted"], split="all",
                              echo=lambda s: None)
            shifted.append(report.metrics["accuracy"])
            shutil.rmtree(out, ignore_errors=True)
        results[name] = {"in_domain": stats(in_domain), "shifted": stats(shifted)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--audio-dir", type=Path, default=Path("../shared/data/minigenres"))
    parser.add_argument("--manifest", type=Path, help="default: AUDIO_DIR/manifest.csv")
    parser.add_argument("--features", type=Path, help="an extracted features file instead")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backbones", nargs="+", default=list(CPU_BACKBONES))
    parser.add_argument("--recipe", action="append", default=[],
                        help="NAME:field=value,... (TrainConfig fields); repeatable")
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--no-shift", action="store_true", help="skip the synthetic check")
    parser.add_argument("--no-cv", action="store_true", help="skip the real-collection check")
    parser.add_argument("--shift-clips", type=int, default=12, help="clips per genre")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()

    recipes = dict(parse_recipe(r) for r in args.recipe) or {"default": {}}
    model_options = {name: o.pop("model_options", {}) for name, o in recipes.items()}
    configs = {name: replace(TrainConfig(), **o) for name, o in recipes.items()}
    work = Path(tempfile.mkdtemp(prefix="df-gen-"))
    out: dict[str, Any] = {"folds": args.folds, "seeds": args.seeds, "recipes": recipes}
    t_all = time.perf_counter()
    try:
        if not args.no_cv:
            features = args.features
            manifest = args.manifest or args.audio_dir / "manifest.csv"
            if features is None:
                if not args.audio_dir.is_dir():
                    sys.exit(f"{args.audio_dir}: not found (give --audio-dir or --features, or --no-cv)")
                features = extract(args.audio_dir, out=work / "features.pkl",
                                   cache_dir=Path("data/cache"),
                                   manifest=manifest if manifest.is_file() else None,
                                   config=FeatureConfig(), quiet=True).out
            fs = load_features(features)
            grouping = "track/duplicate groups of the features file"
            if manifest.is_file():
                fs.groups, grouping = artist_or_track_groups(fs, manifest, args.folds)
            print(f"{features}: {len(fs)} clips, {len(fs.class_names)} genres; {args.folds}-fold "
                  f"CV grouped by {grouping}; seeds {args.seeds}")
            print(f"{'recipe':<28} {'mean +- sd':>15}   min-max over seeds     s/seed")
            cv: dict[str, Any] = {}
            for backbone in args.backbones:
                for name, config in configs.items():
                    r = run_cv(features, fs, work, folds=args.folds, seeds=args.seeds,
                               config=config, backbone=backbone, pretrained="auto",
                               model_options=model_options[name])
                    label = f"{backbone} {name}"
                    cv[label] = r
                    print(f"{label:<28} {fmt(r['accuracy'])}   {r['seconds_per_seed']:.0f}", flush=True)
            if not args.no_probe:
                r = run_cv(features, fs, work, folds=args.folds, seeds=args.seeds,
                           config=replace(TrainConfig(), model="probe"), backbone="light",
                           pretrained="never")
                cv["linear probe"] = r
                print(f"{'linear probe':<28} {fmt(r['accuracy'])}   {r['seconds_per_seed']:.0f}")
            out["cv"] = cv
        if not args.no_shift:
            print(f"\nsynthetic domain shift: train on default production, test on shifted "
                  f"({args.shift_clips} clips per genre each, 4 genres, 10 s)")
            print(f"{'recipe':<28} {'in domain (held-out clips)':<40} shifted domain")
            shift = {}
            for i, backbone in enumerate(args.backbones):
                res = shifted_check(work, seeds=args.seeds, recipes=configs, backbone=backbone,
                                    clips=args.shift_clips, duration=10.0,
                                    model_options=model_options,
                                    probe=i == 0 and not args.no_probe)
                for name, r in res.items():
                    label = name if name == "linear probe" else f"{backbone} {name}"
                    shift[label] = r
                    print(f"{label:<28} {fmt(r['in_domain']):<40} {fmt(r['shifted'])}")
            out["shift"] = shift
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["seconds"] = round(time.perf_counter() - t_all, 1)
    print(f"\nwall time {out['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
