"""The random-number state of a run: seeding (only the run's own device is asked), and the
state a checkpoint stores so that a resumed run continues the same sequence."""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch


def seed_torch(seed: int, device: Optional[torch.device] = None) -> None:
    """Seed torch's CPU generator and, on a CUDA or MPS run, ``device``'s own; no other
    device is asked (``torch.manual_seed`` would seed every GPU). On the CPU the numbers are
    ``torch.manual_seed``'s."""
    torch.random.default_generator.manual_seed(int(seed))
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(int(seed))
    elif device is not None and device.type == "mps":
        torch.mps.manual_seed(int(seed))


def seed_everything(seed: int, device: Optional[torch.device] = None) -> None:
    """Seed Python's, numpy's and torch's generators (:func:`seed_torch`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    seed_torch(seed, device)


def rng_state(device: Optional[torch.device] = None) -> dict[str, Any]:
    """The global generators' state as CPU tensors and plain data (fits a checkpoint): the
    CPU's, Python's, and on a CUDA run ``device``'s own generator (no other GPU is touched)."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: Optional[torch.device] = None) -> None:
    """Restore what :func:`rng_state` saved, on this run's ``device``: whatever device and how
    many GPUs the saving run had (a CUDA state is restored only onto a CUDA run)."""
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if device is None or device.type != "cuda":
        return
    saved = state.get("cuda_device")
    if saved is None and state.get("cuda"):      # older files: every visible GPU's state
        saved = state["cuda"][min(device.index or 0, len(state["cuda"]) - 1)]
    if saved is not None:
        torch.cuda.set_rng_state(saved, device)
