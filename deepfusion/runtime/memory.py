"""Device memory: how much a training step takes (:func:`estimate_training_bytes`), the warning
before a run that will not fit, and one line instead of a traceback when a device runs out
(:func:`memory_guard`). Pure functions of the numbers they are given, so tested anywhere."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator, Optional

import torch

from deepfusion import backbones
from deepfusion.errors import DeviceMemoryError


def estimate_training_bytes(backbone: str, *, n_mels: int, frames: int, batch_size: int,
                            precision: str = "fp32", n_params: int = 0,
                            mel_branches: int = 3) -> int:
    """About how many bytes of device memory one training step takes.

    The activations of ``mel_branches`` CNNs (their ``activation_bytes`` per input value, see
    :data:`deepfusion.backbones.BACKBONES`) over ``batch_size`` segments of ``n_mels`` x
    ``frames`` (half as many bytes under bf16/fp16 autocast), a quarter more for the gradients
    the backward pass holds beside them, and 16 bytes per parameter (weights, gradients and
    AdamW's two moments). The auxiliary branches are small and left out.

    ResNet-50 (three unshared branches, 73 M parameters) on whole 30-s clips (128 x 1292) at
    batch 64: about 32 GiB with autocast, 63 GiB in float32; on the default 3-s crops (129
    frames) at batch 16, about 2 GiB.
    """
    per_value = backbones.backbone(backbone).activation_bytes
    activations = per_value * n_mels * frames * batch_size * mel_branches
    if precision != "fp32":
        activations *= 0.5
    return int(1.25 * activations + 16 * n_params)


def memory_warning(needed: int, available: Optional[int], *, device: str, batch_size: int,
                   frames: int) -> Optional[str]:
    """The line train prints before training when ``needed`` bytes (the estimate) exceed the
    ``available`` memory of ``device`` (None: unknown, no line)."""
    if available is None or needed <= available:
        return None
    return (f"warning: a training step needs about {needed / 2**30:.1f} GiB (estimated), "
            f"{device} has {available / 2**30:.1f} GiB: it will likely run out of memory; use a "
            f"smaller --batch-size (now {batch_size}) or --segment-seconds (segments of "
            f"{frames} frames now)")


def memory_check(model: torch.nn.Module, device: torch.device, *, backbone: str,
                 precision: str, batch_size: int, n_mels: int, frames: int) -> Optional[str]:
    """The warning line train prints before training when :func:`estimate_training_bytes` of
    ``model`` exceeds :func:`device_memory` (None: it fits, or the memory is unknown)."""
    needed = estimate_training_bytes(backbone, n_mels=n_mels, frames=frames,
                                     batch_size=batch_size, precision=precision,
                                     n_params=sum(p.numel() for p in model.parameters()))
    return memory_warning(needed, device_memory(device), device=str(device),
                          batch_size=batch_size, frames=frames)


def synchronize(device: torch.device) -> float:
    """Wait for ``device``'s queued work (CUDA; nothing elsewhere); the seconds waited."""
    if device.type != "cuda":
        return 0.0
    t0 = time.perf_counter()
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def device_memory(device: torch.device) -> Optional[int]:
    """Bytes of memory of ``device`` (the GPU's, MPS's recommended limit, or this machine's
    RAM for the CPU); None when unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "mps":
            return int(torch.mps.recommended_max_memory())
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None


def out_of_memory_message(device: str, *, batch_size: Optional[int],
                          frames: Optional[int] = None, training: bool = True) -> str:
    """The one line that replaces an out-of-memory error: where, with what, and what to lower."""
    batch = f" with --batch-size {batch_size}" if batch_size else ""
    shape = f" (segments of {frames} frames)" if frames else ""
    advice = ("use a smaller --batch-size or --segment-seconds" if training
              else "use a smaller --batch-size" + ("" if device == "cpu" else ", or --device cpu"))
    return f"out of memory on {device}{batch}{shape}; {advice}"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device running out of memory (CUDA's OutOfMemoryError, or the
    RuntimeError MPS raises)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def device_out_of_memory(device: torch.device, *, batch_size: Optional[int],
                         frames: Optional[int] = None, training: bool = True) -> DeviceMemoryError:
    """The :class:`DeviceMemoryError` to raise for an out-of-memory error on ``device``
    (:func:`out_of_memory_message`), the device's cached memory given back first."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return DeviceMemoryError(out_of_memory_message(str(device), batch_size=batch_size,
                                                   frames=frames, training=training))


@contextlib.contextmanager
def memory_guard(device: torch.device, *, batch_size: Optional[int],
                 frames: Optional[int] = None, training: bool = True) -> Iterator[None]:
    """Turn an out-of-memory error inside into one line (:func:`device_out_of_memory`)."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise device_out_of_memory(device, batch_size=batch_size, frames=frames,
                                   training=training) from None
