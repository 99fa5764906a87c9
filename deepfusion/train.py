"""The train stage: features file to a self-contained best checkpoint, logs and curves.

The loop reads top to bottom: load and validate the features, split (groups kept together),
fit normalisation on the training clips, build the model, then per epoch
:func:`train_one_epoch`, :func:`~deepfusion.evaluate.predict_clips` on the validation clips,
checkpoints, CSV and plot. ``last.pth`` after every epoch makes ``resume`` continue exactly
where a run stopped; the crops, shuffles and dropout of epoch *e* are seeded by (seed, e), so a
resumed run on the CPU repeats the uninterrupted one.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .checkpoint import library_versions, load_checkpoint, save_checkpoint
from .config import AUX_KEYS, FeatureConfig, ModelConfig, TrainConfig
from .data import (FeatureSet, check_split, fit_normalization, load_features,
                   make_split, make_train_loader, read_split_file, segment_frames,
                   segments_per_clip)
from .errors import CheckpointError, DatasetError, ParameterError
from .evaluate import autocast_dtype, autocast_for, clip_loss, predict_clips
from .fileio import check_writable, remove_stale_temps, write_csv
from .progress import progress_bar
from .models import build_model, count_parameters

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds",
                  "val_segment_acc")


@dataclass
class TrainResult:
    """What a training run produced."""

    model_dir: Path
    best_epoch: int
    best_val_acc: float
    epochs_run: int
    seconds: float
    test_acc: Optional[float] = None
    history: list[dict] = field(default_factory=list)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: cuda when available, else mps, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"device {name!r} asked for, but CUDA is not available here")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ParameterError("device 'mps' asked for, but MPS is not available here")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX-512 BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    return bool(cpu and (getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                         or getattr(cpu, "_is_amx_tile_supported", lambda: False)()))


def use_amp(config: TrainConfig, device: torch.device) -> bool:
    """Mixed precision on CUDA; bf16 autocast on CPUs with native bf16; never on MPS."""
    if not config.amp:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_supports_bf16()


def _lr_lambda(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    warmup = max(1, config.warmup_epochs * steps_per_epoch)
    total = max(warmup + 1, config.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))
    return factor


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _split_lists(fs: FeatureSet, split: np.ndarray) -> dict[str, Any]:
    """The split as saved with a run: relative paths per split (indices when paths are absent)."""
    use_paths = all(fs.paths) and len(set(fs.paths)) == len(fs.paths)
    out: dict[str, Any] = {"by": "path" if use_paths else "index"}
    for name in ("train", "val", "test"):
        idx = np.flatnonzero(split == name)
        out[name] = [fs.paths[i] for i in idx] if use_paths else idx.tolist()
    return out


def _write_history(path: Path, history: list[dict]) -> None:
    write_csv(path, HISTORY_FIELDS, ([row[k] for k in HISTORY_FIELDS] for row in history))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def epoch_estimate(batch_ends: list[float], n_batches: int, n_val_segments: int,
                   batch_size: int) -> float:
    """Seconds one epoch will take, from the end times of its first training batches.

    The first batch pays for warm-up (oneDNN builds its kernels; about 10x a later batch for
    resnet50 in bf16 here), so the rate comes from the batches after it when there are any.
    A validation segment is counted as 0.25 of a training sample: inference has no backward
    pass (``benchmarks/train_speed.py``: 0.21-0.36 of a training step's time per sample).
    """
    if len(batch_ends) > 1:
        per_batch = (batch_ends[-1] - batch_ends[0]) / (len(batch_ends) - 1)
    else:
        per_batch = batch_ends[0]
    return per_batch * (n_batches + 0.25 * n_val_segments / batch_size)


def train_one_epoch(model, loader, optimizer, scheduler, scaler, loss_fn, *, device, amp: bool,
                    progress=None, on_batch: Optional[Callable[[int, float], None]] = None
                    ) -> tuple[float, float]:
    """One pass over the training crops. Returns (mean loss, accuracy) over segments."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    t0 = time.perf_counter()
    for b, (x, y, _) in enumerate(loader):
        x = {k: v.to(device, non_blocking=True) for k, v in x.items()}
        y = y.to(device, non_blocking=True)
        with autocast_for(device, amp):
            logits = model(x)["logits"]
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = y.shape[0]
        total_loss += float(loss.detach()) * n
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += n
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{total_loss / seen:.3f}",
                                 samples_s=f"{seen / (time.perf_counter() - t0):.1f}")
        if on_batch is not None:
            on_batch(b, time.perf_counter() - t0)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def _infer_feature_config(fs: FeatureSet) -> FeatureConfig:
    """The FeatureConfig of a features file; guessed from shapes for original-format files."""
    if fs.feature_config:
        return FeatureConfig.from_dict(fs.feature_config)
    rows = fs.rows()
    base = FeatureConfig()
    duration = (fs.n_frames - 1) * base.hop_length / base.sample_rate
    return FeatureConfig(n_mels=rows["mel_spec_orig"], n_mfcc=rows["mfcc"], n_chroma=rows["chroma"],
                         tempogram_win_length=rows["tempogram"], duration=round(duration, 3))


def train(features: Path, *, model_dir: Path = Path("models"), config: TrainConfig = TrainConfig(),
          backbone: str = "resnet50", share_backbone: bool = False, pretrained: bool = True,
          weights_path: Optional[Path] = None, resume: bool = False, quiet: bool = False,
          echo: Callable[[str], None] = print) -> TrainResult:
    """Train the multi-modal network on a features file.

    Writes into ``model_dir``: ``best.pth`` (best validation clip accuracy; self-contained),
    ``last.pth`` (every epoch; with optimizer, scheduler, scaler and RNG states for ``resume``),
    ``training_history.csv`` and ``training_history.png``.

    Raises
    ------
    FeaturesFileError, DatasetError, ParameterError, WeightsNotFoundError, CheckpointError
        Before any training: bad features, impossible split, bad options, missing pretrained
        weights, nothing to resume.
    """
    t_start = time.perf_counter()
    features, model_dir = Path(features), Path(model_dir)
    last_path, best_path = model_dir / "last.pth", model_dir / "best.pth"
    state = None
    if resume:
        if not last_path.is_file():
            raise CheckpointError(f"{last_path}: nothing to resume (no last.pth in {model_dir})")
        state = load_checkpoint(last_path)
        config = TrainConfig.from_dict(state["train_config"])
        mc = state["model_config"]
        backbone, share_backbone, pretrained = mc["backbone"], mc["share_backbone"], mc["pretrained"]
    check_writable(best_path)
    remove_stale_temps(model_dir)  # leftovers of a run killed while writing

    fs = load_features(features)
    features_sha = fs.sha256
    if state is not None and state["features_sha256"] != features_sha:
        raise CheckpointError(f"{last_path}: was trained on another features file than {features}; "
                              "start a new run in another --model-dir")
    feature_config = _infer_feature_config(fs)

    if config.split_file:
        split = read_split_file(config.split_file, fs.paths)
        check_split(split, fs.groups)
    else:
        split = make_split(fs.labels, fs.groups, val_size=config.val_size,
                           test_size=config.test_size, seed=config.seed)
    train_idx, val_idx, test_idx = (np.flatnonzero(split == s) for s in ("train", "val", "test"))
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DatasetError(f"{features}: the split leaves {len(train_idx)} training and "
                           f"{len(val_idx)} validation clips; both need at least one "
                           "(more clips, or a larger --val-size)")
    missing = sorted({fs.class_names[c] for c in fs.labels} - {fs.class_names[c] for c in fs.labels[train_idx]})
    if missing:
        raise DatasetError(f"{features}: no training clip of genre(s) {', '.join(missing)}")

    norm = fit_normalization(fs, train_idx)
    seg = segment_frames(config.segment_seconds, feature_config, fs.n_frames)
    model_config = ModelConfig(n_classes=len(fs.class_names), n_mels=fs.rows()["mel_spec_orig"],
                               aux_rows=tuple(fs.rows()[k] for k in AUX_KEYS), backbone=backbone,
                               share_backbone=share_backbone,
                               pretrained=pretrained and backbone != "light")
    _seed_everything(config.seed)
    # a resumed run takes its weights from last.pth: no need for the ImageNet file again
    model = build_model(replace(model_config, pretrained=False) if state else model_config,
                        weights_path=weights_path)
    device = resolve_device(config.device)
    amp = use_amp(config, device)
    model.to(device)
    if config.channels_last and device.type != "mps":
        model.to(memory_format=torch.channels_last)

    loader = make_train_loader(fs, norm, train_idx, seg=seg, batch_size=config.batch_size,
                               seed=config.seed, num_workers=config.num_workers,
                               pin_memory=device.type == "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, len(loader)))
    # fp16 needs loss scaling; bf16 has float32's range and does not
    scaler = torch.amp.GradScaler(device.type, enabled=amp and autocast_dtype(device) == "fp16")
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    from .plots import plot_history

    history: list[dict] = []
    start_epoch, best_acc, best_epoch, bad_epochs = 1, -1.0, 0, 0
    last_epoch = config.epochs
    if state is not None:
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        scaler.load_state_dict(state["scaler_state"])
        _set_rng_state(state["rng_state"])
        history = list(state["history"])
        start_epoch = state["epoch"] + 1
        best_acc, best_epoch, bad_epochs = state["best_val_acc"], state["best_epoch"], state["bad_epochs"]
        echo(f"resuming after epoch {state['epoch']} (best validation accuracy {best_acc:.3f} "
             f"at epoch {best_epoch})")
        # a kill between last.pth and the history files leaves those an epoch behind
        _write_history(model_dir / "training_history.csv", history)
        plot_history(history, model_dir / "training_history.png")
        if bad_epochs >= config.patience:  # the run had stopped early: only the test is left
            last_epoch = state["epoch"]

    counts = ", ".join(f"{n} {len(i)}" for n, i in (("train", train_idx), ("val", val_idx), ("test", test_idx)))
    echo(f"{len(fs)} clips, {len(fs.class_names)} genres ({', '.join(fs.class_names)}); split: {counts}")
    echo(f"model: {backbone}{' (shared)' if share_backbone else ''}, "
         f"{count_parameters(model) / 1e6:.2f} M parameters, on {device.type}"
         f"{f' with {autocast_dtype(device)} autocast' if amp else ''}; segments of {seg} frames")

    base_payload = {
        "model_config": model_config.to_dict(), "class_names": list(fs.class_names),
        "feature_config": feature_config.to_dict(),
        "normalization": {k: {s: torch.from_numpy(v) for s, v in d.items()} for k, d in norm.items()},
        "split": _split_lists(fs, split), "train_config": config.to_dict(),
        "features_file": str(features.resolve()), "features_sha256": features_sha,
        "versions": library_versions(),
    }

    batch_ends: list[float] = []
    n_val = len(val_idx) * segments_per_clip(fs.n_frames, seg)

    def estimate(batch: int, elapsed: float) -> None:
        batch_ends.append(elapsed)
        if batch == min(4, len(loader) - 1):
            guess = epoch_estimate(batch_ends, len(loader), n_val, config.batch_size)
            to_go = last_epoch - start_epoch + 1
            total = guess * to_go
            echo(f"estimated {guess:.0f} s per epoch ({len(loader)} batch"
                 f"{'es' if len(loader) != 1 else ''} of {config.batch_size}); "
                 f"{_duration(total)} for the {to_go} epoch{'s' if to_go != 1 else ''} to go "
                 "unless it stops early")
            if device.type == "cpu" and backbone != "light" and total > 1800:
                echo(f"{backbone} on a CPU: about {_duration(total)}; --backbone light trains "
                     "far faster")

    epoch = start_epoch - 1
    for epoch in range(start_epoch, last_epoch + 1):
        t0 = time.perf_counter()
        # every random draw of epoch e depends on (seed, e) alone: resume repeats it exactly
        torch.manual_seed(config.seed * 1_000_003 + epoch)
        loader.sampler.set_epoch(epoch)
        with progress_bar(len(loader), desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                          quiet=quiet, leave=False) as bar:
            train_loss, train_acc = train_one_epoch(
                model, loader, optimizer, scheduler, scaler, loss_fn, device=device, amp=amp,
                progress=bar, on_batch=estimate if epoch == start_epoch else None)
        val = predict_clips(model, fs, norm, val_idx, seg=seg, batch_size=config.batch_size,
                            device=device, amp=amp)
        val_acc = float((val.predicted == fs.labels[val_idx]).mean())
        row = {"epoch": epoch, "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
               "val_loss": round(clip_loss(val, fs.labels), 6), "val_acc": round(val_acc, 6),
               "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 2),
               "val_segment_acc": round(val.segment_correct / max(val.segment_total, 1), 6)}
        history.append(row)
        improved = val_acc > best_acc
        if improved:
            best_acc, best_epoch, bad_epochs = val_acc, epoch, 0
            save_checkpoint(best_path, {**base_payload, "model_state": model.state_dict(),
                                        "epoch": epoch, "metrics": {"val": row}})
        else:
            bad_epochs += 1
        save_checkpoint(last_path, {
            **base_payload, "model_state": model.state_dict(), "epoch": epoch,
            "optimizer_state": optimizer.state_dict(), "scheduler_state": scheduler.state_dict(),
            "scaler_state": scaler.state_dict(), "rng_state": _rng_state(), "history": history,
            "best_val_acc": best_acc, "best_epoch": best_epoch, "bad_epochs": bad_epochs})
        _write_history(model_dir / "training_history.csv", history)
        plot_history(history, model_dir / "training_history.png")
        echo(f"epoch {epoch:3d}  train loss {train_loss:.4f} acc {train_acc:.3f}  "
             f"val loss {row['val_loss']:.4f} acc {val_acc:.3f} (segments {row['val_segment_acc']:.3f})  "
             f"{row['seconds']:.1f} s{'  *' if improved else ''}")
        if bad_epochs >= config.patience:
            echo(f"early stop: no better validation accuracy for {config.patience} epochs")
            break

    test_acc = None
    if len(test_idx):
        best = load_checkpoint(best_path)
        model.load_state_dict(best["model_state"])
        test = predict_clips(model, fs, norm, test_idx, seg=seg, batch_size=config.batch_size,
                             device=device, amp=amp)
        test_acc = float((test.predicted == fs.labels[test_idx]).mean())
        best["metrics"]["test"] = {"clip_acc": test_acc, "n_clips": int(len(test_idx)),
                                   "segment_acc": test.segment_correct / max(test.segment_total, 1)}
        save_checkpoint(best_path, {k: v for k, v in best.items() if k != "format_version"})
        echo(f"test: clip accuracy {test_acc:.3f} on {len(test_idx)} clips (best epoch {best_epoch})")
    return TrainResult(model_dir, best_epoch, best_acc, epoch, time.perf_counter() - t_start,
                       test_acc, history)
