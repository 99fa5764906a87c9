"""Pure feature functions: one STFT per clip feeds every hand-made view.

No files, no globals. :func:`compute_features` computes the views of
:data:`deepfusion.views.VIEWS` that a :class:`~deepfusion.config.FeatureConfig` names, each by
its row's numpy function from one :class:`Clip` (the clip's STFT, HPSS masks and mel
spectrogram, each computed once, on first use); the functions here are the six hand-made
views'. They need no torch; the pretrained view (when ``config.pretrained_view`` names one) is
a frozen torch network's (:mod:`deepfusion.features.pretrained.view`), loaded once per process.

The definitions are librosa's (``librosa.decompose.hpss``, ``librosa.feature.melspectrogram``,
``mfcc``, ``chroma_stft``, ``tempogram``); what differs is the cost: the STFT is computed once,
the harmonic/percussive median filters and soft masks are compiled (:mod:`deepfusion.features.hpss`:
the same values as :func:`scipy.ndimage.median_filter` with ``mode='reflect'`` and
``librosa.util.softmask``, 15 ms instead of 150 for a 30-s clip on one core), and the mel
filter bank is applied to the masked magnitudes instead of re-synthesising and re-analysing
the separated signals.
"""

from __future__ import annotations

import warnings
from functools import cached_property, lru_cache
from typing import Optional

import librosa
import numpy as np

from deepfusion.config import FeatureConfig
from deepfusion.features.hpss import running_median, soft_masks
from deepfusion.features.registry import view_function
from deepfusion.views import views_of


def median_filter_axis(S: np.ndarray, *, size: int, axis: int) -> np.ndarray:
    """Running median of ``S`` along one axis, borders reflected.

    Equals ``scipy.ndimage.median_filter(S, size=shape, mode='reflect')`` where ``shape`` is
    ``size`` along ``axis`` and 1 elsewhere (:func:`deepfusion.features.hpss.running_median`:
    a compiled sorting network, or bottleneck's running median for long windows).

    Parameters
    ----------
    S : np.ndarray [shape=(f, t)]
        Real-valued, finite input (a magnitude spectrogram).
    size : int
        Window length; the output at ``i`` is the median of the window centred on ``i``.
    axis : int
        Axis along which to filter.

    Returns
    -------
    np.ndarray [shape=(f, t)], same dtype as ``S``
    """
    return running_median(S, size=size, axis=axis)


def hpss_masks(S: np.ndarray, *, kernel_size: int = 31, power: float = 2.0,
               margin: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Soft harmonic and percussive masks of a magnitude spectrogram.

    The definition is ``librosa.decompose.hpss(S, kernel_size, power, mask=True, margin)``.

    Parameters
    ----------
    S : np.ndarray [shape=(1 + n_fft/2, t)]
        Magnitude spectrogram.

    Returns
    -------
    mask_harm, mask_perc : np.ndarray [shape=(1 + n_fft/2, t)]
        Multiply ``S`` by a mask to get the harmonic or the percussive magnitude.
    """
    harm = median_filter_axis(S, size=kernel_size, axis=-1)   # smooth along time
    perc = median_filter_axis(S, size=kernel_size, axis=-2)   # smooth along frequency
    return soft_masks(harm, perc, power=power, margin=margin)


@lru_cache(maxsize=8)
def _mel_basis(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> np.ndarray:
    basis = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    basis.flags.writeable = False
    return basis


def power_to_db(S: np.ndarray, *, top_db: float) -> np.ndarray:
    """Decibels relative to the clip's maximum, floored at ``-top_db``.

    ``librosa.power_to_db(S, ref=np.max, top_db=top_db)``: levels are relative to each clip's
    loudest bin, so recording level (which differs between sources) is not a genre cue. An
    all-zero input gives all zeros, never NaN.
    """
    return librosa.power_to_db(S, ref=np.max, top_db=top_db)


def stft_magnitude(y: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """Magnitude of the one STFT every view is computed from.

    Returns
    -------
    np.ndarray [shape=(1 + n_fft/2, n_frames)], float32
    """
    return np.abs(librosa.stft(y, n_fft=config.n_fft, hop_length=config.hop_length))


class Clip:
    """One clip and what its views share, each computed once, on first use: what a registry
    row's numpy function takes. ``y``, ``config`` and ``view_runtime`` are
    :func:`compute_features`' arguments."""

    def __init__(self, y: np.ndarray, config: FeatureConfig, *, view_runtime: Optional[str] = None):
        self.y = np.ascontiguousarray(y, dtype=np.float32)
        self.config = config
        self.view_runtime = view_runtime

    @cached_property
    def magnitude(self) -> np.ndarray:
        """:func:`stft_magnitude` [shape=(1 + n_fft/2, t)]."""
        return stft_magnitude(self.y, self.config)

    @cached_property
    def power(self) -> np.ndarray:
        """The power spectrogram [shape=(1 + n_fft/2, t)]."""
        return self.magnitude * self.magnitude

    @cached_property
    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        """The harmonic and percussive soft masks (:func:`hpss_masks`)."""
        c = self.config
        return hpss_masks(self.magnitude, kernel_size=c.hpss_kernel, power=c.hpss_power,
                          margin=c.hpss_margin)

    @cached_property
    def mel_basis(self) -> np.ndarray:
        """The mel filter bank [shape=(n_mels, 1 + n_fft/2)]."""
        c = self.config
        return _mel_basis(c.sample_rate, c.n_fft, c.n_mels, c.fmin, c.fmax)

    @cached_property
    def mel_db(self) -> np.ndarray:
        """The dB mel spectrogram of the original signal [shape=(n_mels, t)]."""
        return power_to_db(self.mel_basis @ self.power, top_db=self.config.top_db)


# ------------------------------------------------------------- the views (deepfusion.views)

def mel_spec_orig_view(clip: Clip) -> np.ndarray:
    """The dB mel spectrogram [shape=(n_mels, t)]."""
    return clip.mel_db


def _masked_mel_db(clip: Clip, part: int) -> np.ndarray:
    mask = clip.masks[part]
    return power_to_db(clip.mel_basis @ (clip.power * (mask * mask)), top_db=clip.config.top_db)


def mel_spec_harm_view(clip: Clip) -> np.ndarray:
    """The dB mel spectrogram of the harmonic part [shape=(n_mels, t)]."""
    return _masked_mel_db(clip, 0)


def mel_spec_perc_view(clip: Clip) -> np.ndarray:
    """The dB mel spectrogram of the percussive part [shape=(n_mels, t)]."""
    return _masked_mel_db(clip, 1)


def mfcc_view(clip: Clip) -> np.ndarray:
    """MFCC of the dB mel spectrogram [shape=(n_mfcc, t)]."""
    return librosa.feature.mfcc(S=clip.mel_db, n_mfcc=clip.config.n_mfcc)


def chroma_view(clip: Clip) -> np.ndarray:
    """Chroma of the power spectrogram [shape=(n_chroma, t)], tuning estimated per clip
    unless the config fixes it."""
    c = clip.config
    with warnings.catch_warnings():
        # silence and pure noise have no pitched peaks: librosa warns and assumes tuning 0
        warnings.filterwarnings("ignore", message="Trying to estimate tuning", category=UserWarning)
        return librosa.feature.chroma_stft(S=clip.power, sr=c.sample_rate, n_fft=c.n_fft,
                                           n_chroma=c.n_chroma, tuning=c.chroma_tuning)


def tempogram_view(clip: Clip) -> np.ndarray:
    """The autocorrelation tempogram of the onset strength [shape=(tempogram_win_length, t)]."""
    c = clip.config
    # onset_strength's own default is exactly this: diff of the dB mel spectrogram (the
    # reference level cancels in the difference).
    onset = librosa.onset.onset_strength(S=clip.mel_db, sr=c.sample_rate, hop_length=c.hop_length)
    return librosa.feature.tempogram(onset_envelope=onset, sr=c.sample_rate,
                                     hop_length=c.hop_length, win_length=c.tempogram_win_length)


# ------------------------------------------------------------------------- all the views

def compute_features(y: np.ndarray, config: FeatureConfig = FeatureConfig(), *,
                     view_runtime: Optional[str] = None) -> dict[str, np.ndarray]:
    """All feature views of one clip (:func:`deepfusion.views.views_of` the config): the
    hand-made ones and, if the config names one, the pretrained view.

    Parameters
    ----------
    y : np.ndarray [shape=(n_samples,)]
        Mono waveform at ``config.sample_rate`` (already padded or trimmed).
    config : FeatureConfig
    view_runtime : {None, 'onnx', 'torch'}
        What runs the pretrained view's network
        (:func:`deepfusion.features.pretrained.view.runtime_of`): None, onnxruntime where it
        is installed, else torch.

    Returns
    -------
    dict of np.ndarray, all float32:
        ``mel_spec_orig``, ``mel_spec_harm``, ``mel_spec_perc`` [shape=(n_mels, t)] in dB,
        ``mfcc`` [shape=(n_mfcc, t)], ``chroma`` [shape=(n_chroma, t)] and
        ``tempogram`` [shape=(tempogram_win_length, t)], with ``t = 1 + n_samples // hop``;
        ``musicnn`` [shape=(VIEW_ROWS, n_patches)] when ``config.pretrained_view`` is set
        (see :func:`deepfusion.features.pretrained.view.pretrained_view`).
    """
    clip = Clip(y, config, view_runtime=view_runtime)
    return {v.name: np.ascontiguousarray(view_function(v.numpy)(clip), dtype=np.float32)
            for v in views_of(config)}
