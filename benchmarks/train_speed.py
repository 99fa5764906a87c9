"""Training and inference speed on the CPU, and the data-loading share, in one run.

Prints, side by side:
  * samples/s of one real training step (``deepfusion.train.loop.train_one_epoch`` on one batch:
    forward, label-smoothed cross-entropy, backward, AdamW step) and of inference (eval mode,
    ``torch.inference_mode()``, as in ``predict_clips``) of the full ``MultiModalNet`` for each
    backbone, on random 3-s segments (mel views (B, 128, 129), mfcc (B, 20, 129), chroma
    (B, 12, 129), tempogram (B, 384, 129)), in two modes:
      fp32     no autocast, contiguous memory format;
      bf16+cl  bf16 autocast (``autocast_for(cpu, True)``) and a channels_last model;
    and the bf16+cl / fp32 ratio per backbone;
  * the share of training-step time blocked in ``next(iterator)`` of the DataLoader that
    ``deepfusion.train.run.train`` builds (``make_train_loader`` over a FeatureSet of 80 clips x
    1292 frames, random values unless ``--features`` is given), light backbone, whole epochs,
    for ``num_workers`` 0 and 2.

The modes are timed round-robin, one step each in turn, and each figure is batch / median step
time: other processes on a shared machine then slow every mode alike and an unlucky step does not
count. The spread column is the interquartile range of the step times over their median.
Run it on an otherwise idle machine (the load average is printed at start and end): when other
processes hold the cores, OpenMP's spinning barriers make single steps up to ten times slower.

Usage: python benchmarks/train_speed.py [--backbones light resnet18 resnet50]
           [--batch-light 64] [--batch-resnet 16] [--steps 6] [--warmup 2]
           [--modes fp32 bf16+cl] [--features data/features.pkl] [--data-batch 16]
           [--data-epochs 3] [--workers 0 2] [--skip-data | --skip-models]
About 100 s on an idle 2-core machine with the defaults (5 min when other jobs share it).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import numpy as np
import torch

from deepfusion.backbones import BACKBONES
from deepfusion.config import FeatureConfig, ModelConfig, RuntimeConfig, TrainConfig
from deepfusion.data.dataset import feature_config_of, make_train_loader, segment_frames
from deepfusion.data.normalize import fit_normalization
from deepfusion.data.splits import make_split
from deepfusion.io.features_file import load_feature_set
from deepfusion.io.featureset import FeatureSet
from deepfusion.models.net import MultiModalNet, count_parameters
from deepfusion.runtime.device import autocast_for, cpu_supports_bf16, use_amp
from deepfusion.train.loop import train_one_epoch
from deepfusion.train.recipe import resolve_recipe
from deepfusion.views import AUX_KEYS, FEATURE_KEYS

CPU = torch.device("cpu")
#: mode name -> (bf16 autocast, channels_last model)
MODES = {"fp32": (False, False), "fp32+cl": (False, True),
         "bf16": (True, False), "bf16+cl": (True, True)}
SEG = 129            # 3 s at 22,050 Hz, hop 512 (segment_frames(3.0, FeatureConfig(), 1292))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def _batch(batch: int, rows: dict[str, int], seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random normalised segments: {key: (batch, rows, SEG)} and labels (batch,)."""
    g = torch.Generator().manual_seed(seed)
    x = {k: torch.randn(batch, rows[k], SEG, generator=g) for k in FEATURE_KEYS}
    return x, torch.randint(0, 4, (batch,), generator=g)


def _setup(model: torch.nn.Module, channels_last: bool):
    if channels_last:
        model.to(memory_format=torch.channels_last)
    config = resolve_recipe(TrainConfig(), "resnet50", False)   # lr does not change the speed
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)   # train.py enables it on fp16 CUDA only
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    return optimizer, scheduler, scaler, loss_fn


def _train_step(model, parts, batch, amp: bool) -> float:
    x, y = batch
    t = time.perf_counter()
    train_one_epoch(model, [(x, y, None)], *parts, device=CPU, amp=amp)
    return time.perf_counter() - t


def _infer_step(model, batch, amp: bool) -> float:
    # the body of predict_clips' loop
    x, _ = batch
    t = time.perf_counter()
    with torch.inference_mode(), autocast_for(CPU, amp):
        out = model(x)
    out["logits"].float().cpu().numpy(), out["attention"].float().cpu().numpy()
    return time.perf_counter() - t


def _rate(batch: int, times: list[float]) -> tuple[float, float]:
    """Samples/s from the median step time, and the interquartile spread over the median."""
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return batch / med, (q3 - q1) / med


def bench_models(backbones: list[str], modes: list[str], batches: dict[str, int], *,
                 steps: int, warmup: int) -> list[dict]:
    """Train and inference samples/s of every backbone in every mode (round-robin timing)."""
    rows = {k: r for k, (r, _) in FeatureConfig().feature_shapes().items()}
    results = []
    for backbone in backbones:
        t_backbone = time.perf_counter()
        batch_size = batches[backbone]
        torch.manual_seed(0)
        base = MultiModalNet(ModelConfig(n_classes=4, backbone=backbone))
        models = {m: copy.deepcopy(base) for m in modes}
        parts = {m: _setup(models[m], MODES[m][1]) for m in modes}
        data = [_batch(batch_size, rows, seed=s) for s in range(2)]
        train_t: dict[str, list[float]] = {m: [] for m in modes}
        infer_t: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(warmup + steps):
            for m in modes:
                dt = _train_step(models[m], parts[m], data[i % 2], MODES[m][0])
                if i >= warmup:
                    train_t[m].append(dt)
        for m in modes:
            models[m].eval()
        for i in range(warmup + steps):
            for m in modes:
                dt = _infer_step(models[m], data[i % 2], MODES[m][0])
                if i >= warmup:
                    infer_t[m].append(dt)
        result = {"backbone": backbone, "batch": batch_size,
                  "params": count_parameters(base) / 1e6, "seconds": 0.0}
        for m in modes:
            result[("train", m)] = _rate(batch_size, train_t[m])
            result[("infer", m)] = _rate(batch_size, infer_t[m])
        result["seconds"] = time.perf_counter() - t_backbone
        results.append(result)
        print(f"  timed {backbone} in {result['seconds']:.0f} s", flush=True)
        del base, models, parts
    return results


def print_model_table(results: list[dict], modes: list[str], steps: int, warmup: int) -> None:
    ref, fast = modes[0], modes[-1]
    print(f"\nsamples/s (batch / median step time over {steps} steps after {warmup} warm-up; "
          f"spread = IQR/median); ratio = {fast} / {ref}")
    head = f"{'backbone':9s} {'params':>7s} {'batch':>5s} | {'stage':5s} |"
    head += "".join(f" {m:>9s} {'spread':>6s} |" for m in modes) + f" {'ratio':>6s}"
    print(head)
    print("-" * len(head))
    for r in results:
        for stage in ("train", "infer"):
            line = (f"{r['backbone']:9s} {r['params']:6.2f}M {r['batch']:5d} | {stage:5s} |"
                    if stage == "train" else f"{'':9s} {'':7s} {'':5s} | {stage:5s} |")
            for m in modes:
                rate, spread = r[(stage, m)]
                line += f" {rate:9.1f} {spread * 100:5.0f}% |"
            line += f" {r[(stage, fast)][0] / r[(stage, ref)][0]:5.2f}x"
            print(line)


# --------------------------------------------------------------------------- data loading

class _TimedLoader:
    """Wraps a DataLoader; adds the time blocked in ``iter()`` and ``next()`` to ``wait``.

    ``iter()`` counts too: without ``persistent_workers`` (train.py sets none) it starts the
    worker processes anew every epoch, and the loop waits for them.
    """

    def __init__(self, loader):
        self.loader, self.wait = loader, 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        t = time.perf_counter()
        it = iter(self.loader)
        self.wait += time.perf_counter() - t
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                self.wait += time.perf_counter() - t
                return
            self.wait += time.perf_counter() - t
            yield batch


def _random_feature_set(n_clips: int, n_frames: int, seed: int = 0) -> FeatureSet:
    """A FeatureSet shaped like a features file of ``n_clips`` 30-s clips (random values)."""
    rng = np.random.default_rng(seed)
    shapes = FeatureConfig().feature_shapes()
    arrays = {k: rng.standard_normal((n_clips, shapes[k][0], n_frames), dtype=np.float32)
              for k in FEATURE_KEYS}
    labels = np.arange(n_clips, dtype=np.int64) % 4
    names = ["blues", "classical", "metal", "pop"]
    paths = [f"{names[c]}/{names[c]}.{i:05d}.wav" for i, c in enumerate(labels)]
    return FeatureSet(arrays, labels, names, paths, np.arange(n_clips, dtype=np.int64),
                      FeatureConfig().to_dict(), "random")


def bench_data(fs: FeatureSet, modes: list[str], workers: list[int], *, batch_size: int,
               epochs: int) -> list[dict]:
    """Share of light-backbone training time spent waiting for batches, per mode and workers.

    Set up as ``deepfusion.train.run.train`` does: split, normalisation fitted on the training
    clips, 3-s random crops, a shuffled DataLoader with ``drop_last`` when the training set is
    larger than a batch. One warm-up epoch, then ``epochs`` timed epochs.
    """
    config = TrainConfig(batch_size=batch_size)
    split = make_split(fs.labels, fs.groups, val_size=config.val_size,
                       test_size=config.test_size, seed=config.seed)
    train_idx = np.flatnonzero(split == "train")
    norm = fit_normalization(fs, train_idx)
    feature_config = feature_config_of(fs)
    seg = segment_frames(config.segment_seconds, feature_config, fs.n_frames)
    model_config = ModelConfig(n_classes=len(fs.class_names), n_mels=fs.rows()["mel_spec_orig"],
                               aux_rows=tuple(fs.rows()[k] for k in AUX_KEYS), backbone="light",
                               pretrained_view_rows=fs.rows().get("musicnn", 0))
    results = []
    for n_workers in workers:
        for mode in modes:
            amp, channels_last = MODES[mode]
            torch.manual_seed(config.seed)
            model = MultiModalNet(model_config)
            optimizer, scheduler, scaler, loss_fn = _setup(model, channels_last)
            loader = make_train_loader(fs, norm, train_idx, seg=seg, batch_size=config.batch_size,
                                       seed=config.seed, num_workers=n_workers)
            timed = _TimedLoader(loader)
            total = 0.0
            for epoch in range(epochs + 1):      # epoch 0 warms up and is not counted
                torch.manual_seed(config.seed * 1_000_003 + epoch)
                loader.sampler.set_epoch(epoch)
                if epoch == 1:
                    timed.wait = 0.0
                t = time.perf_counter()
                train_one_epoch(model, timed, optimizer, scheduler, scaler, loss_fn,
                                device=CPU, amp=amp)
                if epoch >= 1:
                    total += time.perf_counter() - t
            n_steps = epochs * len(loader)
            n_samples = n_steps * config.batch_size if loader.drop_last else epochs * len(train_idx)
            results.append({"workers": n_workers, "mode": mode, "steps": n_steps, "n_train": len(train_idx),
                            "total": total, "wait": timed.wait, "samples_s": n_samples / total})
            print(f"  timed data loading: num_workers={n_workers}, {mode}", flush=True)
    return results


def print_data_table(results: list[dict], fs: FeatureSet, batch_size: int, epochs: int) -> None:
    print(f"\ndata wait, light backbone: {len(fs)} clips x {fs.n_frames} frames ({fs.source}), "
          f"{results[0]['n_train']} training clips, batch {batch_size}, {epochs} timed epochs after 1 warm-up")
    head = (f"{'workers':>7s} | {'mode':8s} | {'steps':>5s} | {'ms/step':>8s} | "
            f"{'wait ms/step':>12s} | {'wait %':>6s} | {'samples/s':>9s}")
    print(head)
    print("-" * len(head))
    for r in results:
        share = 100 * r["wait"] / r["total"]
        flag = "" if share < 10 else "  (over the 10% target)"
        print(f"{r['workers']:7d} | {r['mode']:8s} | {r['steps']:5d} | "
              f"{1000 * r['total'] / r['steps']:8.1f} | {1000 * r['wait'] / r['steps']:12.1f} | "
              f"{share:5.1f}% | {r['samples_s']:9.1f}{flag}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["light", "resnet18", "resnet50"],
                        choices=list(BACKBONES))
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16+cl"], choices=list(MODES),
                        help="the first is the reference of the ratio, the last its numerator")
    parser.add_argument("--batch-light", type=int, default=64)
    parser.add_argument("--batch-resnet", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode and stage")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--features", default=None,
                        help="a features file for the data-wait part (default: random arrays)")
    parser.add_argument("--clips", type=int, default=80, help="clips of the random FeatureSet")
    parser.add_argument("--frames", type=int, default=1292)
    parser.add_argument("--data-batch", type=int, default=16)
    parser.add_argument("--data-epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--skip-data", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    amp_default = use_amp(RuntimeConfig().amp, CPU)
    print(f"{_cpu_name()}; {os.cpu_count()} CPUs, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads")
    print(f"native bf16 (cpu_supports_bf16): {cpu_supports_bf16()}; train --amp default on "
          f"this CPU: {'bf16 autocast' if amp_default else 'fp32'}; "
          f"RuntimeConfig.channels_last default: {RuntimeConfig().channels_last}")
    omp = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ}
    print(f"{_load()} at start; OpenMP settings: {omp or 'defaults'}")

    if not args.skip_models:
        batches = {b: args.batch_light if b == "light" else args.batch_resnet for b in args.backbones}
        print("\nbatch sizes: " + ", ".join(f"{b} {n}" for b, n in batches.items()))
        results = bench_models(args.backbones, args.modes, batches, steps=args.steps,
                               warmup=args.warmup)
        print_model_table(results, args.modes, args.steps, args.warmup)

    if not args.skip_data:
        fs = (load_feature_set(args.features) if args.features
              else _random_feature_set(args.clips, args.frames))
        results = bench_data(fs, args.modes, args.workers, batch_size=args.data_batch,
                             epochs=args.data_epochs)
        print_data_table(results, fs, args.data_batch, args.data_epochs)

    print(f"\n{_load()} at end; {time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
