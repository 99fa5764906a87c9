"""The feature views in torch, batched over clips, on any device (cpu, cuda, mps).

The definitions are :func:`deepfusion.features.numpy_views.compute_features`' (librosa's), step for step:
one centred STFT per clip (``torch.stft``, zero padding as ``librosa.stft``), median-filter HPSS
soft masks (kernel along time and along frequency, borders reflected as
:func:`~deepfusion.features.numpy_views.median_filter_axis` does), the mel filter bank, ``power_to_db``
relative to each clip's maximum, MFCC (DCT-II, orthonormal), chroma (``chroma_stft``, tuning
estimated per clip with ``piptrack`` as librosa does unless the config fixes it:
:mod:`deepfusion.features.torch_chroma`), onset
strength and the autocorrelation tempogram. Every constant matrix (mel, chroma, DCT, window) is
made by librosa/scipy and moved to the device, never re-derived.

What runs where: the per-bin work (STFT, medians, masks, filter banks, dB, onsets, tempogram,
piptrack's peak picking) runs on the device in float32. Two small steps run on the CPU with
librosa's own code because they are not arithmetic but counting: the median and histogram of
the picked peaks that give a clip's tuning (a few thousand numbers per clip), and the chroma
filter bank of that tuning. On the CPU device the two median filters run through
:func:`~deepfusion.features.numpy_views.median_filter_axis` (a compiled sorting network,
:mod:`deepfusion.features.hpss`), far faster there than ``torch.median`` over unfolded
windows; both give the same values (a median picks an input).

The values agree with :func:`~deepfusion.features.numpy_views.compute_features` to float32 rounding of
the STFT, not bit for bit: :data:`TOLERANCE` per view (``tests/test_features_torch.py``).

:func:`compute_features_torch` computes each view of :data:`deepfusion.views.VIEWS` by its
row's torch function from one :class:`Batch` (the batch's STFT, masks and mel spectrogram,
each computed once, on first use); a row without one is computed by its numpy function, clip
by clip, on the CPU (the same values as the numpy backend's).
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from typing import Sequence, Union

import numpy as np
import torch

from deepfusion.config import FeatureConfig
from deepfusion.errors import ParameterError
from deepfusion.features.registry import view_function
from deepfusion.views import VIEWS, views_of

#: Largest absolute difference from :func:`deepfusion.features.numpy_views.compute_features` allowed per
#: view (each row's ``tolerance``, set above what 80 real clips and the synthetic test clips show;
#: see ``tests/test_features_torch.py``): within these the two backends share the cache key. The
#: pretrained view is the same network on either backend; on a GPU it differs by float32
#: rounding of another summation order (its front-end maxima reach about 150). A view computed
#: by its numpy function on either backend agrees exactly (0).
TOLERANCE = {v.name: v.tolerance for v in VIEWS}

#: Largest number of elements the unfolded median windows may hold at once (float32: 512 MiB).
MEDIAN_CHUNK_ELEMENTS = 1 << 27

#: librosa.onset.onset_strength's own ``n_fft`` (the one it centres the envelope with): it is
#: not passed the STFT's, so its default applies whatever ``FeatureConfig.n_fft`` is.
_ONSET_N_FFT = 2048


# ------------------------------------------------------------------- constants from librosa

@lru_cache(maxsize=8)
def _constants(config: FeatureConfig) -> dict[str, np.ndarray]:
    """The window, mel filter bank and DCT matrix of ``config``, made by librosa/scipy."""
    import librosa
    import scipy.fft

    from deepfusion.features.numpy_views import _mel_basis

    window = librosa.filters.get_window("hann", config.n_fft, fftbins=True)
    # librosa.feature.mfcc is scipy.fft.dct(S, axis=-2, type=2, norm="ortho")[:n_mfcc]: a
    # linear map, so its matrix is the DCT of the identity
    dct = scipy.fft.dct(np.eye(config.n_mels), axis=0, type=2, norm="ortho")[: config.n_mfcc]
    tempo_window = librosa.filters.get_window("hann", config.tempogram_win_length, fftbins=True)
    return {
        "window": window.astype(np.float32),
        "mel": np.array(_mel_basis(config.sample_rate, config.n_fft, config.n_mels,
                                   config.fmin, config.fmax), dtype=np.float32),
        "dct": dct.astype(np.float32),
        "tempo_window": tempo_window.astype(np.float32),
    }


def _symmetric_index(n: int, before: int, after: int) -> np.ndarray:
    """Indices that pad a length-``n`` axis as ``np.pad(..., mode='symmetric')`` does."""
    return np.pad(np.arange(n), (before, after), mode="symmetric")


# ------------------------------------------------------------------------------ the steps

def median_filter(S: torch.Tensor, *, size: int, dim: int) -> torch.Tensor:
    """Running median of ``S`` along ``dim``, borders reflected (edge sample repeated).

    Equals :func:`deepfusion.features.numpy_views.median_filter_axis` on each clip. On accelerators the
    windows are unfolded and reduced with ``torch.median``, in chunks of at most
    :data:`MEDIAN_CHUNK_ELEMENTS`; on the CPU :func:`deepfusion.features.hpss.running_median`
    does the same faster (its compiled kernel releases the GIL), on torch's threads
    (:func:`_median_on_threads`).

    Parameters
    ----------
    S : torch.Tensor [shape=(..., f, t)]
    size : int
        Odd window length.
    dim : int
        -1 (along time) or -2 (along frequency).

    Returns
    -------
    torch.Tensor [shape=S.shape], same dtype and device
    """
    if size <= 1:
        return S.clone()
    if S.device.type == "cpu":
        return torch.from_numpy(_median_on_threads(S.numpy(), size=size, axis=dim))
    return median_filter_unfold(S, size=size, dim=dim)


def _median_on_threads(S: np.ndarray, *, size: int, axis: int) -> np.ndarray:
    """:func:`~deepfusion.features.numpy_views.median_filter_axis` of ``S`` in slices across
    another axis (clips, else bins or frames), one per torch thread: the compiled kernel lets go of the
    GIL, so extract's main process filters a batch on every core, not on one."""
    from concurrent.futures import ThreadPoolExecutor

    from deepfusion.features.numpy_views import median_filter_axis

    threads = torch.get_num_threads()
    split = 0 if S.ndim > 2 and S.shape[0] >= threads else S.ndim - 1 - (axis % S.ndim == S.ndim - 1)
    parts = [p for p in np.array_split(np.arange(S.shape[split]), threads) if len(p)]
    if len(parts) <= 1:
        return median_filter_axis(S, size=size, axis=axis)
    out = np.empty_like(S)

    def one(part: np.ndarray) -> None:
        where = (slice(None),) * split + (slice(int(part[0]), int(part[-1]) + 1),)
        out[where] = median_filter_axis(S[where], size=size, axis=axis)
    with ThreadPoolExecutor(len(parts)) as pool:
        list(pool.map(one, parts))
    return out


def median_filter_unfold(S: torch.Tensor, *, size: int, dim: int) -> torch.Tensor:
    """:func:`median_filter` on any device: windows unfolded and reduced with ``torch.median``,
    at most :data:`MEDIAN_CHUNK_ELEMENTS` window elements at a time.

    Parameters
    ----------
    S : torch.Tensor [shape=(..., f, t)]
    size : int
        Odd window length.
    dim : int
        -1 or -2.

    Returns
    -------
    torch.Tensor [shape=S.shape]
    """
    X = S.movedim(dim, -1)                                     # (..., other, n)
    n = X.shape[-1]
    before = size // 2
    index = torch.as_tensor(_symmetric_index(n, before, size - 1 - before), device=S.device)
    flat = X.reshape(-1, n)                                    # (rows, n)
    out = torch.empty_like(flat)
    rows = max(1, MEDIAN_CHUNK_ELEMENTS // (n * size))
    for r in range(0, flat.shape[0], rows):
        padded = flat[r:r + rows].index_select(-1, index)      # (rows, n + size - 1)
        # an odd window: torch.median's lower median is the median
        out[r:r + rows] = padded.unfold(-1, size, 1).median(dim=-1).values
    return out.view(X.shape).movedim(-1, dim)


def softmask(X: torch.Tensor, X_ref: torch.Tensor, *, power: float,
             split_zeros: bool) -> torch.Tensor:
    """``librosa.util.softmask(X, X_ref, power=power, split_zeros=split_zeros)``, finite power."""
    Z = torch.maximum(X, X_ref)
    bad = Z < torch.finfo(Z.dtype).tiny
    Z = torch.where(bad, torch.ones_like(Z), Z)
    mask = (X / Z) ** power
    ref_mask = (X_ref / Z) ** power
    mask = mask / (mask + ref_mask)
    return torch.where(bad, torch.full_like(mask, 0.5 if split_zeros else 0.0), mask)


def power_to_db(S: torch.Tensor, *, top_db: float, amin: float = 1e-10) -> torch.Tensor:
    """``librosa.power_to_db(S, ref=np.max, top_db=top_db)`` per clip.

    Parameters
    ----------
    S : torch.Tensor [shape=(B, n, t)]
    """
    ref = S.amax(dim=(-2, -1), keepdim=True)
    log_spec = 10.0 * torch.log10(S.clamp(min=amin)) - 10.0 * torch.log10(ref.clamp(min=amin))
    floor = log_spec.amax(dim=(-2, -1), keepdim=True) - top_db
    return torch.maximum(log_spec, floor)


def normalize_inf(S: torch.Tensor, *, dim: int) -> torch.Tensor:
    """``librosa.util.normalize(S, norm=np.inf, axis=dim)``: columns below ``tiny`` unchanged."""
    length = S.abs().amax(dim=dim, keepdim=True)
    length = torch.where(length < torch.finfo(S.dtype).tiny, torch.ones_like(length), length)
    return S / length


def onset_strength(db: torch.Tensor, *, hop_length: int) -> torch.Tensor:
    """``librosa.onset.onset_strength(S=db, hop_length=hop_length)``: the mean over bands of the
    positive first difference, delayed by the lag and the framing offset.

    Parameters
    ----------
    db : torch.Tensor [shape=(B, n_mels, t)]

    Returns
    -------
    torch.Tensor [shape=(B, t)]
    """
    t = db.shape[-1]
    env = (db[..., 1:] - db[..., :-1]).clamp(min=0).mean(dim=-2)     # (B, t - 1)
    pad = 1 + _ONSET_N_FFT // (2 * hop_length)
    return torch.nn.functional.pad(env, (pad, 0))[..., :t]


def tempogram(onset: torch.Tensor, *, window: torch.Tensor) -> torch.Tensor:
    """``librosa.feature.tempogram(onset_envelope=onset, win_length=len(window))``: the
    autocorrelation of each windowed, centred stretch of the envelope, max-normalised.

    Parameters
    ----------
    onset : torch.Tensor [shape=(B, t)]
    window : torch.Tensor [shape=(win_length,)]
        The periodic Hann window librosa uses.

    Returns
    -------
    torch.Tensor [shape=(B, win_length, t)]
    """
    t = onset.shape[-1]
    win = window.shape[0]
    half = win // 2
    # np.pad(mode="linear_ramp", end_values=0): from 0 at the outer edge to the edge sample
    k = torch.arange(half, device=onset.device, dtype=onset.dtype)
    padded = torch.cat([onset[:, :1] * (k / half), onset,
                        onset[:, -1:] * ((half - 1 - k) / half)], dim=-1)   # (B, t + 2 half)
    frames = padded.unfold(-1, win, 1)[:, :t] * window             # (B, t, win)
    n_fft = 1 << (2 * win - 2).bit_length()                          # >= 2 win - 1
    spec = torch.fft.rfft(frames, n=n_fft, dim=-1)
    ac = torch.fft.irfft(spec.real ** 2 + spec.imag ** 2, n=n_fft, dim=-1)[..., :win]
    return normalize_inf(ac, dim=-1).transpose(-1, -2)             # (B, win, t)


# ------------------------------------------------------------------------------ the batch

def _as_batch(y_batch, device: torch.device) -> torch.Tensor:
    if isinstance(y_batch, torch.Tensor):
        y = y_batch.detach()
    elif isinstance(y_batch, np.ndarray):
        y = torch.from_numpy(np.ascontiguousarray(y_batch, dtype=np.float32))
    else:
        y = torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in y_batch]))
    if y.ndim == 1:
        y = y[None]
    if y.ndim != 2:
        raise ParameterError(f"expected clips of shape (batch, samples), got {tuple(y.shape)}")
    if y.shape[-1] < 1:
        raise ParameterError("clips hold no samples")
    y = y.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(y).all()):
        raise ParameterError("a clip holds non-finite samples (NaN or infinity)")
    return y


class Batch:
    """A batch of clips on a device and what its views share, each computed once, on first use.

    ``y`` [shape=(B, n_samples)] float32 on ``device``; ``consts`` the window, mel filter bank,
    DCT matrix and tempogram window of ``config`` on ``device``.
    """

    def __init__(self, y: torch.Tensor, config: FeatureConfig, device: torch.device):
        self.y, self.config, self.device = y, config, device
        self.consts = {k: torch.from_numpy(v).to(device) for k, v in _constants(config).items()}

    @cached_property
    def _spectra(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The power spectrogram and the harmonic and percussive soft masks, each
        (B, 1 + n_fft/2, t); the magnitude is not kept (device memory)."""
        c = self.config
        spec = torch.stft(self.y, n_fft=c.n_fft, hop_length=c.hop_length,
                          window=self.consts["window"], center=True, pad_mode="constant",
                          return_complex=True)                        # (B, F, t)
        S = spec.abs()
        del spec
        harm = median_filter(S, size=c.hpss_kernel, dim=-1)          # smooth along time
        perc = median_filter(S, size=c.hpss_kernel, dim=-2)          # smooth along frequency
        split_zeros = c.hpss_margin == 1
        mask_h = softmask(harm, perc * c.hpss_margin, power=c.hpss_power, split_zeros=split_zeros)
        mask_p = softmask(perc, harm * c.hpss_margin, power=c.hpss_power, split_zeros=split_zeros)
        del harm, perc
        return S * S, mask_h, mask_p

    @property
    def power(self) -> torch.Tensor:
        """The power spectrogram [shape=(B, 1 + n_fft/2, t)]."""
        return self._spectra[0]

    @cached_property
    def mel_db(self) -> torch.Tensor:
        """The dB mel spectrogram of the original signal [shape=(B, n_mels, t)]."""
        return power_to_db(self.consts["mel"] @ self.power, top_db=self.config.top_db)

    @cached_property
    def clips(self) -> list:
        """:class:`~deepfusion.features.numpy_views.Clip` of each clip, for the numpy functions
        of rows without a torch one (on the CPU)."""
        from deepfusion.features.numpy_views import Clip

        return [Clip(y, self.config) for y in self.y.float().cpu().numpy()]


# ------------------------------------------------------------- the views (deepfusion.views)

def mel_spec_orig_view(batch: Batch) -> torch.Tensor:
    return batch.mel_db


def _masked_mel_db(batch: Batch, part: int) -> torch.Tensor:
    mask = batch._spectra[1 + part]
    return power_to_db(batch.consts["mel"] @ (batch.power * (mask * mask)),
                       top_db=batch.config.top_db)


def mel_spec_harm_view(batch: Batch) -> torch.Tensor:
    return _masked_mel_db(batch, 0)


def mel_spec_perc_view(batch: Batch) -> torch.Tensor:
    return _masked_mel_db(batch, 1)


def mfcc_view(batch: Batch) -> torch.Tensor:
    return batch.consts["dct"] @ batch.mel_db                       # (B, n_mfcc, t)


def tempogram_view(batch: Batch) -> torch.Tensor:
    onset = onset_strength(batch.mel_db, hop_length=batch.config.hop_length)   # (B, t)
    return tempogram(onset, window=batch.consts["tempo_window"])    # (B, win, t)


def _on_host(batch: Batch, view) -> np.ndarray:
    """One view of the batch as a float32 array (B, rows, time): its torch function's, or its
    numpy function's clip by clip."""
    if view.torch is None:
        numpy = view_function(view.numpy)
        return np.stack([np.ascontiguousarray(numpy(clip), dtype=np.float32)
                         for clip in batch.clips])
    out = view_function(view.torch)(batch)
    return out.float().cpu().numpy() if isinstance(out, torch.Tensor) else out


@torch.inference_mode()
def compute_features_torch(
    y_batch: Union[np.ndarray, torch.Tensor, Sequence[np.ndarray]],
    config: FeatureConfig = FeatureConfig(),
    *,
    device: Union[str, torch.device] = "cpu",
) -> list[dict[str, np.ndarray]]:
    """All feature views of a batch of clips (:func:`deepfusion.views.views_of` the
    config), computed on ``device`` (the pretrained view too, when the config names one:
    resampled on the CPU, its network on ``device``; a view without a torch function by its
    numpy function on the CPU).

    Parameters
    ----------
    y_batch : np.ndarray or torch.Tensor [shape=(B, n_samples)], or a sequence of B arrays
        Mono waveforms of one length at ``config.sample_rate`` (already padded or trimmed);
        a single clip of shape ``(n_samples,)`` is a batch of one.
    config : FeatureConfig
    device : str or torch.device
        Where the work runs: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Returns
    -------
    list of B dicts of np.ndarray, all float32, as :func:`deepfusion.features.numpy_views.compute_features`:
        ``mel_spec_orig``, ``mel_spec_harm``, ``mel_spec_perc`` [shape=(n_mels, t)] in dB,
        ``mfcc`` [shape=(n_mfcc, t)], ``chroma`` [shape=(n_chroma, t)] and
        ``tempogram`` [shape=(tempogram_win_length, t)], with ``t = 1 + n_samples // hop``.

    Raises
    ------
    ParameterError
        Not a batch of equal-length clips, or non-finite samples.
    """
    device = torch.device(device)
    batch = Batch(_as_batch(y_batch, device), config, device)          # (B, n)
    host = {v.name: _on_host(batch, v) for v in views_of(config)}
    return [{k: np.ascontiguousarray(v[i]) for k, v in host.items()}
            for i in range(batch.y.shape[0])]
