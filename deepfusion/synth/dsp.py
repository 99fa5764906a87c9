"""DSP pieces of the synthetic generator: oscillators, envelopes, drum voices, filters,
tilt and drive (numpy and :mod:`scipy.signal`, no state).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import signal

from deepfusion.errors import ParameterError
from deepfusion.synth.recipes import _TIMBRES

# The tilt of the "shifted" production (:func:`_tilt`).
_TILT_PIVOT = 1000.0                  # Hz: the tilt leaves this frequency's level alone
_TILT_FLOOR = 100.0                   # Hz: flat below, so the tilt does not pump the sub-bass


# --------------------------------------------------------------------------------------------
# Oscillators and one-shot instruments (all return float64 arrays of shape (n,))


def _polyblep(phase: np.ndarray, dt: float) -> np.ndarray:
    """Band-limiting residual of a unit step at phase 0, so saws and squares do not alias."""
    out = np.zeros_like(phase)
    before = phase > 1.0 - dt
    after = phase < dt
    x = phase[after] / dt
    out[after] = 2 * x - x * x - 1
    x = (phase[before] - 1.0) / dt
    out[before] = x * x + 2 * x + 1
    return out


def _saw(freq: float, *, n: int, sr: int, phase0: float = 0.0) -> np.ndarray:
    dt = freq / sr
    phase = (phase0 + dt * np.arange(n)) % 1.0
    return 2.0 * phase - 1.0 - _polyblep(phase, dt)


def _square(freq: float, *, n: int, sr: int) -> np.ndarray:
    dt = freq / sr
    phase = (dt * np.arange(n)) % 1.0
    return (np.where(phase < 0.5, 1.0, -1.0) + _polyblep(phase, dt)
            - _polyblep((phase + 0.5) % 1.0, dt))


def _karplus_strong(freq: float, *, n: int, sr: int, rng: np.random.Generator,
                    damping: float = 0.996) -> np.ndarray:
    """Plucked string: a noise burst circulating in a delay line with an averaging filter.

    The loop runs one period per numpy operation. Its delay is an integer ``P`` plus the
    averaging filter's half sample, so the string is rendered slightly sharp and read back
    slower with linear interpolation to land exactly on ``freq`` (chroma must be in tune).
    """
    period = max(int(sr / freq - 0.5), 2)
    ratio = freq * (period + 0.5) / sr                    # <= 1: read the string slower
    n_raw = int(math.ceil(n * ratio)) + 2
    y = np.empty(max(n_raw, period + 2))
    burst = rng.uniform(-1.0, 1.0, period + 1)
    y[:period + 1] = burst - burst.mean()
    start = period + 1
    gain = 0.5 * damping
    while start < n_raw:
        stop = min(start + period, n_raw)
        y[start:stop] = gain * (y[start - period:stop - period]
                                + y[start - period - 1:stop - period - 1])
        start = stop
    return np.interp(np.arange(n) * ratio, np.arange(y.size), y)


def _oscillator(timbre: str, freq: float, *, n: int, sr: int,
                rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of one sustained note of ``timbre`` at ``freq`` Hz, peak about 1."""
    t = np.arange(n) / sr
    if timbre == "sine":
        return np.sin(2 * np.pi * freq * t) + 0.15 * np.sin(4 * np.pi * freq * t)
    if timbre == "saw":
        # two detuned saws: the chorus that makes a pad or a stab sound "synth"
        return 0.5 * (_saw(freq * 1.004, n=n, sr=sr)
                      + _saw(freq / 1.004, n=n, sr=sr, phase0=rng.random()))
    if timbre == "square":
        return _square(freq, n=n, sr=sr)
    if timbre == "organ":
        # drawbars 8', 4', 2 2/3', 2': odd and even partials, no decay
        partials = np.array([1.0, 2.0, 3.0, 4.0])
        weights = np.array([1.0, 0.6, 0.4, 0.25])
        keep = partials * freq < sr / 2
        return np.sin(2 * np.pi * freq * np.outer(t, partials[keep])) @ weights[keep] / 1.6
    if timbre in ("fm", "bell"):
        # 1:1 gives an electric-piano/clav tone, 3.5:1 an inharmonic bell; the index decays
        ratio, index, tau = (1.0, 3.0, 0.15) if timbre == "fm" else (3.5, 4.0, 0.6)
        mod = index * np.exp(-t / tau) * np.sin(2 * np.pi * ratio * freq * t)
        return np.sin(2 * np.pi * freq * t + mod)
    if timbre == "pluck":
        return _karplus_strong(freq, n=n, sr=sr, rng=rng) * 1.5
    raise ParameterError(f"unknown timbre {timbre!r}; choose one of {_TIMBRES}")


def _envelope(n: int, *, sr: int, attack: float, decay: float, sustain: float) -> np.ndarray:
    t = np.arange(n) / sr
    rise = np.minimum(t / max(attack, 1.0 / sr), 1.0)
    return rise * (sustain + (1.0 - sustain) * np.exp(-t / decay))


def _kick(*, sr: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Sine with a falling pitch sweep and a click: an electronic bass drum."""
    t = np.arange(int(sr * (decay * 4 + 0.02))) / sr
    start, end = rng.uniform(140.0, 200.0), rng.uniform(42.0, 60.0)
    freq = end + (start - end) * np.exp(-t / 0.03)
    body = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / decay)
    click = rng.uniform(-1, 1, t.size) * np.exp(-t / 0.002)
    return body + 0.3 * click


def _snare(*, sr: int, rng: np.random.Generator, decay: float = 0.12) -> np.ndarray:
    """Band-passed noise (the wires) over a 180-200 Hz tone (the shell)."""
    t = np.arange(int(sr * decay * 4)) / sr
    noise = _filter(rng.standard_normal(t.size), sr=sr, kind="bandpass",
                    cutoff=(1000.0, 7000.0))
    tone = np.sin(2 * np.pi * rng.uniform(180.0, 200.0) * t) * np.exp(-t / 0.04)
    return (noise / (np.abs(noise).max() + 1e-12) * np.exp(-t / decay) * 0.8 + 0.5 * tone)


def _hat(*, sr: int, rng: np.random.Generator, decay: float) -> np.ndarray:
    """High-passed noise burst: closed (short decay) or open (long decay) hi-hat."""
    t = np.arange(int(sr * decay * 5)) / sr
    noise = _filter(rng.standard_normal(t.size), sr=sr, kind="highpass", cutoff=7000.0)
    return noise / (np.abs(noise).max() + 1e-12) * np.exp(-t / decay)


def _rim(*, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Short pitched click: rim shot / clave."""
    t = np.arange(int(sr * 0.06)) / sr
    tone = np.sin(2 * np.pi * rng.uniform(1600.0, 2200.0) * t) * np.exp(-t / 0.012)
    return tone + 0.2 * rng.uniform(-1, 1, t.size) * np.exp(-t / 0.003)


def _filter(y: np.ndarray, *, sr: int, kind: str, cutoff: float | tuple[float, float],
            order: int = 2) -> np.ndarray:
    """Butterworth filter with cutoffs clamped inside (20 Hz, 0.45 sr), so any sr works."""
    nyquist_safe = 0.45 * sr
    edges = np.clip(np.atleast_1d(np.asarray(cutoff, dtype=float)), 20.0, nyquist_safe)
    if kind == "bandpass" and edges[0] >= edges[1]:
        edges[0] = edges[1] / 2
    # transfer-function form is stable at these low orders and twice as fast as sosfilt
    b, a = signal.butter(order, edges if kind == "bandpass" else edges[0], btype=kind, fs=sr)
    return signal.lfilter(b, a, y)


def _tilt(y: np.ndarray, *, sr: int, db_per_octave: float) -> np.ndarray:
    """``y`` with a spectral tilt: ``db_per_octave`` dB per octave about 1 kHz, flat below 100 Hz.

    A mastering-style EQ over the whole mix, exact in every band (applied to the spectrum, zero
    phase), so a test can measure the slope it asked for; the floor keeps a darkening tilt from
    boosting the sub-bass without bound.
    """
    freqs = np.fft.rfftfreq(y.size, d=1.0 / sr)
    octaves = np.log2(np.maximum(freqs, _TILT_FLOOR) / _TILT_PIVOT)
    gain = 10.0 ** (db_per_octave * octaves / 20.0)
    return np.fft.irfft(np.fft.rfft(y) * gain, n=y.size)


def _drive(y: np.ndarray, amount: float) -> np.ndarray:
    """tanh saturation normalised to unit peak; ``amount`` 0 leaves ``y`` as it is."""
    if amount <= 0:
        return y
    peak = np.abs(y).max()
    if peak == 0:
        return y
    return np.tanh(amount * y / peak) / np.tanh(amount)
