"""TrainConfig: the recipe (epochs, batch size, learning rate, split, augmentation...)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from deepfusion.config.fields import bad, flag_of, from_dict_of
from deepfusion.config.model import MODEL_KINDS
from deepfusion.config.runtime import RUNTIME_FIELDS
from deepfusion.errors import ParameterError

#: How ``best.pth`` is chosen: the weights after the last epoch, or those of the epoch with the
#: lowest validation loss or highest validation clip accuracy.
SELECTIONS = ("last", "val_loss", "val_acc")


#: TrainConfig fields whose default depends on the backbone (``None`` in a config: "auto").
AUTO_FIELDS = ("epochs", "batch_size", "lr", "patience")


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained (the recipe). Saved in every checkpoint.

    ``epochs``, ``batch_size``, ``lr`` and ``patience`` may be ``None`` ("auto"): train fills
    them per backbone with :func:`recipe_defaults` and saves the resolved values.
    """

    epochs: Optional[int] = None
    #: training segments per batch and process: under torchrun a step averages N x batch_size
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: float = 1e-2
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    patience: Optional[int] = None
    segment_seconds: Optional[float] = 3.0
    val_size: float = 0.1
    test_size: float = 0.1
    seed: int = 0
    split_file: Optional[str] = None
    #: network or linear probe (see :mod:`deepfusion.models.probe`)
    model: str = "net"
    #: how best.pth is chosen (see :data:`SELECTIONS`)
    select: str = "last"
    #: decay per step of an exponential moving average of the weights (0: off); the average
    #: is what is validated and saved
    ema: float = 0.0
    #: mixup's Beta(alpha, alpha) (0: off)
    mixup: float = 0.0
    #: SpecAugment: up to this fraction of mel bands / of frames masked, twice each (0: off)
    freq_mask: float = 0.15
    time_mask: float = 0.1
    #: random spectral tilt of the mel views (and MFCC): this many dB from the lowest to the
    #: highest band at most, either way (0: off)
    tilt_db: float = 12.0
    #: inverse regularisation strength of the linear probe
    probe_c: float = 0.05
    #: start every branch, the attention and the fusion layers from this deepfusion checkpoint
    #: (fine-tuning; its features must be this run's); the classifier keeps the rows of the
    #: genres both collections share, the others start fresh
    init_from: Optional[str] = None
    #: with init_from: train only the attention, fusion layers and classifier
    freeze_branches: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise bad(name, value, "must be 1 or more")
        if self.lr is not None and not self.lr > 0:
            raise bad("lr", self.lr, "must be above 0")
        for name in ("val_size", "test_size", "label_smoothing", "ema", "freq_mask", "time_mask"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "must be 0 or more and below 1")
        if not self.val_size + self.test_size < 1:
            raise ParameterError(
                f"{flag_of('val_size')} {self.val_size:g} and {flag_of('test_size')} "
                f"{self.test_size:g} leave no training clips; their sum must be below 1",
                field="val_size")
        if self.segment_seconds is not None and not self.segment_seconds > 0:
            raise bad("segment_seconds", self.segment_seconds, "must be above 0 seconds, or full")
        if self.model not in MODEL_KINDS:
            raise bad("model", self.model, f"give {' or '.join(MODEL_KINDS)}")
        if self.select not in SELECTIONS:
            raise bad("select", self.select, f"give {', '.join(SELECTIONS)}")
        for name in ("mixup", "tilt_db"):
            if not getattr(self, name) >= 0:
                raise bad(name, getattr(self, name), "must be 0 or more")
        if not self.probe_c > 0:
            raise bad("probe_c", self.probe_c, "must be above 0")
        if self.freeze_branches and not self.init_from:
            raise ParameterError(f"{flag_of('freeze_branches')} needs {flag_of('init_from')} "
                                 "CHECKPOINT (frozen untrained branches would learn nothing)",
                                 field="freeze_branches")
        if self.init_from and self.model == "probe":
            raise ParameterError(f"{flag_of('init_from')}: {flag_of('model')} probe has nothing to "
                                 "start from; drop one of them", field="init_from")

    @property
    def resolved(self) -> bool:
        """Whether every "auto" field has a value."""
        return all(getattr(self, name) is not None for name in AUTO_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Rebuild a saved recipe; runs saved before :class:`RuntimeConfig` existed kept the
        runtime fields here, and they are dropped (they never change what is learnt)."""
        return from_dict_of(cls, {k: v for k, v in data.items() if k not in RUNTIME_FIELDS})
