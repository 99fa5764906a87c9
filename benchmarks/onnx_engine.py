"""The onnxruntime engine beside torch: install size, start-up time, time per window, agreement.

Prints, from one run:
  * the installed size of onnxruntime and of torch, each with the packages it requires
    (recursively, from the installed distributions' file lists);
  * start-up time of a fresh process: ``import deepfusion.inference.onnx_engine; OnnxEngine(model)``
    against ``load_checkpoint`` + ``model_from_checkpoint`` (wall time of the whole process,
    best of ``--repeats``; an empty ``python -c pass`` for reference), with each process's
    peak resident memory;
  * milliseconds per 30-s window of both engines on the real windows (``OnnxEngine.window_outputs``
    against ``inference.predict_clips``, fp32, 64 segments a batch, the same thread count),
    and of the torch model's forward alone (segments already normalised and batched);
  * the largest probability and attention difference between them over all windows.

Usage: python benchmarks/onnx_engine.py [--features FEATURES] [--checkpoint best.pth]
       [--backbone light] [--audio-dir ../shared/data/minigenres] [--cache-dir /tmp/mg/cache]
Without ``--features`` the features of ``--audio-dir`` are extracted (through the cache);
without ``--checkpoint`` a model of ``--backbone`` is trained for ``--epochs`` epochs on them
(speed does not depend on how well it learned).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------- install size

def _requirements(dist: metadata.Distribution) -> list[str]:
    names = []
    for req in dist.requires or []:
        if "extra ==" in req:      # optional extras are not installed by default
            continue
        marker = req.split(";", 1)[1] if ";" in req else ""
        if marker:
            from packaging.markers import Marker

            if not Marker(marker).evaluate():
                continue
        names.append(re.split(r"[ <>=!~\[;(]", req.strip(), maxsplit=1)[0])
    return names


def installed_size(name: str) -> tuple[int, int, list[str]]:
    """Bytes of distribution ``name`` alone and with everything it requires, and those names."""
    seen: dict[str, int] = {}
    todo = [name]
    while todo:
        key = todo.pop().lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = metadata.distribution(key)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = sum((f.size or 0) for f in dist.files or [])
        todo += _requirements(dist)
    own = seen.get(name.lower(), 0)
    return own, sum(seen.values()), sorted(seen)


# ------------------------------------------------------------------------------------ start-up

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) parent
PEAK = 'print(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])'

ONNX_START = """
from deepfusion.inference.onnx_engine import OnnxEngine
OnnxEngine({model!r}, threads={threads})
import sys
assert "torch" not in sys.modules
print(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""

TORCH_START = """
from deepfusion.models.checkpoint import load_checkpoint, model_from_checkpoint
import torch
torch.set_num_threads({threads})
model_from_checkpoint(load_checkpoint({model!r}))
print(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""


def start_up(code: str, repeats: int) -> tuple[float, float]:
    """Best wall seconds of a fresh ``python -c code`` and its peak RSS in MiB."""
    best, rss = float("inf"), 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=REPO, check=True)
        best = min(best, time.perf_counter() - t0)
        rss = float(proc.stdout.split()[-1]) / 1024 if proc.stdout.strip() else 0.0
    return best, rss


# ----------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--backbone", default="light")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--audio-dir", type=Path, default=REPO.parent / "shared/data/minigenres")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/mg/cache"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="threads of both engines (default torch's)")
    args = ap.parse_args()

    import torch

    from deepfusion.config import TrainConfig
    from deepfusion.export import export_onnx
    from deepfusion.inference.clips import predict_clips
    from deepfusion.inference.onnx_engine import OnnxEngine
    from deepfusion.io.features_file import load_features
    from deepfusion.metrics import softmax
    from deepfusion.models.checkpoint import (load_checkpoint, model_from_checkpoint,
                                              normalization_of)
    from deepfusion.views import FEATURE_KEYS

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    features = args.features
    if features is None:
        from deepfusion.extract import extract

        manifest = args.audio_dir / "manifest.csv"
        features = extract(args.audio_dir, out=work / "features.pkl", cache_dir=args.cache_dir,
                           manifest=manifest if manifest.is_file() else None, quiet=True).out
    checkpoint = args.checkpoint
    if checkpoint is None:
        from deepfusion.train.run import train

        t0 = time.perf_counter()
        train(features, model_dir=work / "model", backbone=args.backbone, pretrained=False,
              quiet=True, echo=lambda s: None, config=TrainConfig(epochs=args.epochs))
        checkpoint = work / "model" / "best.pth"
        print(f"trained {args.backbone} for {args.epochs} epochs in {time.perf_counter() - t0:.0f} s")

    ckpt = load_checkpoint(checkpoint)
    fs = load_features(features, class_names=list(ckpt["class_names"]))
    n = len(fs)
    windows = {k: np.asarray(fs.arrays[k], np.float32) for k in FEATURE_KEYS}
    model_file = work / "model.onnx"
    t0 = time.perf_counter()
    result = export_onnx(checkpoint, model_file, check_windows={k: v[:8] for k, v in windows.items()},
                         echo=lambda s: None)
    export_s = time.perf_counter() - t0

    print(f"\nmodel: {ckpt['model_config'].get('backbone')} {ckpt['model_config'].get('kind', 'net')}, "
          f"{n} real windows of {fs.n_frames} frames, {len(fs.class_names)} genres, "
          f"{threads} threads; onnxruntime {__import__('onnxruntime').__version__}, torch {torch.__version__}")
    print(f"export: {result.exporter} exporter, opset {result.opset}, {result.size_bytes / 2**20:.1f} MiB "
          f"ONNX vs {checkpoint.stat().st_size / 2**20:.1f} MiB checkpoint, {export_s:.1f} s with its check")

    print("\ninstalled size (MiB)            alone   with requirements")
    for name in ("onnxruntime", "torch"):
        own, total, names = installed_size(name)
        print(f"  {name:<28} {own / 2**20:7.0f}   {total / 2**20:9.0f}  ({len(names)} distributions)")

    print(f"\nstart-up of a fresh process (best of {args.repeats}, wall)   seconds   peak RSS MiB")
    onnx_code = ONNX_START.format(model=str(model_file), threads=threads)
    torch_code = TORCH_START.format(model=str(checkpoint), threads=threads)
    for label, code in (("python -c pass", PEAK), ("onnx: import + OnnxEngine(model)", onnx_code),
                        ("torch: load_checkpoint + model", torch_code)):
        seconds, rss = start_up(code, args.repeats)
        print(f"  {label:<44} {seconds:7.2f}   {rss:10.0f}")

    engine = OnnxEngine(model_file, threads=threads)
    model = model_from_checkpoint(ckpt)
    norm = normalization_of(ckpt)
    seg = engine.segment_frames
    clips = np.arange(n)
    engine.window_outputs({k: v[:8] for k, v in windows.items()})       # warm-up of both
    predict_clips(model, fs, norm, clips[:8], seg=seg, batch_size=64)
    t0 = time.perf_counter()
    onnx_out = engine.window_outputs(windows)
    per = {"onnxruntime": (time.perf_counter() - t0) / n * 1000}
    t0 = time.perf_counter()
    ref = predict_clips(model, fs, norm, clips, seg=seg, batch_size=64, embeddings=True)
    per["torch (predict_clips)"] = (time.perf_counter() - t0) / n * 1000
    # the torch model alone, on segments already normalised and batched: what is the network
    x = {k: torch.from_numpy((windows[k][:16, :, :seg] - norm[k]["mean"][:, None])
                             / norm[k]["std"][:, None]).float() for k in FEATURE_KEYS}
    x = {k: v.repeat(4, 1, 1) for k, v in x.items()}     # 64 segments, one batch
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(3):
            model(x)
    segments = fs.n_frames // seg
    per["torch model forward only"] = (time.perf_counter() - t0) / 3 / 64 * segments * 1000
    print(f"\nper 30-s window ({segments} segments of {seg} frames), one pass over {n} after a warm-up")
    for name, ms in per.items():
        print(f"  {name:<26} {ms:8.1f} ms")
    print(f"  torch (predict_clips) / onnxruntime: {per['torch (predict_clips)'] / per['onnxruntime']:.2f}x")
    prob = np.abs(softmax(onnx_out["logits"]) - ref.probabilities()).max()
    att = np.abs(onnx_out["attention"] - ref.attention).max()
    agree = (onnx_out["logits"].argmax(1) == ref.predicted).mean()
    print(f"\nagreement over {n} windows: max probability difference {prob:.2e}, "
          f"max attention difference {att:.2e}, same top genre {agree:.0%}")
    print(f"(export check on 8 windows: max probability difference {result.max_prob_diff:.2e})")


if __name__ == "__main__":
    main()
