"""Chroma in torch, batched (the registry's torch function of the chroma view,
:data:`deepfusion.views.VIEWS`): ``librosa.feature.chroma_stft`` of the batch's power
spectrogram, the tuning of each clip estimated as ``librosa.estimate_tuning`` does unless the
config fixes it.

``piptrack``'s peak picking runs on the device; the median and histogram of the picked peaks
(a few thousand numbers per clip) and the chroma filter bank of each tuning are librosa's own
code on the CPU: counting, not arithmetic.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import torch

from deepfusion.features.torch_views import Batch, normalize_inf


@lru_cache(maxsize=256)
def _chroma_basis(sr: int, n_fft: int, n_chroma: int, tuning: float) -> np.ndarray:
    import librosa

    return librosa.filters.chroma(sr=sr, n_fft=n_fft, tuning=tuning, n_chroma=n_chroma)


def estimate_tuning(power: torch.Tensor, *, sr: int, n_chroma: int) -> list[float]:
    """``librosa.estimate_tuning(S=power, sr=sr, bins_per_octave=n_chroma)`` per clip.

    ``piptrack``'s peak picking runs on the device; the median of the peak magnitudes and the
    histogram of their pitch residuals run in numpy with librosa's code.

    Parameters
    ----------
    power : torch.Tensor [shape=(B, 1 + n_fft/2, t)]

    Returns
    -------
    list of float, one tuning per clip (fractions of a chroma bin)
    """
    import librosa

    S = power
    n_bins = S.shape[-2]
    n_fft = 2 * (n_bins - 1)
    fft_freqs = librosa.fft_frequencies(sr=sr, n_fft=n_fft)
    freq_mask = torch.as_tensor((150.0 <= fft_freqs) & (fft_freqs < min(4000.0, sr / 2)),
                                device=S.device)[:, None]                        # (F, 1)

    # np.gradient along frequency: central inside, one-sided at the edges
    avg = torch.empty_like(S)
    avg[:, 1:-1] = (S[:, 2:] - S[:, :-2]) / 2
    avg[:, 0] = S[:, 1] - S[:, 0]
    avg[:, -1] = S[:, -1] - S[:, -2]
    # librosa's _parabolic_interpolation: the vertex offset, 0 where it leaves [-1, 1]
    a = S[:, 2:] + S[:, :-2] - 2 * S[:, 1:-1]
    b = (S[:, 2:] - S[:, :-2]) / 2
    shift = torch.zeros_like(S)
    shift[:, 1:-1] = torch.where(b.abs() >= a.abs(), torch.zeros_like(a), -b / a)
    dskew = 0.5 * avg * shift

    thresholded = S * (S > 0.1 * S.amax(dim=-2, keepdim=True))
    # librosa.util.localmax: x[i] > x[i-1] and x[i] >= x[i+1]; never the first bin; the last
    # when it exceeds its neighbour
    peak = torch.zeros_like(S, dtype=torch.bool)
    peak[:, 1:-1] = ((thresholded[:, 1:-1] > thresholded[:, :-2])
                     & (thresholded[:, 1:-1] >= thresholded[:, 2:]))
    peak[:, -1] = thresholded[:, -1] > thresholded[:, -2]
    peak &= freq_mask
    bins = torch.arange(n_bins, device=S.device, dtype=S.dtype)[:, None]
    # only the peaks travel to the host: a few percent of the bins
    pitches = ((bins + shift) * (float(sr) / n_fft))[peak].cpu().numpy()
    mags = (S + dskew)[peak].cpu().numpy()
    ends = np.cumsum(peak.flatten(1).sum(dim=1).cpu().numpy())[:-1]

    tunings = []
    for pitch, mag in zip(np.split(pitches, ends), np.split(mags, ends)):
        # librosa: pitch > 0 marks the peaks (a peak's pitch is above fmin)
        pitch_mask = pitch > 0
        threshold = np.median(mag[pitch_mask]) if pitch_mask.any() else 0.0
        with warnings.catch_warnings():
            # silence and noise have no pitched peaks: librosa warns and assumes tuning 0
            warnings.filterwarnings("ignore", message="Trying to estimate tuning",
                                    category=UserWarning)
            tunings.append(float(librosa.pitch_tuning(
                pitch[(mag >= threshold) & pitch_mask], resolution=0.01,
                bins_per_octave=n_chroma)))
    return tunings


def chroma_view(batch: Batch) -> torch.Tensor:
    c = batch.config
    if c.chroma_tuning is None:
        tunings = estimate_tuning(batch.power, sr=c.sample_rate, n_chroma=c.n_chroma)
    else:
        tunings = [float(c.chroma_tuning)] * batch.y.shape[0]
    basis = torch.from_numpy(np.stack([_chroma_basis(c.sample_rate, c.n_fft, c.n_chroma, t)
                                       for t in tunings])).to(batch.device)  # (B, n_chroma, F)
    return normalize_inf(basis @ batch.power, dim=-2)               # (B, n_chroma, t)
