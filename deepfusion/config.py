"""One dataclass per concern.

:class:`FeatureConfig` (what the features are), :class:`ModelConfig` (the network),
:class:`TrainConfig` (the recipe) and :class:`RuntimeConfig` (where and how a run executes).
Each is saved with :func:`dataclasses.asdict` and rebuilt with ``Config(**d)``, so that
features files and checkpoints carry plain dicts, never code. The CLI generates its options
from these dataclasses, so a default lives here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from deepfusion import backbones
from deepfusion.errors import ParameterError
from deepfusion.patches import n_patches
# the views are rows of one table (deepfusion.views); their names are importable from here too
from deepfusion.views import (ALL_KEYS, AUX_KEYS, FEATURE_KEYS, MEL_KEYS,  # noqa: F401
                              PRETRAINED_KEY, feature_shapes, view_keys)

#: Where the stages read and write when not told otherwise (relative to the working folder).
DEFAULT_FEATURES = Path("data/features.pkl")
DEFAULT_STORE = Path("data/features.store")
DEFAULT_CACHE_DIR = Path("data/cache")
DEFAULT_MODEL_DIR = Path("models")
#: Formats extract writes: a pickle read whole, or a store folder that train memory-maps.
FEATURE_FORMATS = ("pickle", "store")

#: Bump whenever the feature code changes what it computes; part of every cache key.
FEATURE_CODE_VERSION = 1
#: The same for the pretrained view (its rows, its input): part of the key of configs with it.
PRETRAINED_VIEW_VERSION = 1
#: The views of the feature code's version 1; a view added to :data:`deepfusion.views.VIEWS`
#: since joins the cache key by name (:meth:`FeatureConfig.fingerprint`). Never edited.
VERSION_1_VIEWS = ("mel_spec_orig", "mel_spec_harm", "mel_spec_perc", "mfcc", "chroma",
                   "tempogram", "musicnn")
#: The networks the pretrained view may come from (``None``: no pretrained view).
PRETRAINED_VIEWS = ("MTT_musicnn", "MSD_musicnn")


#: Config fields whose command-line flag is not their name spelled with dashes.
FLAGS = {"sample_rate": "--sr"}


def flag_of(field: str) -> str:
    """The command-line flag of a config field: ``"sample_rate"`` -> ``"--sr"``,
    ``"n_mfcc"`` -> ``"--n-mfcc"`` (:data:`FLAGS`, else :func:`option_name`)."""
    return FLAGS.get(field) or option_name(field)



def _bad(field: str, value: Any, rule: str) -> ParameterError:
    """``--flag VALUE: rule``, for Python and CLI users alike; the field kept on the error."""
    shown = format(value, "g") if isinstance(value, float) else str(value)
    return ParameterError(f"{flag_of(field)} {shown}: {rule}", field=field)


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
    #: The frozen music network of the seventh view (see :mod:`deepfusion.features.pretrained`);
    #: ``None``: the six hand-made views only.
    pretrained_view: Optional[str] = "MTT_musicnn"
    #: One 3-s patch in every ``pretrained_stride`` goes through that network (1: all).
    pretrained_stride: int = 4

    def __post_init__(self) -> None:
        if self.pretrained_view is not None and self.pretrained_view not in PRETRAINED_VIEWS:
            raise _bad("pretrained_view", self.pretrained_view,
                       f"not a pretrained view; give {', '.join(PRETRAINED_VIEWS)} or none")
        if self.pretrained_view is None:
            # no view, no stride: settings that differ only there are the same settings
            object.__setattr__(self, "pretrained_stride",
                               type(self).__dataclass_fields__["pretrained_stride"].default)
        positive_ints = ("sample_rate", "n_fft", "hop_length", "n_mels", "hpss_kernel",
                         "n_mfcc", "n_chroma", "tempogram_win_length", "pretrained_stride")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise _bad(name, value, "must be a whole number above 0")
        if self.hpss_kernel % 2 == 0:
            # an even window has no centre sample: its median is not one of the inputs
            raise _bad("hpss_kernel", self.hpss_kernel, "must be odd (e.g. 31)")
        if not self.duration > 0:
            raise _bad("duration", self.duration, "must be above 0 seconds")
        if not 0 <= self.min_duration:
            raise _bad("min_duration", self.min_duration, "must be 0 seconds or more")
        if not self.min_duration <= self.duration:
            raise _bad("min_duration", self.min_duration,
                       f"at most {flag_of('duration')} ({self.duration:g})")
        if self.hop_length > self.n_fft:
            raise _bad("hop_length", self.hop_length, f"at most {flag_of('n_fft')} ({self.n_fft})")
        nyquist = self.sample_rate / 2
        half = f"half of {flag_of('sample_rate')}, {nyquist:g} Hz"
        if self.fmax is not None and not 0 < self.fmax <= nyquist:
            raise _bad("fmax", self.fmax,
                       f"must be above 0 and at most half of {flag_of('sample_rate')} ({nyquist:g} Hz)")
        if not 0 <= self.fmin:
            raise _bad("fmin", self.fmin, "must be 0 Hz or more")
        if self.fmax is None and not self.fmin < nyquist:
            raise _bad("fmin", self.fmin, f"must be below {flag_of('fmax')} (default: {half})")
        if self.fmax is not None and not self.fmin < self.fmax:
            raise _bad("fmin", self.fmin, f"must be below {flag_of('fmax')} ({self.fmax:g})")
        if self.hpss_margin < 1:
            raise _bad("hpss_margin", self.hpss_margin, "must be 1 or more")
        if self.hpss_power <= 0:
            raise _bad("hpss_power", self.hpss_power, "must be above 0")
        if self.top_db <= 0:
            raise _bad("top_db", self.top_db, "must be above 0")
        if self.n_mfcc > self.n_mels:
            raise _bad("n_mfcc", self.n_mfcc, f"at most {flag_of('n_mels')} ({self.n_mels})")

    @property
    def n_samples(self) -> int:
        """Samples per clip after padding or trimming."""
        return int(round(self.duration * self.sample_rate))

    @property
    def n_frames(self) -> int:
        """Frames per clip of every feature (centred STFT)."""
        return 1 + self.n_samples // self.hop_length

    @property
    def keys(self) -> tuple[str, ...]:
        """The views these settings compute, in model order."""
        return view_keys(self.pretrained_view is not None)

    @property
    def n_patches(self) -> int:
        """Patches per clip of the pretrained view: whole 3-s patches, at least one."""
        return n_patches(self.n_samples, self.sample_rate, self.pretrained_stride)

    def feature_shapes(self) -> dict[str, tuple[int, int]]:
        """The ``(rows, frames)`` shape of each view (frames: patches for the pretrained one),
        from the rows of :data:`deepfusion.views.VIEWS`."""
        return feature_shapes(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureConfig":
        """Rebuild saved settings; those saved before the pretrained view existed had none."""
        return _from_dict(cls, {"pretrained_view": None, **data})

    def differences(self, other: "FeatureConfig") -> dict[str, tuple[Any, Any]]:
        """``{field: (self's value, other's)}`` of every field where the two differ."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    def fingerprint(self) -> str:
        """A short hash of this config and the feature-code version: the cache namespace."""
        config = self.to_dict()
        code: dict[str, Any] = {"code": FEATURE_CODE_VERSION}
        if config["pretrained_view"] is None:
            # the six views as before the pretrained view existed: their cache entries stay valid
            del config["pretrained_view"], config["pretrained_stride"]
        else:
            code["view"] = PRETRAINED_VIEW_VERSION
        added = [k for k in self.keys if k not in VERSION_1_VIEWS]
        if added:
            code["views"] = added
        payload = json.dumps({"config": config, **code}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


#: What ``train`` fits: the multi-modal network, or the linear probe baseline.
MODEL_KINDS = ("net", "probe")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a :class:`~deepfusion.models.net.MultiModalNet`.

    ``aux_rows`` gives the number of rows of each vector view (:data:`AUX_KEYS`: MFCC,
    chroma, tempogram), ``n_mels`` the height of the mel views; both come from the features
    (:func:`deepfusion.views.model_rows`).
    """

    n_classes: int
    n_mels: int = 128
    #: "net" (the multi-modal network) or "probe" (the linear probe baseline)
    kind: str = "net"
    aux_rows: tuple[int, ...] = tuple(FeatureConfig().feature_shapes()[k][0] for k in AUX_KEYS)
    backbone: str = "resnet50"
    share_backbone: bool = False
    pretrained: bool = False
    embed_dim: int = 256
    aux_hidden: int = 128
    fusion_hidden: tuple[int, ...] = (512, 256)
    dropout: float = 0.3
    #: each mel branch also sees the mean and standard deviation over time of every band
    band_stats: bool = False
    #: rows of the pretrained view (0: the model has no branch for it)
    pretrained_view_rows: int = 0

    def __post_init__(self) -> None:
        backbones.backbone(self.backbone)   # one of deepfusion.backbones.BACKBONES
        if self.kind not in MODEL_KINDS:
            raise ParameterError(f"model kind must be one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")
        if self.n_classes < 2:
            raise ParameterError(f"need at least 2 classes, got {self.n_classes}")
        if not 0 <= self.dropout < 1:
            raise ParameterError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.pretrained_view_rows, int) or isinstance(self.pretrained_view_rows, bool) \
                or self.pretrained_view_rows < 0:
            raise ParameterError(f"pretrained_view_rows must be an integer >= 0, got "
                                 f"{self.pretrained_view_rows!r}")
        # tuples survive asdict -> torch.save -> load as lists; normalise them back
        object.__setattr__(self, "aux_rows", tuple(int(r) for r in self.aux_rows))
        object.__setattr__(self, "fusion_hidden", tuple(int(h) for h in self.fusion_hidden))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data)


#: ModelConfig fields beyond the backbone that shape a network's weights (or its dropout) and
#: that no command-line option sets except --band-stats: a resumed or fine-tuned run takes
#: them from its checkpoint.
ARCHITECTURE_FIELDS = ("band_stats", "embed_dim", "aux_hidden", "fusion_hidden", "dropout")


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
                raise _bad(name, value, "must be 1 or more")
        if self.lr is not None and not self.lr > 0:
            raise _bad("lr", self.lr, "must be above 0")
        for name in ("val_size", "test_size", "label_smoothing", "ema", "freq_mask", "time_mask"):
            if not 0 <= getattr(self, name) < 1:
                raise _bad(name, getattr(self, name), "must be 0 or more and below 1")
        if not self.val_size + self.test_size < 1:
            raise ParameterError(
                f"{flag_of('val_size')} {self.val_size:g} and {flag_of('test_size')} "
                f"{self.test_size:g} leave no training clips; their sum must be below 1",
                field="val_size")
        if self.segment_seconds is not None and not self.segment_seconds > 0:
            raise _bad("segment_seconds", self.segment_seconds, "must be above 0 seconds, or full")
        if self.model not in MODEL_KINDS:
            raise _bad("model", self.model, f"give {' or '.join(MODEL_KINDS)}")
        if self.select not in SELECTIONS:
            raise _bad("select", self.select, f"give {', '.join(SELECTIONS)}")
        for name in ("mixup", "tilt_db"):
            if not getattr(self, name) >= 0:
                raise _bad(name, getattr(self, name), "must be 0 or more")
        if not self.probe_c > 0:
            raise _bad("probe_c", self.probe_c, "must be above 0")
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
        return _from_dict(cls, {k: v for k, v in data.items() if k not in RUNTIME_FIELDS})


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
            raise _bad("save_every", self.save_every, "must be a number of seconds, 0 or more")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise _bad("device", self.device, "not a device; give auto, cpu, cuda, cuda:N or mps")
        if self.num_workers is not None and (not isinstance(self.num_workers, int)
                                             or isinstance(self.num_workers, bool)
                                             or self.num_workers < 0):
            raise _bad("num_workers", self.num_workers, "must be a whole number, 0 or more")
        if self.amp_dtype not in AMP_DTYPES:
            raise _bad("amp_dtype", self.amp_dtype, f"give {', '.join(AMP_DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RuntimeConfig":
        return _from_dict(cls, data)


RUNTIME_FIELDS = tuple(f.name for f in fields(RuntimeConfig))


def option_name(field_name: str) -> str:
    """The command-line spelling of a config field (``batch_size`` -> ``--batch-size``)."""
    return "--" + field_name.replace("_", "-")
