"""Where and how the model runs: device choice, mixed precision, random-number state.

Shared by the stages that run a model (train, evaluate, predict); none of them asks another
stage for these decisions.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Optional

import numpy as np
import torch

from .errors import ParameterError


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: cuda when available, else mps, else cpu.

    Raises
    ------
    ParameterError
        A device asked for by name that this machine does not have.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"device {name!r} asked for, but CUDA is not available here")
    if name == "mps" and not _mps_available():
        raise ParameterError("device 'mps' asked for, but MPS is not available here")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX-512 BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    return bool(cpu and (getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                         or getattr(cpu, "_is_amx_tile_supported", lambda: False)()))


def use_amp(amp: bool, device: torch.device) -> bool:
    """Whether mixed precision runs: asked for (``amp``) and worth it on ``device``.

    On CUDA always; on CPUs with native bf16 only (emulated bf16 is slower than float32);
    never on MPS.
    """
    if not amp:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_supports_bf16()


def autocast_dtype(device: torch.device) -> Optional[str]:
    """The reduced precision deepfusion uses on ``device``: bf16 on CPUs and recent GPUs,
    fp16 on older GPUs, none on MPS."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" else None


def autocast_for(device: torch.device, enabled: bool):
    """The autocast context deepfusion uses on ``device`` (see :func:`autocast_dtype`)."""
    name = autocast_dtype(device) if enabled else None
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if name == "bf16" else torch.float16)


# ------------------------------------------------------------------------ random-number state

def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global generators' state as tensors and plain data (fits a checkpoint)."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
