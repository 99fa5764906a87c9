"""The Python parts of ``benchmarks/gpu_check.sh``: each sub-command checks one thing and
appends one row (``step<TAB>result<TAB>seconds``) to the results file the script prints as
one table at the end.

Sub-commands (``python benchmarks/gpu_check.py CMD --help``):
  probe DEVICE                     device, compute capability, memory and the precision --amp
                                   chooses; exit status 3 when there is no GPU
  summary RESULTS STEP RUN_DIR     a training run: epochs, seconds per epoch, validation and
                                   test accuracy, the loss scale of an fp16 run
  same RESULTS STEP DIR_A DIR_B    whether two runs' best.pth weights are identical
  compare RESULTS STEP CKPT DIR... predictions.csv of several evaluate runs against the first,
                                   and their accuracy against the one train stored
  views RESULTS STEP CPU_PKL GPU_PKL
                                   the largest |gpu - cpu| per view of two features files of
                                   the same clips (extract --backend torch on the GPU against
                                   the numpy backend), beside the tolerance the shared
                                   cache key rests on (deepfusion.features.torch_views.TOLERANCE);
                                   exit status 1 when a view is over it
  hidden RESULTS STEP CKPT         run with CUDA hidden: the checkpoint loads with
                                   torch.load(weights_only=True), every tensor on the CPU
  contexts RESULTS STEP FEATURES DIR DEVICE
                                   a 1-epoch light run in this process on DEVICE, then which
                                   GPUs hold a CUDA context (a cpu run: none; cuda:1: only 1)
  memory RESULTS DEVICE            peak memory (torch.cuda.max_memory_allocated) and speed of
                                   resnet50 training steps at the default 3-s crop and at
                                   whole 30-s clips, beside deepfusion's estimate
  table RESULTS                    the table; exit status 1 when a row is a failure
                                   (FAILED) or over a tolerance (OVER), so that the script
                                   that ends with it fails too
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

GIB = 2**30
#: How a result over its tolerance begins its verdict (:func:`table` counts it as a failure).
OVER = "OVER the tolerance"


def _record(results: str, step: str, result: str, seconds: float | str = "") -> None:
    seconds = f"{seconds:.1f}" if isinstance(seconds, float) else seconds
    with open(results, "a", encoding="utf-8") as fh:
        fh.write(f"{step}\t{' '.join(result.split())}\t{seconds}\n")


def probe(args) -> int:
    import torch

    from deepfusion.errors import DeepFusionError
    from deepfusion.runtime.device import device_capability, precision_for, resolve_device

    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        print(f"no GPU: CUDA is not available to torch {torch.__version__} here (its CUDA: "
              f"{built}); nothing to check. Run this on a machine with an NVIDIA GPU.")
        return 3
    try:
        device = resolve_device(args.device)
    except DeepFusionError as exc:
        print(f"no GPU to check: {exc}")
        return 3
    props = torch.cuda.get_device_properties(device)
    cap = device_capability(device)
    print(f"{device} {props.name}, compute capability {cap[0]}.{cap[1]}, "
          f"{props.total_memory / GIB:.0f} GiB, {torch.cuda.device_count()} visible; torch "
          f"{torch.__version__} (CUDA {torch.version.cuda}); --amp -> {precision_for(device)}")
    print("bf16=yes" if cap >= (8, 0) else "bf16=no")
    print(f"gpus={torch.cuda.device_count()}")
    return 0


def summary(args) -> int:
    import csv

    import torch

    run = Path(args.run)
    rows = list(csv.DictReader(open(run / "training_history.csv")))
    best = torch.load(run / "best.pth", weights_only=True)
    last = torch.load(run / "last.pth", weights_only=True)
    seconds = [float(r["seconds"]) for r in rows]
    per_epoch = sum(seconds[1:]) / max(1, len(seconds) - 1) if len(seconds) > 1 else seconds[0]
    test = best["metrics"].get("test", {})
    scale = last["scaler_state"].get("scale") if last["scaler_state"] else None
    text = (f"{len(rows)} epochs, {per_epoch:.1f} s/epoch after the first ({seconds[0]:.1f} s); "
            f"val acc {float(rows[-1]['val_acc']):.3f}, test acc {test.get('clip_acc', float('nan')):.3f}"
            + (f"; loss scale {scale:g}" if scale else "; no loss scaling"))
    _record(args.results, args.step, text, sum(seconds))
    return 0


def same(args) -> int:
    import torch

    a, b = (torch.load(Path(d) / "best.pth", weights_only=True)["model_state"] for d in (args.a, args.b))
    diff = max(float((a[k].double() - b[k].double()).abs().max()) if a[k].is_floating_point()
               else float((a[k] != b[k]).any()) for k in a)
    _record(args.results, args.step, "identical weights" if diff == 0 else
            f"weights differ (max |diff| {diff:.3g})")
    return 0


def compare(args) -> int:
    import numpy as np
    import pandas as pd
    import torch

    stored = torch.load(args.checkpoint, weights_only=True)["metrics"].get("test", {}).get("clip_acc")
    tables = [pd.read_csv(Path(d) / "predictions.csv") for d in args.dirs]
    reports = [json.loads((Path(d) / "evaluation.json").read_text()) for d in args.dirs]
    first = tables[0]
    probs = [c for c in first.columns if c.startswith("p_")]
    parts = []
    for d, t, r in zip(args.dirs[1:], tables[1:], reports[1:]):
        agree = int((t["predicted_genre"] == first["predicted_genre"]).sum())
        gap = float(np.abs(t[probs].to_numpy() - first[probs].to_numpy()).max())
        parts.append(f"{r.get('device')} {r.get('precision')} vs {reports[0].get('device')} "
                     f"{reports[0].get('precision')}: {agree}/{len(t)} same genre, max |p diff| {gap:.2g}")
    accs = ", ".join(f"{r.get('device')} {r.get('precision')} {r['metrics']['accuracy']:.3f}" for r in reports)
    _record(args.results, args.step, "; ".join(parts) + f"; accuracy: stored by train "
            f"{stored if stored is None else f'{stored:.3f}'}, evaluate {accs}")
    return 0


def views(args) -> int:
    import numpy as np

    from deepfusion.features.torch_views import TOLERANCE as tolerance
    from deepfusion.io.features_file import load_features

    cpu, gpu = load_features(Path(args.cpu)), load_features(Path(args.gpu))
    order = {p: i for i, p in enumerate(gpu.paths)}
    rows = [order[p] for p in cpu.paths]
    parts, over = [], []
    for k in cpu.keys:
        diff = float(np.abs(cpu.arrays[k] - gpu.arrays[k][rows]).max())
        parts.append(f"{k} {diff:.2g}")
        if diff > tolerance[k]:
            over.append(k)
    verdict = ("within the tolerances the shared cache key rests on" if not over
               else f"{OVER} the shared cache key rests on: {', '.join(over)}")
    _record(args.results, args.step, f"{len(rows)} clips: " + ", ".join(parts) + f"; {verdict}")
    if over:
        print(f"{args.step}: {OVER}: " + ", ".join(f"{k} (at most {tolerance[k]:g})" for k in over))
        return 1
    return 0


def hidden(args) -> int:
    import torch

    from deepfusion.models.checkpoint import load_checkpoint, model_from_checkpoint

    assert not torch.cuda.is_available(), "run with CUDA_VISIBLE_DEVICES="
    raw = torch.load(args.checkpoint, weights_only=True)        # no map_location
    tensors = []

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
    walk(raw)
    devices = sorted({t.device.type for t in tensors})
    model_from_checkpoint(load_checkpoint(Path(args.checkpoint)))
    _record(args.results, args.step, f"torch.load(weights_only=True) with CUDA hidden: "
            f"{len(tensors)} tensors on {', '.join(devices)}; load_checkpoint and the model: ok")
    return 0


def contexts(args) -> int:
    import torch

    from deepfusion.config import RuntimeConfig, TrainConfig
    from deepfusion.train.run import train

    t0 = time.perf_counter()
    train(Path(args.features), model_dir=Path(args.dir), backbone="light", pretrained=False,
          quiet=True, overwrite=True, echo=lambda s: None,
          config=TrainConfig(epochs=1, batch_size=16, val_size=0.2, test_size=0.2),
          runtime=RuntimeConfig(device=args.device))
    held = []
    for i in range(torch.cuda.device_count()):
        try:
            if torch._C._cuda_hasPrimaryContext(i):
                held.append(f"cuda:{i}")
        except Exception:  # noqa: BLE001 - a driver not yet initialised holds no context
            pass
    _record(args.results, args.step, f"--device {args.device}: CUDA initialised by torch "
            f"{'yes' if torch.cuda.is_initialized() else 'no'}; CUDA contexts on "
            f"{', '.join(held) or 'no GPU'}", time.perf_counter() - t0)
    return 0


def _step_memory(device, *, backbone: str, frames: int, batch: int, precision: str):
    """Peak bytes and samples/s of resnet training steps as train runs them."""
    import torch

    from deepfusion.config import FeatureConfig, ModelConfig
    from deepfusion.models.net import MultiModalNet
    from deepfusion.runtime.device import autocast_for, backend_settings
    from deepfusion.views import FEATURE_KEYS

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    model = MultiModalNet(ModelConfig(n_classes=10, backbone=backbone))
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = x = y = None
    times = []
    try:
        model.to(device).to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        rows = {k: r for k, (r, _) in FeatureConfig().feature_shapes().items() if k in FEATURE_KEYS}
        x = {k: torch.randn(batch, r, frames, device=device) for k, r in rows.items()}
        y = torch.randint(0, 10, (batch,), device=device)
        with backend_settings(device):
            for step in range(5):
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                with autocast_for(device, precision):
                    loss = torch.nn.functional.cross_entropy(model(x)["logits"].float(), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                torch.cuda.synchronize(device)
                if step >= 2:
                    times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) - base
        return peak, batch / (sum(times) / len(times)), n_params
    finally:
        del model, optimizer, x, y
        torch.cuda.empty_cache()


def memory(args) -> int:
    import torch

    from deepfusion.runtime.device import precision_for, resolve_device
    from deepfusion.runtime.memory import estimate_training_bytes

    device = resolve_device(args.device)
    precision = precision_for(device)
    total = torch.cuda.get_device_properties(device).total_memory
    for backbone, frames, batch, what in (("resnet50", 129, 16, "3-s crops"),
                                          ("resnet50", 1292, 16, "30-s clips"),
                                          ("resnet50", 1292, 64, "30-s clips")):
        step = f"peak memory {backbone} {what} batch {batch} {precision}"
        n_params = 73_345_995   # resnet50 x 3 branches, 10 classes (replaced by the real count)
        estimate = estimate_training_bytes(backbone, n_mels=128, frames=frames, batch_size=batch,
                                           precision=precision, n_params=n_params)
        if estimate > 0.9 * total:
            _record(args.results, step, f"skipped: estimated {estimate / GIB:.1f} GiB > 90% of "
                    f"{total / GIB:.0f} GiB (train warns before such a run)")
            continue
        t0 = time.perf_counter()
        try:
            peak, rate, n_params = _step_memory(device, backbone=backbone, frames=frames,
                                                batch=batch, precision=precision)
        except torch.OutOfMemoryError:
            peak = None
        if peak is None:   # outside the except: its traceback no longer holds the tensors
            torch.cuda.empty_cache()
            _record(args.results, step, f"out of memory (estimated {estimate / GIB:.1f} GiB of "
                    f"{total / GIB:.0f})", time.perf_counter() - t0)
            continue
        estimate = estimate_training_bytes(backbone, n_mels=128, frames=frames, batch_size=batch,
                                           precision=precision, n_params=n_params)
        _record(args.results, step, f"measured {peak / GIB:.2f} GiB, estimated "
                f"{estimate / GIB:.2f} GiB (ratio {estimate / max(peak, 1):.2f}); "
                f"{rate:.0f} samples/s", time.perf_counter() - t0)
    return 0


def table(args) -> int:
    rows = [line.rstrip("\n").split("\t") for line in open(args.results, encoding="utf-8")
            if line.strip()]
    rows = [(r + ["", "", ""])[:3] for r in rows]
    width = max(len("check"), *(len(r[0]) for r in rows))
    print()
    print(f"{'check':<{width}}  {'s':>6}  result")
    print(f"{'-' * width}  {'-' * 6}  {'-' * 40}")
    for step, result, seconds in rows:
        print(f"{step:<{width}}  {seconds:>6}  {result}")
    failed = [step for step, result, _ in rows if result.startswith("FAILED") or OVER in result]
    if failed:
        print(f"\n{len(failed)} of {len(rows)} checks failed or are over a tolerance: "
              + "; ".join(failed))
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    # sub-command: (function, its positional arguments; "+" after a name takes several)
    commands = {
        "probe": (probe, ["device"]),
        "summary": (summary, ["results", "step", "run"]),
        "same": (same, ["results", "step", "a", "b"]),
        "compare": (compare, ["results", "step", "checkpoint", "dirs+"]),
        "views": (views, ["results", "step", "cpu", "gpu"]),
        "hidden": (hidden, ["results", "step", "checkpoint"]),
        "contexts": (contexts, ["results", "step", "features", "dir", "device"]),
        "memory": (memory, ["results", "device"]),
        "table": (table, ["results"]),
    }
    for name, (fn, positional) in commands.items():
        p = sub.add_parser(name)
        for arg in positional:
            if arg.endswith("+"):
                p.add_argument(arg[:-1], nargs="+")
            else:
                p.add_argument(arg)
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
