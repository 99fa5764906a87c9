"""Sequencing and the parts of a clip: step grids, onsets, overlap-add, and the drum,
chord, bass and texture buses that :func:`deepfusion.synth.render_clip` mixes.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import numpy as np
from scipy import signal

from deepfusion.synth.dsp import _drive, _envelope, _filter, _hat, _kick, _oscillator, _rim, _snare
from deepfusion.synth.params import ClipParams
from deepfusion.synth.recipes import (_BASS_TONE, _VELOCITY, STEPS_PER_BEAT, GenreRecipe,
                                      _bass_midi, _chord_midi, _hz)

# Paul Kellet's economy pink-noise filter (-3 dB/octave within 0.05 dB above 10 Hz at 44.1 kHz;
# close enough at 22.05 kHz for a noise bed).
_PINK_B = (0.049922035, -0.095993537, 0.050612699, -0.004408786)
_PINK_A = (1.0, -2.494956002, 2.017265875, -0.522189400)


# --------------------------------------------------------------------------------------------
# Sequencing


def _grid(pattern: str, *, n_bars: int) -> np.ndarray:
    """Velocities of a drum/chord pattern repeated over ``n_bars``: shape (n_bars, steps)."""
    return np.tile([_VELOCITY[c] for c in pattern], (n_bars, 1))


def _vary(grid: np.ndarray, *, rng: np.random.Generator, jitter: float,
          ghosts: bool = True) -> np.ndarray:
    """Bar-to-bar variation: drop non-accent hits, add ghost hits, jitter velocities.

    Accents (velocity 1) never drop: they carry the genre's backbone (the one-drop, the
    four-on-the-floor), which must survive in every bar.
    """
    draw = rng.random(grid.shape)
    drop = (grid > 0) & (grid < 1.0) & (draw < jitter)
    add = (grid == 0) & (draw > 1.0 - jitter / 2) if ghosts else np.zeros_like(drop)
    varied = np.where(drop, 0.0, np.where(add, _VELOCITY["o"], grid))
    scale = np.clip(1.0 + 0.12 * rng.standard_normal(grid.shape), 0.6, 1.25)
    return varied * scale


def _onsets(steps: np.ndarray, *, step_s: float, swing: float, humanize_ms: float, sr: int,
            rng: np.random.Generator) -> np.ndarray:
    """Sample index of each global 16th-step index: swung off-16ths plus Gaussian jitter."""
    t = steps * step_s + swing * step_s * (steps % 2)
    if humanize_ms > 0:
        t = t + rng.normal(0.0, humanize_ms / 1000.0, steps.shape)
    return np.maximum(np.round(t * sr), 0).astype(np.int64)


def _overlap_add(out: np.ndarray, template: np.ndarray, onsets: np.ndarray,
                 gains: np.ndarray) -> None:
    """``out[o:o+len] += g * template`` for every onset (truncated at the end of ``out``)."""
    n = out.shape[0]
    for o, g in zip(onsets.tolist(), gains.tolist()):
        stop = min(o + template.shape[0], n)
        if stop > o:
            out[o:stop] += g * template[:stop - o]


def _sequence(n: int, *, onsets: np.ndarray, lengths: np.ndarray, keys: Sequence[Hashable],
              gains: np.ndarray, make: Callable[[Hashable, int], np.ndarray],
              sr: int) -> np.ndarray:
    """Render notes: one template per distinct key (pitch or chord), cut to each note's length.

    A note is its key's template truncated to ``length`` samples with a 10-ms release ramp,
    so repeated notes cost a slice instead of a synthesis.

    Returns
    -------
    np.ndarray [shape=(n,)]
    """
    out = np.zeros(n)
    release = max(int(0.01 * sr), 1)
    by_key: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    for key, idx in by_key.items():
        sel = np.array(idx)
        template = make(key, int(lengths[sel].max()))
        for o, length, g in zip(onsets[sel].tolist(), lengths[sel].tolist(),
                                gains[sel].tolist()):
            stop = min(o + length, n)
            if stop <= o:
                continue
            note = g * template[:length]
            r = min(release, length)
            note[length - r:] *= np.linspace(1.0, 0.0, r)
            out[o:stop] += note[:stop - o]
    return out


def _note_lengths(steps: np.ndarray, *, total_steps: int, gate: float, step_s: float,
                  sr: int) -> np.ndarray:
    """Samples each note lasts: ``gate`` times the gap to the next hit (or the clip's end)."""
    gaps = np.diff(np.append(steps, total_steps))
    return np.maximum(np.round(gaps * gate * step_s * sr), 1).astype(np.int64)


def _unit_loudness(y: np.ndarray, *, sr: int) -> np.ndarray:
    """``y`` scaled so that its loud passages (95th percentile of 50-ms RMS) have RMS 1.

    Bus levels then mean how loud the instrument sounds while it plays: normalising the peak
    would let a sustained sine bass drown a bus of short chord stabs, normalising the clip's
    RMS would blow sparse stabs up far above a sustained pad.
    """
    frame = max(int(0.05 * sr), 1)
    n_frames = y.size // frame
    if n_frames >= 2:
        frames = y[:n_frames * frame].reshape(n_frames, frame)
        ref = float(np.percentile(np.sqrt(np.mean(frames ** 2, axis=1)), 95))
    else:
        ref = float(np.sqrt(np.mean(y ** 2))) if y.size else 0.0
    return y / ref if ref > 0 else y


def _drums(recipe: GenreRecipe, p: ClipParams, *, n: int, n_bars: int, step_s: float,
           sr: int, rng: np.random.Generator) -> np.ndarray:
    """The drum bus, unit loudness (zeros when the recipe has no drums). Shape (n,)."""
    steps = recipe.steps_per_bar
    out = np.zeros(n)
    # a fill replaces the last beat of a 4-bar phrase with a snare crescendo
    fills = (np.arange(n_bars) % 4 == 3) & (rng.random(n_bars) < recipe.fill_prob)
    kit = (("kick", lambda: _kick(sr=sr, decay=p.kick_decay, rng=rng)),
           ("snare", lambda: _snare(sr=sr, rng=rng, decay=p.snare_decay)),
           ("hat", lambda: _hat(sr=sr, rng=rng, decay=p.hat_decay)),
           ("open_hat", lambda: _hat(sr=sr, rng=rng, decay=0.2)),
           ("rim", lambda: _rim(sr=sr, rng=rng)))
    for name, make in kit:
        pattern = getattr(recipe, name)
        if not pattern:
            continue
        grid = _vary(_grid(pattern, n_bars=n_bars), rng=rng, jitter=recipe.jitter,
                     ghosts=name in ("snare", "hat"))
        if name == "snare" and fills.any():
            grid[fills, -STEPS_PER_BEAT:] = np.linspace(0.5, 1.0, STEPS_PER_BEAT)
        bar, step = np.nonzero(grid)
        global_steps = bar * steps + step
        onsets = _onsets(global_steps, step_s=step_s, swing=p.swing,
                         humanize_ms=recipe.humanize_ms, sr=sr, rng=rng)
        _overlap_add(out, make(), onsets, grid[bar, step])
    return _unit_loudness(_drive(out, p.drum_drive), sr=sr)


def _chords(recipe: GenreRecipe, p: ClipParams, *, n: int, n_bars: int, step_s: float,
            sr: int, rng: np.random.Generator) -> np.ndarray:
    """The chord bus (block chords or arpeggios), filtered and driven. Shape (n,), unit loudness."""
    steps = recipe.steps_per_bar
    grid = _vary(_grid(recipe.chord_pattern, n_bars=n_bars), rng=rng,
                 jitter=recipe.jitter / 2, ghosts=False)
    bar, step = np.nonzero(grid)
    global_steps = bar * steps + step
    lengths = _note_lengths(global_steps, total_steps=n_bars * steps, gate=recipe.chord_gate,
                            step_s=step_s, sr=sr)
    onsets = _onsets(global_steps, step_s=step_s, swing=p.swing,
                     humanize_ms=recipe.humanize_ms, sr=sr, rng=rng)
    chord_index = (bar // recipe.bars_per_chord) % len(recipe.progression)
    voiced = [_chord_midi(symbol, mode=recipe.mode, tonic=p.tonic, centre=60 + p.register,
                          voicing=recipe.voicing) for symbol in recipe.progression]
    attack, decay, sustain = recipe.chord_env

    def tone(midi: int, length: int) -> np.ndarray:
        env = _envelope(length, sr=sr, attack=attack, decay=decay, sustain=sustain)
        return _oscillator(p.chord_timbre, _hz(midi), n=length, sr=sr, rng=rng) * env

    if recipe.chord_style == "arp":
        # one chord tone per hit, walking up the chord (and restarting with each chord)
        position = np.arange(global_steps.size)
        keys = [voiced[c][k % len(voiced[c])] for c, k in zip(chord_index.tolist(), position)]
        make = tone
    else:
        keys = chord_index.tolist()

        def make(c: int, length: int) -> np.ndarray:
            return sum(tone(m, length) for m in voiced[c]) / len(voiced[c])

    out = _sequence(n, onsets=onsets, lengths=lengths, keys=keys,
                    gains=grid[bar, step], make=make, sr=sr)
    out = _filter(out, sr=sr, kind="lowpass", cutoff=p.chord_cutoff)
    return _unit_loudness(_drive(out, p.chord_drive), sr=sr)


def _bass(recipe: GenreRecipe, p: ClipParams, *, n: int, n_bars: int, step_s: float,
          sr: int, rng: np.random.Generator) -> np.ndarray:
    """The bass bus: tones of the current chord per the bass pattern. Shape (n,), unit loudness."""
    if not recipe.bass_pattern:
        return np.zeros(n)
    steps = recipe.steps_per_bar
    tones = np.tile([_BASS_TONE.get(c, -1) for c in recipe.bass_pattern], (n_bars, 1))
    # variation: some roots jump an octave, some notes drop out
    draw = rng.random(tones.shape)
    tones = np.where((tones == 0) & (draw < recipe.jitter), 4, tones)
    tones = np.where((tones > 0) & (draw > 1.0 - recipe.jitter), -1, tones)
    bar, step = np.nonzero(tones >= 0)
    global_steps = bar * steps + step
    lengths = _note_lengths(global_steps, total_steps=n_bars * steps, gate=recipe.bass_gate,
                            step_s=step_s, sr=sr)
    onsets = _onsets(global_steps, step_s=step_s, swing=p.swing,
                     humanize_ms=recipe.humanize_ms, sr=sr, rng=rng)
    chord_index = (bar // recipe.bars_per_chord) % len(recipe.progression)
    keys = [_bass_midi(recipe.progression[c], t, mode=recipe.mode, tonic=p.tonic)
            for c, t in zip(chord_index.tolist(), tones[bar, step].tolist())]
    gains = np.clip(1.0 + 0.1 * rng.standard_normal(len(keys)), 0.7, 1.2)

    def make(midi: int, length: int) -> np.ndarray:
        env = _envelope(length, sr=sr, attack=0.004, decay=0.25, sustain=0.6)
        return _oscillator(p.bass_timbre, _hz(midi), n=length, sr=sr, rng=rng) * env

    out = _sequence(n, onsets=onsets, lengths=lengths, keys=keys, gains=gains, make=make, sr=sr)
    return _unit_loudness(_filter(out, sr=sr, kind="lowpass", cutoff=p.bass_cutoff), sr=sr)


def _texture(p: ClipParams, *, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Pink-noise bed at RMS ``p.noise_level`` plus vinyl crackle. Shape (n,).

    Crackle is sparse heavy-tailed clicks (``p.crackle`` per second), high-passed so that each
    rings briefly, peaking at half the RMS of the instrument buses.
    """
    # uniform white noise: three times cheaper than Gaussian, and Gaussian after the filter
    pink = signal.lfilter(_PINK_B, _PINK_A, rng.uniform(-1.0, 1.0, n))
    out = p.noise_level * _unit_loudness(pink, sr=sr)
    n_clicks = int(rng.poisson(p.crackle * n / sr))
    if n_clicks:
        clicks = np.zeros(n)
        amps = rng.pareto(3.0, n_clicks) * rng.choice([-1.0, 1.0], n_clicks)
        np.add.at(clicks, rng.integers(0, n, n_clicks), amps)
        clicks = _filter(clicks, sr=sr, kind="highpass", cutoff=2000.0)
        out = out + 0.5 * clicks / (np.abs(clicks).max() + 1e-12)
    return out
