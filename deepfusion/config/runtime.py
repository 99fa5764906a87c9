"""RuntimeConfig: where and how a run executes (device, precision, workers, adaptation)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from deepfusion.config.fields import bad, from_dict_of

#: What evaluate's and predict's ``--adapt`` may say (see :mod:`deepfusion.inference.adapt`).
ADAPT_MODES = ("auto", "none", "inputs", "full")


#: The fewest clips whose statistics ``--adapt auto`` trusts: below, one file weighs too much.
ADAPT_MIN_CLIPS = 20


#: What ``--amp-dtype`` may say.
AMP_DTYPES = ("auto", "bf16", "fp16")


#: What evaluate's and predict's ``--precision`` may say (fp32: the same answer everywhere).
INFERENCE_PRECISIONS = ("fp32", "amp")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how a run executes, apart from the recipe: never part of what is learnt, so
    a resumed run takes the new call's (a run started on a GPU continues on a CPU)."""

    #: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps
    device: str = "auto"
    #: mixed precision where the device computes it natively: bf16 on GPUs of compute
    #: capability 8.0 or later (Ampere), fp16 with loss scaling on older GPUs, bf16 on CPUs
    #: with native bf16; never on MPS (see :func:`deepfusion.runtime.device.choose_precision`)
    amp: bool = True
    #: the reduced precision of ``amp``: auto (as above), or bf16 / fp16 by name
    amp_dtype: str = "auto"
    #: channels-last memory format for the CNNs (not on MPS)
    channels_last: bool = True
    #: DataLoader worker processes; None: auto (up to 4 per process on CUDA, else 0; see
    #: :func:`deepfusion.runtime.device.default_num_workers`)
    num_workers: Optional[int] = None
    #: under torchrun on GPUs, BatchNorm statistics over all processes' segments (SyncBatchNorm)
    sync_bn: bool = False
    #: repeatable GPU runs: deterministic algorithms and cuDNN, no TF32, no cuDNN autotuning
    #: (slower; see :func:`deepfusion.runtime.device.backend_settings`)
    deterministic: bool = False
    #: seconds of training between writes of best.pth and last.pth (also written at the end
    #: and when the run is interrupted); 0 writes them after every epoch
    save_every: float = 300.0

    def __post_init__(self) -> None:
        if isinstance(self.save_every, bool) or not isinstance(self.save_every, (int, float)) \
                or not 0 <= self.save_every < float("inf"):
            raise bad("save_every", self.save_every, "must be a number of seconds, 0 or more")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise bad("device", self.device, "not a device; give auto, cpu, cuda, cuda:N or mps")
        if self.num_workers is not None and (not isinstance(self.num_workers, int)
                                             or isinstance(self.num_workers, bool)
                                             or self.num_workers < 0):
            raise bad("num_workers", self.num_workers, "must be a whole number, 0 or more")
        if self.amp_dtype not in AMP_DTYPES:
            raise bad("amp_dtype", self.amp_dtype, f"give {', '.join(AMP_DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RuntimeConfig":
        return from_dict_of(cls, data)


RUNTIME_FIELDS = tuple(f.name for f in fields(RuntimeConfig))
