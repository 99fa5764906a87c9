"""Past one machine: extraction on joblib against Dask, training on 1 process against torchrun,
the store's bytes per clip, and the FMA-full projection they give. Ratios from one run.

* extraction throughput (clips/s) on the same clips, each run from an empty cache: joblib with
  1 and 2 jobs, Dask LocalCluster with 1 and 2 workers (``--scheduler local:N``);
* training samples/s of the light backbone (3-s segments): 1 process against
  ``torchrun --nproc_per_node 2`` on the CPU (gloo), from the epochs after the first;
* bytes per clip of a feature store in float32 and float16;
* the FMA-full projection (106,574 clips of 30 s): core-hours to extract from the measured
  per-clip cost of one worker, store size, and epochs per hour per GPU for the ResNet-50 design
  (a projection: FLOPs per segment counted here, an assumed GPU throughput).

Usage:
    python benchmarks/scale.py                          # minigenres if present, else synthetic
    python benchmarks/scale.py --audio-dir DIR --clips 40
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deepfusion.testing import cli_command, subprocess_env

MINIGENRES = Path(__file__).resolve().parents[2] / "shared" / "data" / "minigenres"
FMA_FULL = 106_574
#: assumed sustained throughput of one data-centre GPU on this network's convolutions
#: (bf16/fp16 tensor cores at about a third of an A100's 312 TFLOP/s peak)
GPU_FLOPS = 100e12


def _run(args: list, **env: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=subprocess_env(**env), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def pick_clips(source: Path | None, n: int, work: Path) -> Path:
    """``n`` clips in GTZAN layout (hard links into ``work``): from ``source``, or synthetic."""
    root = work / "audio"
    if source is not None and source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".ogg", ".wav", ".mp3", ".flac"))
        step = max(1, len(files) // n)
        for path in files[::step][:n]:
            target = root / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
        return root
    from deepfusion.synth import synthesize_dataset

    synthesize_dataset(root, genres=4, clips_per_genre=max(1, n // 4), duration=30.0, seed=0)
    return root


def extraction(audio: Path, work: Path) -> dict[str, float]:
    """Clips per second for each engine, each from an empty cache."""
    n = sum(1 for _ in audio.rglob("*.*"))
    rates = {}
    for name, extra in (("joblib, 1 job", ["--jobs", "1"]), ("joblib, 2 jobs", ["--jobs", "2"]),
                        ("Dask, 1 local worker", ["--scheduler", "local:1"]),
                        ("Dask, 2 local workers", ["--scheduler", "local:2"])):
        tag = name.replace(" ", "").replace(",", "-")
        seconds = _run(cli_command("extract", "--audio-dir", audio, "--out", work / tag / "f.pkl",
                                   "--cache-dir", work / tag / "cache", "--quiet", *extra))
        rates[name] = n / seconds
        print(f"  {name:<24} {n} clips in {seconds:6.1f} s = {n / seconds:5.2f} clips/s", flush=True)
    return rates


def training(features: Path, work: Path, epochs: int = 3) -> dict[str, float]:
    """Training samples (segments) per second, epochs after the first, 1 vs 2 processes."""
    common = ["--features", features, "--backbone", "light", "--no-pretrained", "--epochs",
              str(epochs), "--batch-size", "8", "--val-size", "0.2", "--test-size", "0",
              "--patience", "100", "--quiet"]
    rates = {}
    for name, prefix in (("1 process", [sys.executable, "-m", "deepfusion"]),
                         ("torchrun, 2 processes", [sys.executable, "-m", "torch.distributed.run",
                                                    "--standalone", "--nproc_per_node", "2",
                                                    "-m", "deepfusion"])):
        model_dir = work / ("m1" if name.startswith("1") else "m2")
        _run([*prefix, "train", *common, "--model-dir", model_dir, "--overwrite"],
             OMP_NUM_THREADS="1")
        with open(model_dir / "training_history.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        n_train = _train_clips(model_dir)
        seconds = sum(float(r["seconds"]) for r in rows[1:])
        rates[name] = n_train * (len(rows) - 1) / seconds
        print(f"  {name:<24} {rates[name]:6.1f} samples/s ({n_train} segments per epoch, "
              f"{len(rows) - 1} epochs timed)", flush=True)
    return rates


def _train_clips(model_dir: Path) -> int:
    import torch

    ckpt = torch.load(model_dir / "best.pth", weights_only=True)
    return len(ckpt["split"]["train"])


def store_bytes(audio: Path, work: Path) -> dict[str, float]:
    sizes = {}
    n = sum(1 for _ in audio.rglob("*.*"))
    for dtype in ("float32", "float16"):
        out = work / f"{dtype}.store"
        _run(cli_command("extract", "--audio-dir", audio, "--out", out, "--format", "store",
                         "--dtype", dtype, "--cache-dir", work / "joblib-2jobs" / "cache",
                         "--quiet"))
        sizes[dtype] = sum(f.stat().st_size for f in out.rglob("*.npy")) / n
    return sizes


def resnet50_flops() -> float:
    """Training FLOPs of one 3-s segment through the ResNet-50 design (forward x 3)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from deepfusion.config import FeatureConfig, ModelConfig
    from deepfusion.data.dataset import segment_frames
    from deepfusion.models.net import MultiModalNet
    from deepfusion.views import FEATURE_KEYS

    fc = FeatureConfig()
    seg = segment_frames(3.0, fc, fc.n_frames)
    model = MultiModalNet(ModelConfig(n_classes=10)).eval()
    shapes = fc.feature_shapes()
    x = {k: torch.zeros(1, shapes[k][0], seg) for k in FEATURE_KEYS}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return 3.0 * counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--audio-dir", type=Path, default=MINIGENRES)
    parser.add_argument("--clips", type=int, default=40)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="df-scale-"))
    try:
        audio = pick_clips(args.audio_dir, args.clips, work)
        n = sum(1 for _ in audio.rglob("*.*"))
        print(f"{n} clips from {args.audio_dir if args.audio_dir.is_dir() else 'the synthetic generator'}")
        print("extraction ...", flush=True)
        extract_rates = extraction(audio, work)
        print("training ...", flush=True)
        train_rates = training(work / "joblib-2jobs" / "f.pkl", work)
        print("store ...", flush=True)
        sizes = store_bytes(audio, work)
        flops = resnet50_flops()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    one = extract_rates["joblib, 1 job"]
    print("\n" + "-" * 78)
    for name, rate in extract_rates.items():
        print(f"extract  {name:<24} {rate:6.2f} clips/s   x{rate / one:4.2f} vs joblib 1 job")
    base = train_rates["1 process"]
    for name, rate in train_rates.items():
        print(f"train    {name:<24} {rate:6.1f} samples/s x{rate / base:4.2f} vs 1 process")
    for dtype, size in sizes.items():
        print(f"store    {dtype:<24} {size / 2**20:6.2f} MB per clip")
    core_seconds = 1.0 / one
    print("-" * 78)
    print(f"FMA-full projection ({FMA_FULL:,} clips of 30 s):")
    print(f"  extraction   {core_seconds:.2f} core-s per clip -> {FMA_FULL * core_seconds / 3600:,.1f} "
          "core-hours (measured per-clip cost of one worker)")
    for dtype, size in sizes.items():
        print(f"  store        {FMA_FULL * size / 2**30:,.0f} GiB in {dtype}")
    segments = FMA_FULL * 0.8             # one 3-s segment per training clip per epoch
    hours = segments * flops / GPU_FLOPS / 3600
    print(f"  training     ResNet-50 design: {flops / 1e9:.1f} GFLOP per 3-s segment (fwd+bwd); "
          f"at an assumed {GPU_FLOPS / 1e12:.0f} TFLOP/s sustained, {1 / hours:,.1f} epochs per "
          "hour per GPU (PROJECTION, not measured: no GPU here; input pipeline assumed to keep up)")


if __name__ == "__main__":
    main()
