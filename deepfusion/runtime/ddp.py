"""Several processes, one run: training under ``torchrun`` with DistributedDataParallel.

torchrun starts the processes and tells each its place through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`process_group`
reads it and starts the group (nccl on CUDA, gloo on the CPU); without torchrun, or with one
process, it does nothing and every helper here is the identity, so a single-process run is
exactly what it was.

Rank 0 speaks and writes for the run: it alone holds the model folder, reads and writes the
checkpoints and logs, and prints. :func:`on_main` runs such work on rank 0 and hands every rank
its result (which makes it a barrier: no rank goes on before rank 0 is done) or, when it
fails, stops the other ranks quietly. Each rank trains on its :func:`epoch_share` of an
epoch's order; evaluation is split with :func:`shard` and put back together with
:func:`gather` and :func:`unshard`, so every rank holds the same predictions and takes the same
early-stopping and checkpoint decisions.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import numpy as np
import torch

from deepfusion.errors import DeepFusionError, ParameterError
from deepfusion.runtime.device import resolve_device

T = TypeVar("T")

#: What torchrun sets for every process it starts.
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Group:
    """This process's place in the running group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str             # "gloo" or "nccl"
    device: torch.device     # the CPU, or cuda:LOCAL_RANK

    @property
    def main(self) -> bool:
        return self.rank == 0


class StoppedOnMain(SystemExit):
    """Raised on the other ranks when rank 0 stopped with an error in :func:`on_main`.

    Rank 0 reports the error; the others leave with its exit status and say nothing (a
    ``SystemExit``, which the CLI passes through without a line of its own).
    """


_GROUP: Optional[Group] = None


def launched() -> Optional[tuple[int, int, int]]:
    """``(rank, world size, local rank)`` when torchrun started this process among two or
    more; None without torchrun or with a single process.

    Raises
    ------
    DeepFusionError
        torchrun's variables are set but are not numbers.
    """
    if not all(name in os.environ for name in ENV):
        return None
    try:
        rank, world, local = (int(os.environ[name]) for name in ENV)
    except ValueError:
        bad = ", ".join(f"{name}={os.environ[name]!r}" for name in ENV
                        if not os.environ[name].strip().lstrip("+-").isdigit())
        raise DeepFusionError(f"{', '.join(ENV[:-1])} and {ENV[-1]} must be whole numbers "
                              f"({bad}); start deepfusion with torchrun, or unset them") from None
    return (rank, world, local) if world > 1 else None


def rank() -> int:
    return _GROUP.rank if _GROUP else 0


def world_size() -> int:
    return _GROUP.world_size if _GROUP else 1


def _device(name: str, local_rank: int) -> torch.device:
    """The device of the process with ``local_rank``: ``auto`` and ``cuda`` mean its own GPU
    (cuda:LOCAL_RANK) when there are GPUs, else ``auto`` is the CPU."""
    if name == "mps":
        raise ParameterError("torchrun: deepfusion trains several processes on CUDA (nccl) or on "
                             "the CPU (gloo), not on MPS; give --device cpu")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ParameterError(f"torchrun: process {local_rank} of this machine has no GPU of "
                                 f"its own ({torch.cuda.device_count()} here); start at most that "
                                 "many processes per machine (--nproc_per_node)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu") if name == "auto" else resolve_device(name)


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[Optional[Group]]:
    """Start the process group torchrun's environment describes, and destroy it on leaving
    (errors included). Yields the :class:`Group`, or None without torchrun.

    Processes other than rank 0 print nothing from here on: their standard output goes to
    ``os.devnull`` and stays there (what the CLI prints after training is rank 0's alone);
    standard error stays, for errors that are theirs.

    Raises
    ------
    ParameterError
        A device no distributed backend serves here (``mps``, a missing GPU).
    DeepFusionError
        The backend cannot start (torch without it, a rendezvous that fails).
    """
    global _GROUP
    place = launched()
    if place is None:
        yield None
        return
    rank_, world, local = place
    dev = _device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    dist = torch.distributed
    if not dist.is_available() or not (dist.is_nccl_available() if backend == "nccl"
                                       else dist.is_gloo_available()):
        raise DeepFusionError(f"torchrun: this torch build has no {backend} backend; run "
                              "without torchrun, or install a torch with it")
    try:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, rank=rank_, world_size=world)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a failed start
        reason = " ".join(str(exc).split())[:200]
        raise DeepFusionError(f"torchrun: cannot start the {backend} process group (rank "
                              f"{rank_} of {world}, rendezvous {where}): {reason}") from None
    _GROUP = Group(rank_, world, local, backend, dev)
    if rank_ != 0:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
    try:
        yield _GROUP
    finally:
        _GROUP = None
        # free whatever cycles still hold the wrapped model and its reducer's gloo work now,
        # while the group and the interpreter are alive, rather than at exit, where freeing
        # tensors held by gloo's threads can abort a process (a precaution: one resumed
        # two-process run here ended in SIGABRT, "terminate called without an active
        # exception", and not in 11 further runs of that test; its cause is not established)
        gc.collect()
        dist.destroy_process_group()


def device(name: str = "auto") -> torch.device:
    """This process's device: the group's (see :func:`process_group`), else
    :func:`~deepfusion.runtime.device.resolve_device` of ``name``."""
    return _GROUP.device if _GROUP else resolve_device(name)


def describe(batch_size: int) -> Optional[str]:
    """The line train prints at the start of a distributed run (None with one process)."""
    if _GROUP is None:
        return None
    n = _GROUP.world_size
    return (f"distributed: {n} processes ({_GROUP.backend}), batch size {batch_size} per "
            f"process ({batch_size * n} per step)")


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, DeepFusionError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) and exc.code else 1
    return 1


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on rank 0 alone, its result handed to every rank (tensors and
    plain data).

    Every rank must call it at the same point. No rank returns before rank 0's ``fn`` has
    finished, so what rank 0 writes is there when any rank goes on. When ``fn`` fails, rank 0
    raises its error and the other ranks :class:`StoppedOnMain` with its exit status. Without
    a group, simply ``fn(*args, **kwargs)``.
    """
    if _GROUP is None:
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    error: Optional[BaseException] = None
    if _GROUP.main:
        try:
            box[0] = (0, fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - every rank must hear of any failure
            error, box[0] = exc, (_exit_code(exc), None)
    torch.distributed.broadcast_object_list(box, src=0, weights_only=True)
    if error is not None:
        raise error
    code, value = box[0]
    if code:
        raise StoppedOnMain(code)
    return value


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (tensors and plain data), in rank order, on every rank;
    ``[obj]`` without a group."""
    if _GROUP is None:
        return [obj]
    out: list[Any] = [None] * _GROUP.world_size
    torch.distributed.all_gather_object(out, obj, weights_only=True)
    return out


def mean(*values: float) -> tuple[float, ...]:
    """Each value averaged over the ranks (unchanged without a group)."""
    if _GROUP is None:
        return values
    parts = gather(list(values))
    return tuple(sum(p[i] for p in parts) / len(parts) for i in range(len(values)))


def shard(items: np.ndarray) -> np.ndarray:
    """This rank's part of ``items`` for evaluation: every world-size-th from its rank on (all
    of them without a group). Parts may differ in length by one; :func:`unshard` inverts it."""
    return items[rank()::world_size()]


def unshard(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The items of every rank's :func:`shard` (in rank order) back in their original order."""
    n = sum(len(p) for p in parts)
    out = np.empty((n, *np.shape(parts[0])[1:]), dtype=np.asarray(parts[0]).dtype)
    for r, part in enumerate(parts):
        out[r::len(parts)] = part
    return out


def epoch_share(order: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share of an epoch's ``order``: every ``world_size``-th item from
    ``rank`` on, after padding ``order`` with its own beginning to a multiple of
    ``world_size`` (as torch's DistributedSampler does), so that every rank takes as many
    steps. The shares cover ``order``; they overlap only in the (fewer than ``world_size``)
    padded items. With one process, ``order`` itself.
    """
    order = list(order)
    if world_size == 1 or not order:
        return order
    pad = -len(order) % world_size
    order += (order * (pad // len(order) + 1))[:pad]
    return order[rank::world_size]


def sync_buffers(module: torch.nn.Module) -> None:
    """Give ``module`` rank 0's buffers (BatchNorm statistics), so that every rank evaluates
    the weights rank 0 saves. Each rank's last training step updated its own statistics."""
    if _GROUP is None:
        return
    for buffer in module.buffers():
        torch.distributed.broadcast(buffer, src=0)


def wrap(model: torch.nn.Module, *, sync_bn: bool,
         echo: Callable[[str], None] = print) -> torch.nn.Module:
    """The module training steps go through: ``model`` in DistributedDataParallel, or
    ``model`` itself without a group. ``model`` stays the object that is evaluated and saved
    (its state dict has no ``module.`` prefix).

    ``sync_bn``: BatchNorm statistics over the whole step rather than each process's part
    (SyncBatchNorm, which replaces ``model``'s BatchNorm layers in place, sharing their
    weights). torch synchronises BatchNorm on GPUs only: on the CPU one line says so and the
    layers stay as they are.
    """
    if _GROUP is None:
        return model
    if sync_bn and _GROUP.device.type == "cuda":
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif sync_bn:
        echo("--sync-bn: torch synchronises BatchNorm statistics on GPUs only; on the CPU each "
             "process keeps its own (plain BatchNorm)")
    cuda = _GROUP.device.type == "cuda"
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[_GROUP.device.index] if cuda else None)
