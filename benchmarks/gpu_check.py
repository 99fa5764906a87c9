"""The Python parts of ``benchmarks/gpu_check.sh``: each sub-command measures or checks
something and appends rows (``check<TAB>result<TAB>seconds``) to the results file that the
script prints at the end as one markdown table. Progress goes to stderr.

Sub-commands (``python benchmarks/gpu_check.py CMD --help``):
  probe DEVICE                     the machine (CPU model and cores, GPU name and memory or
                                   "no GPU", torch and onnxruntime versions, date) in one
                                   line, then device=, gpus= and precisions= lines; DEVICE
                                   'auto' is cuda:0 where torch sees a GPU, else the CPU;
                                   exit status 2 when a named device is not there
  extract RESULTS DEVICE WORK      clips/s of extract (Python API, a fresh cache per run, each
                                   run after an untimed warm-up of the same settings on other
                                   clips): the numpy backend with all cores, and the torch
                                   backend on DEVICE with 1, 2, 4, ... decode workers up to the
                                   core count, with the device's busy share where extract
                                   reports it; then the views of the two backends compared
  grid RESULTS DEVICE              training throughput (segments/s of train's own step,
                                   train_one_epoch) and peak memory (GPU:
                                   torch.cuda.max_memory_allocated; CPU: the peak RSS of one
                                   process per cell) of light/resnet18/resnet50 at
                                   fp32/bf16/fp16 and batch 16-128; cells a device cannot run
                                   or the budget leaves out are rows saying why
  cell DEVICE BACKBONE PRECISION BATCH FRAMES STEPS WARMUP
                                   one cell of the grid in this process; prints its JSON
  predict RESULTS DEVICE CKPT ONNX AUDIO CACHE
                                   clips/s of predict's Library with the torch engine on DEVICE
                                   and the onnx engine (onnxruntime's own provider: CUDA where
                                   this onnxruntime has it), features cached, outputs not; and
                                   how far the two engines' answers are apart
  summary RESULTS STEP RUN_DIR     a training run: epochs, seconds per epoch, validation and
                                   test accuracy, the loss scale of an fp16 run
  same RESULTS STEP DIR_A DIR_B    whether two runs' best.pth weights are identical
  compare RESULTS STEP CKPT DIR... predictions.csv of several evaluate runs against the first,
                                   and their accuracy against the one train stored
  views RESULTS STEP CPU_PKL GPU_PKL
                                   the largest |torch - numpy| per view of two features files
                                   of the same clips, beside the tolerance the shared cache key
                                   rests on (deepfusion.features.torch_views.TOLERANCE); exit
                                   status 1 when a view is over it
  hidden RESULTS STEP CKPT         run with CUDA hidden: the checkpoint loads with
                                   torch.load(weights_only=True), every tensor on the CPU
  contexts RESULTS STEP FEATURES DIR DEVICE
                                   a 1-epoch light run in this process on DEVICE, then which
                                   GPUs hold a CUDA context (a cpu run: none; cuda:1: only 1)
  table RESULTS HEADER             the table (markdown, the machine line above it); exit status
                                   1 when a row is a failure (FAILED) or over a tolerance
                                   (OVER), so that the script that ends with it fails too

Sizes and budgets come from the environment (defaults in brackets: GPU / CPU):
  GPU_CHECK_CLIPS         clips of 30 s that extract and predict time [64 / 16]
  GPU_CHECK_GRID          backbone:batch,batch... cells [all three at 16,32,64,128 /
                          light:16,32 resnet18:16 resnet50:16]
  GPU_CHECK_PRECISIONS    [fp32 bf16 fp16]; those the device lacks are rows saying so
  GPU_CHECK_FULL          whole 30-s clips, at the precision --amp chooses [resnet50:16,64 / none]
  GPU_CHECK_STEPS         timed steps per cell [3 / 5]; GPU_CHECK_WARMUP untimed first [2 / 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
#: How a result over its tolerance begins its verdict (:func:`table` counts it as a failure).
OVER = "OVER the tolerance"
#: The reason of every figure only a GPU gives.
NO_GPU = "not measured (no GPU)"
BACKBONES = ("light", "resnet18", "resnet50")
PRECISIONS = ("fp32", "bf16", "fp16")
BATCHES = (16, 32, 64, 128)
#: Defaults of the grid's environment, (GPU, CPU); the CPU's is reduced for 2 slow cores.
DEFAULTS = {
    "GPU_CHECK_CLIPS": ("64", "16"),
    "GPU_CHECK_GRID": (" ".join(f"{b}:16,32,64,128" for b in BACKBONES),
                       "light:16,32 resnet18:16 resnet50:16"),
    "GPU_CHECK_PRECISIONS": ("fp32 bf16 fp16", "fp32 bf16 fp16"),
    "GPU_CHECK_FULL": ("resnet50:16,64", ""),
    "GPU_CHECK_STEPS": ("3", "5"),
    "GPU_CHECK_WARMUP": ("2", "2"),
}
HERE = Path(__file__).resolve().parent
#: Timed predict runs per engine (the median is the figure).
REPEATS = 3


def setting(name: str, device_type: str) -> str:
    """The environment's ``name``, else its default for a GPU or for the CPU."""
    return os.environ.get(name, DEFAULTS[name][device_type != "cuda"])


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _record(results: str, step: str, result: str, seconds: float | str = "") -> None:
    seconds = f"{seconds:.1f}" if isinstance(seconds, float) else seconds
    with open(results, "a", encoding="utf-8") as fh:
        fh.write(f"{step}\t{' '.join(result.split())}\t{seconds}\n")


def _failed(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"FAILED: {type(exc).__name__}: {text}"


class Budget:
    """Seconds a section may take; a measurement that would start after them is a row saying
    so (one that started runs to its end)."""

    def __init__(self, seconds: float, section: str):
        self.seconds, self.section, self.start = seconds, section, time.perf_counter()

    def spent(self) -> bool:
        return time.perf_counter() - self.start >= self.seconds

    def reason(self) -> str:
        return f"not measured (the {self.section} section's budget of {self.seconds:.0f} s was spent)"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------- probe

def _memory_gib() -> str:
    try:
        with open("/proc/meminfo") as fh:
            kib = int(fh.readline().split()[1])
        return f"{kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        return "RAM unknown"


def _onnxruntime() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime not installed"
    return f"onnxruntime {onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"


def probe(args) -> int:
    import torch

    from deepfusion.errors import DeepFusionError
    from deepfusion.runtime.device import precision_for, resolve_device

    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = resolve_device(name)
    except DeepFusionError as exc:
        print(f"gpu_check: GPU_CHECK_DEVICE={args.device}: {exc}; leave GPU_CHECK_DEVICE unset "
              "(a GPU when torch sees one, else the CPU mode) or set it to cpu", file=sys.stderr)
        return 2
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = (f"{props.name} ({device}, {props.total_memory / GIB:.0f} GiB, compute capability "
               f"{props.major}.{props.minor}, {torch.cuda.device_count()} visible; CUDA "
               f"{torch.version.cuda})")
    else:
        why = ("CUDA not available to this torch" if not torch.cuda.is_available()
               else "GPU_CHECK_DEVICE=cpu")
        gpu = f"no GPU ({why}: the CPU mode)"
    sys.path.insert(0, str(HERE))
    from train_speed import _cpu_name

    # -dirty: the working tree differs from that commit
    commit = subprocess.run(["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or "unknown commit"
    print(f"{_cpu_name()}, {cores()} cores, {_memory_gib()}; {gpu}; torch {torch.__version__}, "
          f"{_onnxruntime()}; deepfusion {commit}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"device={device}")
    print(f"gpus={torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    print(f"cores={cores()}")
    native = []
    for precision in PRECISIONS:
        try:
            native.append(precision_for(device, precision))
        except DeepFusionError:
            pass
    print(f"precisions={','.join(p for p in PRECISIONS if p in native)}")
    return 0


# ----------------------------------------------------------------------------------- extract

def _decode_workers(n: int) -> list[int]:
    """1, 2, 4, ... below ``n``, then ``n``."""
    out, w = [], 1
    while w < n:
        out.append(w)
        w *= 2
    return out + [n]


def _synth(folder: Path, *, clips: int, genres: int, seed: int) -> int:
    from deepfusion.synth.render import synthesize_dataset

    per = max(1, -(-clips // genres))
    return len(synthesize_dataset(folder, genres=genres, clips_per_genre=per, duration=30.0,
                                  seed=seed, overwrite=True))


def extract_section(args) -> int:
    from deepfusion.extract import extract

    device = args.device
    work = Path(args.work)
    budget = Budget(args.budget, "extract")
    n_cores = cores()
    t0 = time.perf_counter()
    n = _synth(work / "audio", clips=int(setting("GPU_CHECK_CLIPS", device.split(":")[0])),
               genres=4, seed=0)
    # other clips (another seed), one per core: the warm-up before each timed run starts the
    # workers, imports and loads what they need, so the timed run measures clips, not start-up
    _synth(work / "warm", clips=max(2, n_cores), genres=2, seed=1)
    log(f"... synth: {n} clips of 30 s ({time.perf_counter() - t0:.0f} s)")
    runs = [("numpy", n_cores, "cpu")] + [("torch", w, device) for w in _decode_workers(n_cores)]
    outs = {}
    for backend, jobs, dev in runs:
        name = f"{backend}-{jobs}"
        step = (f"extract: numpy backend, {jobs} jobs (all cores)" if backend == "numpy" else
                f"extract: torch backend on {dev}, {jobs} {'decode ' * dev.startswith('cuda')}worker{'s' * (jobs > 1)}")
        if budget.spent():
            _record(args.results, step, budget.reason())
            continue
        log(f"... {step}")
        try:
            extract(work / "warm", out=work / f"warm-{name}.pkl", cache_dir=work / "cache" / f"warm-{name}",
                    jobs=jobs, backend=backend, device=dev, quiet=True)
            t = time.perf_counter()
            result = extract(work / "audio", out=work / f"features-{name}.pkl",
                             cache_dir=work / "cache" / name, jobs=jobs, backend=backend,
                             device=dev, quiet=True)
            seconds = time.perf_counter() - t
        except Exception as exc:  # noqa: BLE001 - a row, and the next run
            _record(args.results, step, _failed(exc))
            continue
        text = f"{result.n_items / seconds:.2f} clips/s ({result.computed} of {result.n_items} clips of 30 s computed)"
        if result.errors:
            text += f"; {len(result.errors)} unreadable: {result.errors[0][1]}"
        if backend == "torch":
            busy = getattr(result, "device_busy", None)
            text += f"; device busy {'n/a' if busy is None else f'{busy:.0%}'}"
        _record(args.results, step, text, seconds)
        outs[name] = work / f"features-{name}.pkl"
    # features-numpy-<cores>.pkl and its cache are what train, evaluate and predict use next
    numpy_out = outs.get(f"numpy-{n_cores}")
    torch_outs = [p for k, p in outs.items() if k.startswith("torch-")]
    step = f"extract: views, torch backend on {device} vs numpy"
    if numpy_out is None or not torch_outs:
        _record(args.results, step, "not measured (an extract run above did not finish)")
        return 0
    return _compare_views(args.results, step, numpy_out, torch_outs[0])


# -------------------------------------------------------------------------------------- grid

def _cells(spec: str) -> list[tuple[str, int]]:
    """``'light:16,32 resnet18:16'`` -> [('light', 16), ('light', 32), ('resnet18', 16)]."""
    out = []
    for part in spec.split():
        backbone, _, batches = part.partition(":")
        if backbone not in BACKBONES or not batches:
            raise SystemExit(f"gpu_check: bad grid cell {part!r}: write backbone:batch,batch,... "
                             f"with a backbone of {', '.join(BACKBONES)}")
        out += [(backbone, int(b)) for b in batches.split(",")]
    return out


def _segment_frames() -> tuple[int, int]:
    """Frames of train's default 3-s crop, and of a whole 30-s clip."""
    from deepfusion.config import FeatureConfig
    from deepfusion.data.dataset import segment_frames

    config = FeatureConfig()
    full = config.feature_shapes()["mel_spec_orig"][1]
    return segment_frames(3.0, config, full), full


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure_cell(device, *, backbone: str, precision: str, batch: int, frames: int,
                 steps: int, warmup: int) -> dict:
    """Segments/s of train's own step (:func:`deepfusion.train.loop.train_one_epoch` on one
    batch: autocast, label-smoothed cross-entropy, backward, AdamW, loss scaling in fp16) of
    a ``backbone`` model as train builds it (channels-last, torch's switches of
    :func:`backend_settings`), on random segments already on the device (the six views, no
    pretrained-view branch), and its peak memory: on CUDA ``max_memory_allocated`` above
    what was allocated before the model; elsewhere this process's peak RSS (``VmHWM``)."""
    import numpy as np
    import torch

    from deepfusion.config import FeatureConfig, ModelConfig
    from deepfusion.models.net import MultiModalNet
    from deepfusion.runtime.device import backend_settings
    from deepfusion.runtime.memory import estimate_training_bytes
    from deepfusion.train.loop import train_one_epoch
    from deepfusion.views import FEATURE_KEYS

    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_kib("VmRSS") * 1024
    torch.manual_seed(0)
    model = MultiModalNet(ModelConfig(n_classes=10, backbone=backbone))
    n_params = sum(p.numel() for p in model.parameters())
    times = []
    try:
        model.to(device).to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        rows = {k: r for k, (r, _) in FeatureConfig().feature_shapes().items() if k in FEATURE_KEYS}
        x = {k: torch.randn(batch, r, frames, device=device) for k, r in rows.items()}
        y = torch.randint(0, 10, (batch,), device=device)
        with backend_settings(device):
            for step in range(warmup + steps):
                sync()
                t = time.perf_counter()
                train_one_epoch(model, [(x, y, None)], optimizer, scheduler, scaler, loss_fn,
                                device=device, amp=precision)
                sync()
                if step >= warmup:
                    times.append(time.perf_counter() - t)
        peak = (torch.cuda.max_memory_allocated(device) - base if cuda
                else _rss_kib("VmHWM") * 1024)
    finally:
        del model
        if cuda:
            torch.cuda.empty_cache()
    median = float(np.median(times))
    estimate = estimate_training_bytes(backbone, n_mels=128, frames=frames, batch_size=batch,
                                       precision=precision, n_params=n_params)
    return {"rate": batch / median, "best": batch / min(times),
            "peak": peak, "base": base, "estimate": estimate, "params": n_params}


def cell(args) -> int:
    import torch

    result = measure_cell(torch.device(args.device), backbone=args.backbone,
                          precision=args.precision, batch=int(args.batch), frames=int(args.frames),
                          steps=int(args.steps), warmup=int(args.warmup))
    print(json.dumps(result))
    return 0


def _cell_text(r: dict, *, cuda: bool, steps: int, warmup: int) -> str:
    text = (f"{r['rate']:.1f} segments/s (the median step of {steps} after {warmup} untimed; "
            f"the fastest {r['best']:.1f})")
    if cuda:
        return (text + f"; peak device memory {r['peak'] / GIB:.2f} GiB (train's estimate "
                f"{r['estimate'] / GIB:.2f} GiB)")
    return (text + f"; peak RSS {r['peak'] / GIB:.2f} GiB (this cell's process, "
            f"{r['base'] / GIB:.2f} GiB before the model)")


def grid(args) -> int:
    import torch

    from deepfusion.errors import DeepFusionError
    from deepfusion.runtime.device import precision_for, resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    kind = device.type
    budget = Budget(args.budget, "train")
    wanted = set(_cells(setting("GPU_CHECK_GRID", kind)))
    precisions = setting("GPU_CHECK_PRECISIONS", kind).split()
    full = _cells(setting("GPU_CHECK_FULL", kind))
    steps, warmup = int(setting("GPU_CHECK_STEPS", kind)), int(setting("GPU_CHECK_WARMUP", kind))
    crop, whole = _segment_frames()
    total = torch.cuda.get_device_properties(device).total_memory if cuda else None
    refused = {}
    for precision in PRECISIONS:
        try:
            precision_for(device, precision)
        except DeepFusionError as exc:
            refused[precision] = str(exc).split(": ", 1)[-1]
    skipped: dict[tuple[str, str, tuple[int, ...]], list[str]] = {}   # (reason, backbone, batches) -> precisions

    def skip(reason, backbone, precision, batches):
        skipped.setdefault((reason, backbone, tuple(batches)), []).append(precision)

    def run(step, backbone, precision, batch, frames):
        log(f"... {step}")
        t0 = time.perf_counter()
        from deepfusion.runtime.memory import estimate_training_bytes

        if cuda:
            estimate = estimate_training_bytes(backbone, n_mels=128, frames=frames, batch_size=batch,
                                               precision=precision)
            if estimate > 0.9 * total:
                _record(args.results, step, f"not measured (train's estimate {estimate / GIB:.0f} GiB "
                        f"is over 90% of the GPU's {total / GIB:.0f} GiB)")
                return
            try:
                r = measure_cell(device, backbone=backbone, precision=precision, batch=batch,
                                 frames=frames, steps=steps, warmup=warmup)
            except torch.OutOfMemoryError:
                r = None
            if r is None:     # outside the except: its traceback no longer holds the tensors
                torch.cuda.empty_cache()
                _record(args.results, step, f"out of memory (train's estimate {estimate / GIB:.1f} "
                        f"GiB of {total / GIB:.0f})", time.perf_counter() - t0)
                return
        else:   # one process per cell: its peak RSS is the cell's
            proc = subprocess.run([sys.executable, __file__, "cell", str(device), backbone, precision,
                                   str(batch), str(frames), str(steps), str(warmup)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                _record(args.results, step, f"FAILED (exit {proc.returncode}): {last[:200]}",
                        time.perf_counter() - t0)
                return
            r = json.loads(proc.stdout.strip().splitlines()[-1])
        _record(args.results, step, _cell_text(r, cuda=cuda, steps=steps, warmup=warmup),
                time.perf_counter() - t0)

    for backbone in BACKBONES:
        for precision in PRECISIONS:
            if precision not in precisions:
                skip("not measured (left out by GPU_CHECK_PRECISIONS)", backbone, precision, BATCHES)
                continue
            if precision in refused:
                why = refused[precision].split(";")[0]
                mode = "no GPU" if not torch.cuda.is_available() else "the CPU mode"
                skip(f"not measured ({mode}: {why})" if not cuda else f"not measured ({why})",
                     backbone, precision, BATCHES)
                continue
            left = []
            for batch in BATCHES:
                if (backbone, batch) not in wanted:
                    left.append(batch)
                elif budget.spent():
                    skip(budget.reason(), backbone, precision, [batch])
                else:
                    run(f"train: {backbone} {precision}, batch {batch}, 3-s crops", backbone,
                        precision, batch, crop)
            if left:
                skip("not measured (the CPU mode's reduced grid)" if not cuda and
                     "GPU_CHECK_GRID" not in os.environ else
                     "not measured (left out by GPU_CHECK_GRID)", backbone, precision, left)
    amp = precision_for(device, "amp")
    for backbone, batch in full:
        step = f"train: {backbone} {amp}, batch {batch}, whole 30-s clips"
        if budget.spent():
            _record(args.results, step, budget.reason())
        else:
            run(step, backbone, amp, batch, whole)
    if not full:
        _record(args.results, f"train: resnet50 {amp}, whole 30-s clips",
                "not measured (the CPU mode's reduced grid)" if not cuda and
                "GPU_CHECK_FULL" not in os.environ else "not measured (left out by GPU_CHECK_FULL)")
    for (reason, backbone, batches), precs in skipped.items():
        _record(args.results, f"train: {backbone} {'/'.join(precs)}, batch "
                f"{','.join(map(str, batches))}", reason)
    return 0


# ----------------------------------------------------------------------------------- predict

def predict_section(args) -> int:
    import shutil

    from deepfusion.inference.library import Library

    budget = Budget(args.budget, "predict")
    cache = Path(args.cache)
    runs = [("torch", Path(args.checkpoint), args.device), ("onnx", Path(args.onnx), "auto")]
    answers = {}
    for engine, model, device in runs:
        step = f"predict: {engine} engine" + (f" on {device}" if engine == "torch" else "")
        if budget.spent():
            _record(args.results, step, budget.reason())
            continue
        if engine == "onnx":
            try:
                import onnxruntime
            except ImportError:
                _record(args.results, step, "not measured (onnxruntime is not installed: pip "
                        "install 'deepfusion[onnx]', or onnxruntime-gpu for CUDA)")
                continue
            if not model.is_file():
                _record(args.results, step, "not measured (no exported model: deepfusion export failed)")
                continue
        log(f"... {step}")
        try:
            t = time.perf_counter()
            library = Library([Path(args.audio)], checkpoints=[model], engine=engine,
                              device=device, cache_dir=cache, adapt="none")
            load = time.perf_counter() - t
            list(library.run(jobs=cores(), quiet=True))        # warm-up: the first batch, the kernels
            times = []
            for _ in range(REPEATS):
                for outputs in cache.glob("features-*/outputs"):   # every output computed again
                    shutil.rmtree(outputs)
                t = time.perf_counter()
                results = list(library.run(jobs=cores(), quiet=True))
                times.append(time.perf_counter() - t)
            seconds = sorted(times)[len(times) // 2]
        except Exception as exc:  # noqa: BLE001 - a row, and the next engine
            _record(args.results, step, _failed(exc))
            continue
        good = [r for r in results if not isinstance(r, tuple)]
        where = (f"onnxruntime {onnxruntime.__version__}, {library.engines[0].providers[0]}"
                 if engine == "onnx" else f"fp32 on {device}")
        text = (f"{len(good) / seconds:.1f} clips/s ({where}; {len(good)} clips of 30 s, "
                f"features cached, outputs not, the median of {REPEATS} runs after one untimed; "
                f"model loaded in {load:.1f} s)")
        if engine == "onnx" and args.device.startswith("cuda") and \
                library.engines[0].providers[0] != "CUDAExecutionProvider":
            why = ("this onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu"
                   if "CUDAExecutionProvider" not in onnxruntime.get_available_providers() else
                   "its CUDAExecutionProvider did not load: see logs/predict.log")
            text = f"ONNX Runtime on CUDA not measured ({why}); on its CPU provider: " + text
        if len(good) < len(results):
            text += f"; {len(results) - len(good)} FAILED: {next(r for r in results if isinstance(r, tuple))[1]}"
        _record(args.results, step, text, seconds)
        answers[engine] = {r.path: r for r in good}
    if len(answers) == 2:
        torch_ans, onnx_ans = answers["torch"], answers["onnx"]
        common = sorted(set(torch_ans) & set(onnx_ans))
        same = sum(torch_ans[p].top[0][0] == onnx_ans[p].top[0][0] for p in common)
        # every genre's probability: a Prediction's top holds them all
        gap = max((abs(dict(torch_ans[p].top)[g] - q) for p in common for g, q in onnx_ans[p].top),
                  default=float("nan"))
        _record(args.results, "predict: onnx vs torch answers",
                f"{same}/{len(common)} same top genre, max probability difference {gap:.2g}")
    return 0


# ------------------------------------------------------------------------------------ checks

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


def _compare_views(results: str, step: str, cpu_path, gpu_path) -> int:
    import numpy as np

    from deepfusion.features.torch_views import TOLERANCE as tolerance
    from deepfusion.io.features_file import load_features

    cpu, gpu = load_features(Path(cpu_path)), load_features(Path(gpu_path))
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
    _record(results, step, f"{len(rows)} clips, largest difference: " + ", ".join(parts) + f"; {verdict}")
    if over:
        log(f"{step}: {OVER}: " + ", ".join(f"{k} (at most {tolerance[k]:g})" for k in over))
        return 1
    return 0


def views(args) -> int:
    return _compare_views(args.results, args.step, args.cpu, args.gpu)


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


# ------------------------------------------------------------------------------------- table

def _cell(text: str) -> str:
    return text.replace("|", "/")


def table(args) -> int:
    rows = [line.rstrip("\n").split("\t") for line in open(args.results, encoding="utf-8")
            if line.strip()]
    rows = [(r + ["", "", ""])[:3] for r in rows]
    if args.header:
        print(f"Machine: {args.header}")
        print()
    print("| check | result | s |")
    print("|---|---|---:|")
    for step, result, seconds in rows:
        print(f"| {_cell(step)} | {_cell(result)} | {seconds} |")
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
    # sub-command: (function, its positional arguments; "+" after a name takes several,
    # "?" after one is optional), and whether it takes --budget
    commands = {
        "probe": (probe, ["device"], False),
        "extract": (extract_section, ["results", "device", "work"], True),
        "grid": (grid, ["results", "device"], True),
        "cell": (cell, ["device", "backbone", "precision", "batch", "frames", "steps", "warmup"], False),
        "predict": (predict_section, ["results", "device", "checkpoint", "onnx", "audio", "cache"], True),
        "summary": (summary, ["results", "step", "run"], False),
        "same": (same, ["results", "step", "a", "b"], False),
        "compare": (compare, ["results", "step", "checkpoint", "dirs+"], False),
        "views": (views, ["results", "step", "cpu", "gpu"], False),
        "hidden": (hidden, ["results", "step", "checkpoint"], False),
        "contexts": (contexts, ["results", "step", "features", "dir", "device"], False),
        "table": (table, ["results", "header?"], False),
    }
    for name, (fn, positional, budgeted) in commands.items():
        p = sub.add_parser(name)
        for arg in positional:
            if arg.endswith("+"):
                p.add_argument(arg[:-1], nargs="+")
            elif arg.endswith("?"):
                p.add_argument(arg[:-1], nargs="?", default="")
            else:
                p.add_argument(arg)
        if budgeted:
            p.add_argument("--budget", type=float, default=float("inf"),
                           help="seconds; measurements that would start later are rows saying so")
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
