"""Where and how the model runs: device choice, precision, backend settings (memory is
:mod:`deepfusion.runtime.memory`, the random-number state :mod:`deepfusion.runtime.seed`).

Shared by the stages that run a model (train, evaluate, predict); none of them asks another
stage for these decisions. Each decision is a pure function of the machine's capabilities
(:func:`device_choice`, :func:`choose_precision`, :func:`default_num_workers`), so it is
tested on any machine with a table of capabilities; a thin wrapper reads the capabilities of
*this* machine and of the chosen device (:func:`resolve_device`, :func:`precision_for`,
:func:`inference_precision`).

Nothing here calls CUDA unless the run is on a CUDA device: a ``--device cpu`` run on a GPU
machine asks CUDA for nothing (no context on any GPU, no GPU random state).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional, Union

import torch

from deepfusion.config import INFERENCE_PRECISIONS
from deepfusion.errors import DeviceError, ParameterError

#: What a run computes in: float32, or float32 weights with bf16/fp16 autocast.
PRECISIONS = ("fp32", "bf16", "fp16")
#: What a caller may ask for: ``amp`` is the best reduced precision the device computes natively.
REQUESTS = ("fp32", "amp", "bf16", "fp16")
#: Compute capability from which NVIDIA GPUs compute bf16 natively (Ampere). Below it
#: ``torch.cuda.is_bf16_supported()`` still says yes (emulation), and cuDNN has no bf16
#: convolutions: fp16 with a GradScaler is the fast choice there (T4, V100, RTX 20xx).
BF16_CAPABILITY = (8, 0)


# ---------------------------------------------------------------------------------- devices

def device_choice(name: str, *, cuda_count: int, mps: bool) -> str:
    """The device ``name`` means on a machine with ``cuda_count`` visible CUDA devices and
    MPS (``mps``) or not: ``cpu``, ``mps`` or ``cuda:N`` (always with its index).

    ``auto``: cuda:0, else mps, else cpu; ``cuda``: cuda:0.

    Raises
    ------
    DeviceError
        One line saying what the machine has instead.
    """
    if name == "cpu":
        return "cpu"
    if name == "auto":
        return "cuda:0" if cuda_count else "mps" if mps else "cpu"
    if name == "mps":
        if not mps:
            raise DeviceError("--device mps: MPS is not available here (Apple-silicon Macs "
                              "only); give --device cpu")
        return "mps"
    if name == "cuda" or name.startswith("cuda:"):
        index_text = name.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise DeviceError(f"--device {name}: not a device; give cuda or cuda:N (N = 0, 1, ...)")
        index = int(index_text)
        if cuda_count == 0:
            raise DeviceError(f"--device {name}: CUDA is not available here (no CUDA device is "
                              "visible, or this torch is built without CUDA); give --device cpu")
        if index >= cuda_count:
            have = "cuda:0" if cuda_count == 1 else f"cuda:0 to cuda:{cuda_count - 1}"
            raise DeviceError(f"--device {name}: this machine has {cuda_count} CUDA device"
                              f"{'s' if cuda_count != 1 else ''} ({have})")
        return f"cuda:{index}"
    raise DeviceError(f"--device {name}: not a device; give auto, cpu, cuda, cuda:N or mps")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    """The device ``name`` means here (:func:`device_choice`); a CUDA device becomes the current
    one (``torch.cuda.set_device``), so no context is started on ``cuda:0`` for a ``cuda:1`` run.

    ``cpu`` asks nothing of CUDA.

    Raises
    ------
    DeviceError
        A device this machine does not have.
    """
    if name == "cpu":
        return torch.device("cpu")
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = torch.device(device_choice(name, cuda_count=cuda_count,
                                        mps=not cuda_count and _mps_available()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def default_num_workers(device_type: str, *, cpu_count: Optional[int], processes: int = 1,
                        given: Optional[int] = None) -> int:
    """DataLoader workers: ``given`` (``--num-workers``) when it is not None, else a default.

    On CUDA up to 4 per process (cropping and normalising segments on the CPU then overlaps
    the GPU's step), leaving a core per process for the training loop; 0 on the CPU (workers
    would take cores from torch's own threads) and on MPS (macOS starts workers by spawning,
    each a copy of the features).
    """
    if given is not None:
        return given
    if device_type != "cuda":
        return 0
    per_process = (cpu_count or 1) // max(1, processes)
    return max(0, min(4, per_process - 1))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; asynchronously only from pinned memory to CUDA.

    An asynchronous copy from ordinary memory may read it after it has been freed (MPS), and
    on CUDA it is synchronous anyway.
    """
    return tensor.to(device, non_blocking=device.type == "cuda" and tensor.is_pinned())


# -------------------------------------------------------------------------------- precision

def choose_precision(device_type: str, *, capability: Optional[tuple[int, int]] = None,
                     cpu_bf16: bool = False, requested: Union[str, bool] = "amp") -> str:
    """What a run on ``device_type`` computes in: ``fp32``, ``bf16`` or ``fp16``.

    Parameters
    ----------
    device_type : "cuda", "cpu" or "mps"
    capability : (major, minor) or None
        The compute capability of the chosen CUDA device (None: unknown, or not CUDA).
    cpu_bf16 : bool
        Whether the CPU computes bf16 natively (AVX-512 BF16 or AMX).
    requested : "fp32", "amp", "bf16", "fp16", or a bool (True: "amp", False: "fp32")
        ``amp``: bf16 on GPUs of compute capability 8.0 or later, fp16 (with a GradScaler)
        on older GPUs, bf16 on CPUs with native bf16, else (and always on MPS) fp32.

    Raises
    ------
    DeviceError
        A reduced precision asked for by name that the device does not compute natively.
    """
    if isinstance(requested, bool):
        requested = "amp" if requested else "fp32"
    if requested not in REQUESTS:
        raise ParameterError(f"precision must be one of {', '.join(REQUESTS)}, got {requested!r}")
    if requested == "fp32":
        return "fp32"
    if device_type == "cuda":
        native_bf16 = capability is not None and tuple(capability) >= BF16_CAPABILITY
        if requested == "amp":
            return "bf16" if native_bf16 else "fp16"
        if requested == "bf16" and not native_bf16:
            shown = "unknown" if capability is None else "%d.%d" % tuple(capability)
            raise DeviceError(f"--amp-dtype bf16: needs a GPU of compute capability 8.0 or later "
                              f"(Ampere), this one has {shown}; give --amp-dtype fp16 or auto")
        return requested
    if device_type == "cpu":
        if requested == "amp":
            return "bf16" if cpu_bf16 else "fp32"
        if requested == "fp16":
            raise DeviceError("--amp-dtype fp16: the CPU has no fast fp16; give --amp-dtype bf16 "
                              "or auto, or --no-amp")
        return "bf16"
    if requested == "amp":
        return "fp32"
    raise DeviceError(f"--amp-dtype {requested}: not used on {device_type}; give --amp-dtype auto, "
                      "or --no-amp")


def requested_precision(amp: bool, amp_dtype: str = "auto") -> str:
    """What :class:`~deepfusion.config.RuntimeConfig`'s ``amp`` and ``amp_dtype`` ask for."""
    if not amp:
        return "fp32"
    return "amp" if amp_dtype == "auto" else amp_dtype


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX-512 BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    return bool(cpu and (getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                         or getattr(cpu, "_is_amx_tile_supported", lambda: False)()))


def device_capability(device: torch.device) -> Optional[tuple[int, int]]:
    """The compute capability of ``device`` itself (not of the current device); None off CUDA."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


def precision_for(device: torch.device, requested: Union[str, bool] = "amp") -> str:
    """:func:`choose_precision` with the capabilities of ``device`` and of this CPU."""
    return choose_precision(device.type, capability=device_capability(device),
                            cpu_bf16=device.type == "cpu" and cpu_supports_bf16(),
                            requested=requested)


def inference_precision(device: torch.device, requested: str = "fp32") -> str:
    """The precision evaluate and predict classify in: ``fp32`` unless ``amp`` is asked for
    (then :func:`precision_for`). Never the training run's setting: one checkpoint gives the
    same answer on every machine, and train's stored test accuracy equals evaluate's.

    Raises
    ------
    ParameterError
        ``requested`` other than fp32 or amp.
    """
    if requested not in INFERENCE_PRECISIONS:
        raise ParameterError(f"--precision must be fp32 or amp, got {requested!r}")
    return precision_for(device, requested)


def use_amp(amp: bool, device: torch.device) -> bool:
    """Whether mixed precision runs: asked for (``amp``) and natively computed on ``device``."""
    return precision_for(device, amp) != "fp32"


def autocast_dtype(device: torch.device) -> Optional[str]:
    """The reduced precision deepfusion uses on ``device``: bf16 on GPUs of compute capability
    8.0 or later and on CPUs, fp16 on older GPUs, none on MPS."""
    if device.type == "cuda":
        return precision_for(device, "amp")
    return "bf16" if device.type == "cpu" else None


def autocast_for(device: torch.device, precision: Union[str, bool]):
    """The autocast context for ``precision`` on ``device``: a name of :data:`PRECISIONS`, or
    a bool (True: :func:`autocast_dtype`, False: float32)."""
    if isinstance(precision, bool):
        name = autocast_dtype(device) if precision else None
    else:
        name = None if precision == "fp32" else precision
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if name == "bf16" else torch.float16)


# ------------------------------------------------------------------------- backend settings

@contextlib.contextmanager
def backend_settings(device: torch.device, *, deterministic: bool = False) -> Iterator[None]:
    """torch's global switches for a run on ``device``, put back as they were on leaving.

    ``deterministic``: ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op
    without a deterministic implementation warns once instead of stopping the run),
    deterministic cuDNN without autotuning, ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` and no TF32:
    a repeated GPU run gives the same numbers. Otherwise, on CUDA, cuDNN autotunes its
    convolutions (``cudnn.benchmark``; the crops of a run all have one shape).
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.deterministic,
             cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        cudnn.deterministic, cudnn.benchmark = True, False
        cudnn.allow_tf32 = matmul.allow_tf32 = False
    elif device.type == "cuda":
        cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved[2:6]
        if saved[6] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]


# ----------------------------------------------------------------------------------- memory


def restore_scaler(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """Load a stored GradScaler ``state`` where it applies: only into a scaler in use (fp16)
    and only from a run that used one (bf16, float32 and CPU runs store an empty state, which
    torch refuses to load), so a run resumes in fp16 from any run and vice versa."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)


# ------------------------------------------------------------------------ random-number state


