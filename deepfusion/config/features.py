"""FeatureConfig: what the features are (and so the cache key of every clip's entry)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Optional

from deepfusion.config.fields import bad, flag_of, from_dict_of
from deepfusion.patches import n_patches
from deepfusion.views import feature_shapes, view_keys

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
            raise bad("pretrained_view", self.pretrained_view,
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
                raise bad(name, value, "must be a whole number above 0")
        if self.hpss_kernel % 2 == 0:
            # an even window has no centre sample: its median is not one of the inputs
            raise bad("hpss_kernel", self.hpss_kernel, "must be odd (e.g. 31)")
        if not self.duration > 0:
            raise bad("duration", self.duration, "must be above 0 seconds")
        if not 0 <= self.min_duration:
            raise bad("min_duration", self.min_duration, "must be 0 seconds or more")
        if not self.min_duration <= self.duration:
            raise bad("min_duration", self.min_duration,
                       f"at most {flag_of('duration')} ({self.duration:g})")
        if self.hop_length > self.n_fft:
            raise bad("hop_length", self.hop_length, f"at most {flag_of('n_fft')} ({self.n_fft})")
        nyquist = self.sample_rate / 2
        half = f"half of {flag_of('sample_rate')}, {nyquist:g} Hz"
        if self.fmax is not None and not 0 < self.fmax <= nyquist:
            raise bad("fmax", self.fmax,
                       f"must be above 0 and at most half of {flag_of('sample_rate')} ({nyquist:g} Hz)")
        if not 0 <= self.fmin:
            raise bad("fmin", self.fmin, "must be 0 Hz or more")
        if self.fmax is None and not self.fmin < nyquist:
            raise bad("fmin", self.fmin, f"must be below {flag_of('fmax')} (default: {half})")
        if self.fmax is not None and not self.fmin < self.fmax:
            raise bad("fmin", self.fmin, f"must be below {flag_of('fmax')} ({self.fmax:g})")
        if self.hpss_margin < 1:
            raise bad("hpss_margin", self.hpss_margin, "must be 1 or more")
        if self.hpss_power <= 0:
            raise bad("hpss_power", self.hpss_power, "must be above 0")
        if self.top_db <= 0:
            raise bad("top_db", self.top_db, "must be above 0")
        if self.n_mfcc > self.n_mels:
            raise bad("n_mfcc", self.n_mfcc, f"at most {flag_of('n_mels')} ({self.n_mels})")

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
        return from_dict_of(cls, {"pretrained_view": None, **data})

    def differences(self, other: "FeatureConfig") -> dict[str, tuple[Any, Any]]:
        """``{field: (self's value, other's)}`` of every field where the two differ."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    def differences_text(self, other: "FeatureConfig", *, there: str = "there") -> str:
        """The settings where this config (here) and ``other`` differ, by their flags:
        ``"--sr 100 here, 22050 for the model"`` (several joined by ", ")."""
        def value(field: str, v: Any) -> str:
            if v is None:   # an option given as a word: --pretrained-view none, --fmax auto
                return "none" if field == "pretrained_view" else "auto"
            return f"{v:g}" if isinstance(v, float) else str(v)

        return ", ".join(f"{flag_of(k)} {value(k, a)} here, {value(k, b)} {there}"
                         for k, (a, b) in self.differences(other).items())

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
