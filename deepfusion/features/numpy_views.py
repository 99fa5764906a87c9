"""Pure feature functions: one STFT per clip feeds every hand-made view.

No files, no globals. Every function takes numpy arrays and a
:class:`~deepfusion.config.FeatureConfig` and returns float32 arrays. The six hand-made views
need no torch; the seventh, pretrained view (when ``config.pretrained_view`` names one) is a
frozen torch network's (:mod:`deepfusion.features.pretrained.view`), loaded once per process.

The definitions are librosa's (``librosa.decompose.hpss``, ``librosa.feature.melspectrogram``,
``mfcc``, ``chroma_stft``, ``tempogram``); what differs is the cost: the STFT is computed once,
the harmonic/percussive median filters run through :func:`bottleneck.move_median` (the same
result as :func:`scipy.ndimage.median_filter` with ``mode='reflect'``, several times faster),
and the mel filter bank is applied to the masked magnitudes instead of re-synthesising and
re-analysing the separated signals.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Optional

import bottleneck
import librosa
import numpy as np

from deepfusion.config import PRETRAINED_KEY, FeatureConfig


def median_filter_axis(S: np.ndarray, *, size: int, axis: int) -> np.ndarray:
    """Running median of ``S`` along one axis, borders reflected.

    Equals ``scipy.ndimage.median_filter(S, size=shape, mode='reflect')`` where ``shape`` is
    ``size`` along ``axis`` and 1 elsewhere.

    Parameters
    ----------
    S : np.ndarray [shape=(f, t)]
        Real-valued input (a magnitude spectrogram).
    size : int
        Window length; the output at ``i`` is the median of the window centred on ``i``.
    axis : int
        Axis along which to filter.

    Returns
    -------
    np.ndarray [shape=(f, t)], same dtype as ``S``
    """
    if size <= 1:
        return S.copy()
    before = size // 2
    after = size - 1 - before
    # numpy's "symmetric" padding is scipy.ndimage's "reflect" mode (edge sample repeated).
    padded = np.pad(np.moveaxis(S, axis, -1), [(0, 0)] * (S.ndim - 1) + [(before, after)],
                    mode="symmetric")
    # bottleneck's window trails its output index; dropping the first size-1 outputs centres it.
    out = bottleneck.move_median(padded, window=size, axis=-1)[..., size - 1:]
    return np.ascontiguousarray(np.moveaxis(out, -1, axis), dtype=S.dtype)


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
    split_zeros = margin == 1
    mask_harm = librosa.util.softmask(harm, perc * margin, power=power, split_zeros=split_zeros)
    mask_perc = librosa.util.softmask(perc, harm * margin, power=power, split_zeros=split_zeros)
    return mask_harm, mask_perc


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


def compute_features(y: np.ndarray, config: FeatureConfig = FeatureConfig(), *,
                     view_runtime: Optional[str] = None) -> dict[str, np.ndarray]:
    """All feature views of one clip: the six hand-made ones and, if the config names one,
    the pretrained view.

    Parameters
    ----------
    y : np.ndarray [shape=(n_samples,)]
        Mono waveform at ``config.sample_rate`` (already padded or trimmed).
    config : FeatureConfig
    view_runtime : {None, 'onnx'}
        What runs the pretrained view's network (:func:`deepfusion.features.pretrained.view.pretrained_view`'s
        ``runtime``): torch where installed, or onnxruntime.

    Returns
    -------
    dict of np.ndarray, all float32:
        ``mel_spec_orig``, ``mel_spec_harm``, ``mel_spec_perc`` [shape=(n_mels, t)] in dB,
        ``mfcc`` [shape=(n_mfcc, t)], ``chroma`` [shape=(n_chroma, t)] and
        ``tempogram`` [shape=(tempogram_win_length, t)], with ``t = 1 + n_samples // hop``;
        ``musicnn`` [shape=(VIEW_ROWS, n_patches)] when ``config.pretrained_view`` is set
        (see :func:`deepfusion.features.pretrained.view.pretrained_view`).
    """
    y = np.ascontiguousarray(y, dtype=np.float32)
    sr = config.sample_rate
    S = stft_magnitude(y, config)                                   # (F, t)
    mask_h, mask_p = hpss_masks(S, kernel_size=config.hpss_kernel, power=config.hpss_power,
                                margin=config.hpss_margin)
    basis = _mel_basis(sr, config.n_fft, config.n_mels, config.fmin, config.fmax)  # (n_mels, F)
    power = S * S                                                   # (F, t)
    mel_orig = basis @ power                                        # (n_mels, t)
    mel_harm = basis @ (power * (mask_h * mask_h))
    mel_perc = basis @ (power * (mask_p * mask_p))
    db_orig = power_to_db(mel_orig, top_db=config.top_db)
    mfcc = librosa.feature.mfcc(S=db_orig, n_mfcc=config.n_mfcc)
    with warnings.catch_warnings():
        # silence and pure noise have no pitched peaks: librosa warns and assumes tuning 0
        warnings.filterwarnings("ignore", message="Trying to estimate tuning", category=UserWarning)
        chroma = librosa.feature.chroma_stft(S=power, sr=sr, n_fft=config.n_fft,
                                             n_chroma=config.n_chroma, tuning=config.chroma_tuning)
    # onset_strength's own default is exactly this: diff of the dB mel spectrogram (the
    # reference level cancels in the difference).
    onset = librosa.onset.onset_strength(S=db_orig, sr=sr, hop_length=config.hop_length)
    tempogram = librosa.feature.tempogram(onset_envelope=onset, sr=sr,
                                          hop_length=config.hop_length,
                                          win_length=config.tempogram_win_length)
    out = {
        "mel_spec_orig": db_orig,
        "mel_spec_harm": power_to_db(mel_harm, top_db=config.top_db),
        "mel_spec_perc": power_to_db(mel_perc, top_db=config.top_db),
        "mfcc": mfcc,
        "chroma": chroma,
        "tempogram": tempogram,
    }
    if config.pretrained_view is not None:
        from deepfusion.features.pretrained.view import pretrained_view

        out[PRETRAINED_KEY] = pretrained_view(y, sr, config.pretrained_view,
                                              stride=config.pretrained_stride,
                                              runtime=view_runtime)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
