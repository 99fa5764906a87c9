"""musicnn's input, exactly as the original computes it: 16-kHz audio resampled as
``librosa.load(f, sr=16000)`` did under the librosa it was built with, a float16-rounded
log-mel spectrogram, 3-s patches. numpy (and librosa, resampy where used) only: no torch.
"""

from __future__ import annotations

import functools

import numpy as np

from deepfusion.errors import ParameterError
# 16 kHz, hop 256, 187-frame patches: the geometry the config counts the view's patches with
from deepfusion.patches import HOP, PATCH_FRAMES, SAMPLE_RATE  # noqa: F401

N_FFT = 512
N_MELS = 96


# ------------------------------------------------------------------------------ input

def resample_16k(y: np.ndarray, sr: int) -> np.ndarray:
    """Resample a mono waveform to 16 kHz as the original's ``librosa.load(f, sr=16000)`` did.

    musicnn asks for librosa >= 0.7, whose default ``res_type`` was ``kaiser_best``, i.e.
    resampy's Kaiser-windowed sinc; the length is then fixed to ``ceil(n * 16000 / sr)``
    (zero-padded or trimmed), as librosa's ``resample(..., fix=True)``.

    Parameters
    ----------
    y : np.ndarray [shape=(n,)]
        Mono waveform at ``sr``.
    sr : int
        Its sample rate (> 0).

    Returns
    -------
    np.ndarray [shape=(ceil(n * 16000 / sr),)], float32; ``y`` itself (as float32) when
    ``sr == 16000``.
    """
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 1:
        raise ParameterError(f"resample_16k expects a mono waveform (1-D), got shape {y.shape}")
    if int(sr) != sr or sr <= 0:
        raise ParameterError(f"sample rate must be a positive integer, got {sr!r}")
    sr = int(sr)
    if sr == SAMPLE_RATE:
        return y
    n_out = int(np.ceil(y.shape[0] * SAMPLE_RATE / sr))
    if y.shape[0] == 0:
        return np.zeros(0, np.float32)
    y16 = _kaiser_best(y, sr)
    if y16.shape[0] >= n_out:
        y16 = y16[:n_out]
    else:
        y16 = np.pad(y16, (0, n_out - y16.shape[0]))
    return np.ascontiguousarray(y16, dtype=np.float32)


#: Above this many polyphase phases (rates whose ratio to 16 kHz reduces to a large fraction)
#: resampy itself runs: the phase tables would cost more than they save.
_MAX_PHASES = 2048


@functools.lru_cache(maxsize=8)
def _phase_kernels(sr: int) -> tuple[np.ndarray, np.ndarray, int]:
    """resampy's ``kaiser_best`` filter for ``sr`` -> 16 kHz, one kernel per output phase.

    Output sample ``t`` sits at input time ``t * sr / 16000``; with ``16000 / sr = up / down``
    in lowest terms the fractional part, hence resampy's filter weights, repeat every ``up``
    outputs. Row ``p`` holds the weights of phase ``p`` over the ``2 * half`` input samples
    around the output's integer part, computed as resampy's loop computes them (its table,
    its truncated table step, its linear interpolation); ``starts[p]`` is that integer part
    for ``t = p``.

    Returns
    -------
    kernels [shape=(up, 2 * half)] float64, starts [shape=(up,)] int64, half
    """
    from fractions import Fraction

    from resampy.filters import get_filter

    ratio = SAMPLE_RATE / sr
    up = Fraction(SAMPLE_RATE, sr).numerator
    table, precision, _ = get_filter("kaiser_best")
    if ratio < 1:
        table = ratio * table
    delta = np.diff(table, append=table[-1])
    scale = min(1.0, ratio)
    step = int(scale * precision)
    half = len(table) // step + 2
    kernels = np.zeros((up, 2 * half))
    times = np.arange(up) * (1.0 / ratio)
    starts = times.astype(np.int64)
    for p, (t, n) in enumerate(zip(times, starts)):
        frac = scale * (t - n)
        for sign, f, first in ((-1, frac, half), (1, scale - frac, half + 1)):
            index = f * precision
            offset = int(index)
            eta = index - offset
            taps = np.arange((len(table) - offset) // step)
            kernels[p, first + sign * taps] = table[offset + taps * step] + eta * delta[offset + taps * step]
    return kernels, starts, half


def _kaiser_best(y: np.ndarray, sr: int) -> np.ndarray:
    """``resampy.resample(y, sr, 16000, filter='kaiser_best')``, as a polyphase filter.

    The same weights as resampy's loop (:func:`_phase_kernels`), applied to every output of
    a phase at once (a matrix-vector product over a strided view of the input) instead of one
    output at a time: about 5x faster for a 30-s clip at 22,050 Hz, and equal to resampy's
    output within float32 rounding (resampy sums in float32, this in float64;
    ``tests/test_musicnn.py`` compares the two). Samples beyond the ends count as zeros, as
    resampy's truncated filter wings do.
    """
    from fractions import Fraction

    frac = Fraction(SAMPLE_RATE, sr)
    n_out = int(y.shape[0] * SAMPLE_RATE / sr)
    if frac.numerator > _MAX_PHASES or n_out < 1:
        import resampy

        return resampy.resample(y, sr, SAMPLE_RATE, filter="kaiser_best", axis=-1)
    kernels, starts, half = _phase_kernels(sr)
    up, down = frac.numerator, frac.denominator
    padded = np.pad(y.astype(np.float64), (half, half))
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half)   # (n + 1, 2 * half)
    out = np.empty(n_out, np.float64)
    for p in range(min(up, n_out)):
        count = len(range(p, n_out, up))
        # outputs p, p + up, ...: integer parts starts[p], starts[p] + down, ...
        out[p::up] = windows[starts[p]:starts[p] + count * down:down] @ kernels[p]
    return out.astype(np.float32)


def log_mel(y16k: np.ndarray) -> np.ndarray:
    """musicnn's input representation of a 16-kHz waveform.

    A power mel spectrogram (n_fft 512, hop 256, Hann window, centred frames with reflect
    padding as librosa < 0.10 did, 96 Slaney mel bands over 0-8 kHz), rounded to float16 as
    the original does, then ``log10(10000 * mel + 1)`` computed in float32 (the original's
    numpy < 1.17 promoted ``10000 * float16`` to float32; numpy >= 2 keeps float16 there and
    overflows above 6.55). No other normalisation.

    Parameters
    ----------
    y16k : np.ndarray [shape=(n,)]
        Mono waveform at 16 kHz (see :func:`resample_16k`); at least 257 samples.

    Returns
    -------
    np.ndarray [shape=(1 + n // 256, 96)], float32, time-major.
    """
    y = np.asarray(y16k, dtype=np.float32)
    if y.ndim != 1:
        raise ParameterError(f"log_mel expects a mono waveform (1-D), got shape {y.shape}")
    if y.shape[0] <= N_FFT // 2:
        raise ParameterError(f"log_mel needs more than {N_FFT // 2} samples, got {y.shape[0]}")
    import librosa

    mel = librosa.feature.melspectrogram(y=y, sr=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP,
                                         n_mels=N_MELS, pad_mode="reflect")   # (96, frames)
    mel = mel.T.astype(np.float16).astype(np.float32)                         # (frames, 96)
    return np.log10(np.float32(10000) * mel + np.float32(1)).astype(np.float32)


def patches(mel: np.ndarray) -> np.ndarray:
    """Cut a log-mel spectrogram into musicnn's 3-s patches, as the original extractor.

    Non-overlapping patches of :data:`PATCH_FRAMES` frames from frame 0; the partial last
    patch is dropped (a 30-s clip gives 1876 frames, so 10 patches). A spectrogram shorter
    than one patch gives an empty array of shape (0, 187, 96): the callers decide whether
    to pad (the original extractor fails on such clips).

    Parameters
    ----------
    mel : np.ndarray [shape=(frames, 96)]

    Returns
    -------
    np.ndarray [shape=(frames // 187, 187, 96)], float32, C-contiguous.
    """
    mel = np.asarray(mel, dtype=np.float32)
    if mel.ndim != 2 or mel.shape[1] != N_MELS:
        raise ParameterError(f"patches expects a (frames, {N_MELS}) log-mel, got shape {mel.shape}")
    n = mel.shape[0] // PATCH_FRAMES
    return np.ascontiguousarray(mel[:n * PATCH_FRAMES].reshape(n, PATCH_FRAMES, N_MELS))
