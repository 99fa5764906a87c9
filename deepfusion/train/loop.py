"""One epoch of training steps, and the learning-rate schedule the steps follow.

Kept apart from :mod:`deepfusion.train.run` (which sets a run up, validates and saves) so that the
loop a benchmark times (``benchmarks/train_speed.py``) is the one training runs.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional, Union

import torch

from deepfusion.config import TrainConfig
from deepfusion.runtime.device import autocast_for, to_device

LOG_EVERY = 20   #: batches between the progress bar's updates (each waits for the GPU)


def lr_factor(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning-rate factor of each optimizer step: linear warm-up over
    ``config.warmup_epochs``, then cosine decay to 0 at the end of ``config.epochs``."""
    warmup = max(1, config.warmup_epochs * steps_per_epoch)
    total = max(warmup + 1, config.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))
    return factor


def train_one_epoch(model, loader, optimizer, scheduler, scaler, loss_fn, *, device,
                    amp: Union[bool, str], progress=None,
                    on_batch: Optional[Callable[[int, float], None]] = None,
                    mixup: float = 0.0, ema=None) -> tuple[float, float]:
    """One pass over the training crops in precision ``amp`` (fp32, bf16, fp16; a bool as
    :func:`~deepfusion.runtime.device.autocast_for` reads it). Returns (mean loss, accuracy).

    ``mixup`` > 0 trains on convex mixtures of pairs of segments (weight drawn from
    Beta(mixup, mixup) per batch, from torch's seeded generator) against the same mixture of
    their labels; the accuracy is then against the dominant segment's label. ``ema`` (a
    :class:`torch.optim.swa_utils.AveragedModel`) is updated after every step. Loss and
    accuracy are summed on the device, read back every :data:`LOG_EVERY` batches for the bar.
    """
    model.train()   # float64 sums: the numbers Python floats gave (MPS has no float64)
    loss_sum = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64,
                           device=device)
    correct, seen = torch.zeros((), dtype=torch.int64, device=device), 0
    t0 = time.perf_counter()
    beta = torch.distributions.Beta(mixup, mixup) if mixup > 0 else None
    shown = progress is not None and not getattr(progress, "disable", False)
    for b, (x, y, _) in enumerate(loader):
        lam, perm = 1.0, None
        if beta is not None and y.shape[0] > 1:
            lam = float(beta.sample())
            perm = torch.randperm(y.shape[0])
            x = {k: lam * v + (1 - lam) * v[perm] for k, v in x.items()}
        x = {k: to_device(v, device) for k, v in x.items()}
        y = to_device(y, device)
        with autocast_for(device, amp):
            logits = model(x)["logits"]
            loss = loss_fn(logits.float(), y)
            if perm is not None:
                loss = lam * loss + (1 - lam) * loss_fn(logits.float(), y[perm.to(device)])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        n = y.shape[0]
        loss_sum += loss.detach().to(loss_sum.dtype) * n
        target = y if perm is None or lam >= 0.5 else y[perm.to(device)]
        correct += (logits.detach().argmax(1) == target).sum()
        seen += n
        if progress is not None:
            progress.update(1)
            if shown and (b % LOG_EVERY == 0 or b == len(loader) - 1):
                progress.set_postfix(loss=f"{float(loss_sum) / seen:.3f}",
                                     samples_s=f"{seen / (time.perf_counter() - t0):.1f}")
        if on_batch is not None:
            on_batch(b, time.perf_counter() - t0)
    return float(loss_sum) / max(seen, 1), int(correct) / max(seen, 1)


def all_finite(*models: torch.nn.Module) -> bool:
    """Whether every floating-point weight and buffer of ``models`` is finite (a run that
    diverged must stop before it saves a checkpoint of NaN weights)."""
    return all(bool(torch.isfinite(t).all()) for m in models for t in m.state_dict().values()
               if t.is_floating_point())


def step_seconds(model: torch.nn.Module, loader, *, device: torch.device,
                 amp: Union[bool, str], loss_fn, steps: int = 4) -> float:
    """Seconds one training step of ``model`` takes on a batch of ``loader``, timed before a
    run starts on a copy of the model with an optimizer of its own (the run's model, optimizer
    and data order are left as they are; every epoch reseeds the random streams).

    The first step pays for warm-up (oneDNN builds its kernels; cuDNN picks its algorithms),
    which the run then reuses, and the next ones may still pay some: the time is the median
    of the steps after the first.
    """
    import copy
    import statistics

    from deepfusion.runtime.memory import synchronize

    n = len(loader.dataset)
    batch = loader.collate_fn([loader.dataset[(i, 0)] for i in range(min(loader.batch_size, n))])
    twin = copy.deepcopy(model)
    optimizer = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    ends: list[float] = []
    train_one_epoch(twin, [batch] * max(steps, 2), optimizer, scheduler, scaler, loss_fn,
                    device=device, amp=amp,
                    on_batch=lambda b, elapsed: ends.append(elapsed + synchronize(device)))
    del twin, optimizer, scheduler
    return statistics.median(b - a for a, b in zip(ends, ends[1:]))
