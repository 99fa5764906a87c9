"""One dataclass per concern.

Each config is saved with :func:`dataclasses.asdict` and rebuilt with ``Config(**d)``, so that
features files and checkpoints carry plain dicts, never code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from .errors import ParameterError

#: Bump whenever the feature code changes what it computes; part of every cache key.
FEATURE_CODE_VERSION = 1

#: The six feature views, in the order the model consumes them.
FEATURE_KEYS = (
    "mel_spec_orig",
    "mel_spec_harm",
    "mel_spec_perc",
    "mfcc",
    "chroma",
    "tempogram",
)
MEL_KEYS = FEATURE_KEYS[:3]
AUX_KEYS = FEATURE_KEYS[3:]


def _from_dict(cls, data: dict[str, Any]):
    """Rebuild a config dataclass from a dict, refusing unknown keys with a clear message."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ParameterError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    return cls(**data)


@dataclass(frozen=True)
class FeatureConfig:
    """Everything the features depend on. Part of the cache key and of every checkpoint.

    Defaults follow librosa's and the original project's choices: 22,050 Hz, 30-s clips, one
    STFT with ``n_fft=2048`` and ``hop_length=512`` feeding 128-band log-mel spectrograms of the
    original, harmonic and percussive signal (median-filter HPSS, kernel 31, soft masks),
    20 MFCCs, 12-bin chroma and a 384-lag tempogram.
    """

    sample_rate: int = 22050
    duration: float = 30.0
    min_duration: float = 1.0
    n_fft: int = 2048
    hop_length: int = 512
    n_mels: int = 128
    fmin: float = 0.0
    fmax: Optional[float] = None
    top_db: float = 80.0
    hpss_kernel: int = 31
    hpss_power: float = 2.0
    hpss_margin: float = 1.0
    n_mfcc: int = 20
    n_chroma: int = 12
    #: Tuning deviation in fractions of a chroma bin; ``None`` estimates it per clip.
    chroma_tuning: Optional[float] = None
    tempogram_win_length: int = 384

    def __post_init__(self) -> None:
        positive_ints = ("sample_rate", "n_fft", "hop_length", "n_mels", "hpss_kernel",
                         "n_mfcc", "n_chroma", "tempogram_win_length")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ParameterError(f"{name} must be a positive integer, got {value!r}")
        if self.hpss_kernel % 2 == 0:
            # an even window has no centre sample: its median is not one of the inputs
            raise ParameterError(f"hpss_kernel must be odd, got {self.hpss_kernel!r}")
        if not self.duration > 0:
            raise ParameterError(f"duration must be > 0 seconds, got {self.duration!r}")
        if not 0 <= self.min_duration <= self.duration:
            raise ParameterError(
                f"min_duration must be between 0 and duration ({self.duration}), "
                f"got {self.min_duration!r}")
        if self.hop_length > self.n_fft:
            raise ParameterError(
                f"hop_length ({self.hop_length}) must not exceed n_fft ({self.n_fft})")
        nyquist = self.sample_rate / 2
        fmax = nyquist if self.fmax is None else self.fmax
        if not 0 <= self.fmin < fmax <= nyquist:
            raise ParameterError(
                f"need 0 <= fmin < fmax <= sample_rate/2 ({nyquist:g}), "
                f"got fmin={self.fmin!r}, fmax={self.fmax!r}")
        if self.hpss_margin < 1:
            raise ParameterError(f"hpss_margin must be >= 1, got {self.hpss_margin!r}")
        if self.hpss_power <= 0:
            raise ParameterError(f"hpss_power must be > 0, got {self.hpss_power!r}")
        if self.top_db <= 0:
            raise ParameterError(f"top_db must be > 0, got {self.top_db!r}")
        if self.n_mfcc > self.n_mels:
            raise ParameterError(
                f"n_mfcc ({self.n_mfcc}) must not exceed n_mels ({self.n_mels})")

    @property
    def n_samples(self) -> int:
        """Samples per clip after padding or trimming."""
        return int(round(self.duration * self.sample_rate))

    @property
    def n_frames(self) -> int:
        """Frames per clip of every feature (centred STFT)."""
        return 1 + self.n_samples // self.hop_length

    def feature_shapes(self) -> dict[str, tuple[int, int]]:
        """The ``(rows, frames)`` shape of each of the six features."""
        t = self.n_frames
        return {
            "mel_spec_orig": (self.n_mels, t),
            "mel_spec_harm": (self.n_mels, t),
            "mel_spec_perc": (self.n_mels, t),
            "mfcc": (self.n_mfcc, t),
            "chroma": (self.n_chroma, t),
            "tempogram": (self.tempogram_win_length, t),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureConfig":
        return _from_dict(cls, data)

    def fingerprint(self) -> str:
        """A short hash of this config and the feature-code version: the cache namespace."""
        payload = json.dumps({"config": self.to_dict(), "code": FEATURE_CODE_VERSION},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


BACKBONES = ("resnet50", "resnet18", "resnet34", "light")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a :class:`~deepfusion.models.MultiModalNet`.

    ``aux_rows`` gives the number of rows of each auxiliary feature (MFCC, chroma, tempogram),
    ``n_mels`` the height of the three mel views; both come from the features.
    """

    n_classes: int
    n_mels: int = 128
    aux_rows: tuple[int, int, int] = (20, 12, 384)
    backbone: str = "resnet50"
    share_backbone: bool = False
    pretrained: bool = False
    embed_dim: int = 256
    aux_hidden: int = 128
    fusion_hidden: tuple[int, ...] = (512, 256)
    dropout: float = 0.3

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ParameterError(f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.n_classes < 2:
            raise ParameterError(f"need at least 2 classes, got {self.n_classes}")
        if not 0 <= self.dropout < 1:
            raise ParameterError(f"dropout must be in [0, 1), got {self.dropout!r}")
        # tuples survive asdict -> torch.save -> load as lists; normalise them back
        object.__setattr__(self, "aux_rows", tuple(int(r) for r in self.aux_rows))
        object.__setattr__(self, "fusion_hidden", tuple(int(h) for h in self.fusion_hidden))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained. Saved in every checkpoint."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    patience: int = 20
    segment_seconds: Optional[float] = 3.0
    val_size: float = 0.1
    test_size: float = 0.1
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    num_workers: int = 0
    split_file: Optional[str] = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ParameterError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not self.lr > 0:
            raise ParameterError(f"lr must be > 0, got {self.lr!r}")
        if not (0 <= self.val_size < 1 and 0 <= self.test_size < 1
                and self.val_size + self.test_size < 1):
            raise ParameterError(
                f"val_size and test_size must be in [0, 1) with a sum below 1, "
                f"got {self.val_size!r} and {self.test_size!r}")
        if self.segment_seconds is not None and not self.segment_seconds > 0:
            raise ParameterError(f"segment_seconds must be > 0, got {self.segment_seconds!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ParameterError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.patience < 1:
            raise ParameterError(f"patience must be >= 1, got {self.patience!r}")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise ParameterError(f"device must be auto, cpu, cuda[:N] or mps, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, data)
