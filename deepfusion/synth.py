"""The synthetic genre generator: the embedded demo dataset and the fixture of every test.

Each genre is a :class:`GenreRecipe`: parameter *ranges* for tempo, a 16-step drum kit
(12 steps in 3/4), a bass line, a chord progression with its voicing and timbre, and noise
textures. :func:`clip_params` draws one clip's values from those ranges (tempo, key, swing,
levels, filter brightness, distortion, noise, output gain) and :func:`render_clip` renders it
with numpy (and :mod:`scipy.signal` filters): drums and notes are one-shot templates rendered
once per clip and overlap-added at their onsets, so a 30-s clip costs about 0.05 s.
Inside a clip, bars vary: hits drop out or gain ghost notes, fills end some 4-bar phrases,
onsets are swung and humanised, velocities jitter.

The classes are meant to be learnable from the views the models fuse (spectral envelope,
harmony, rhythm) but not from any single number: on each dimension below at least two genres
overlap, and only the combination separates them. Chord timbres are drawn per clip from the
listed set (the first is the genre's signature sound).

=======  =======  =====  =====================  =================  ===================  ========
genre    BPM      meter  rhythm                 harmony (mode)     chord timbres        texture
=======  =======  =====  =====================  =================  ===================  ========
techno   122-132  4/4    four-on-the-floor,     i i VI VII         saw, square, fm      pink
                         off-beat bass/hats     (minor)            stabs, close         hiss
rock     110-140  4/4    backbeat, 8th hats,    I5 V5 vi5 IV5      saw, square;         clean
                         fills                  (major)            driven power chords
waltz    132-168  3/4    oom-pah-pah, no        I IV V7 I          pluck, fm, organ     clean
                         snare                  (major)
reggae   66-84    4/4    one-drop, off-beat     I V vi IV          organ, pluck,        crackle
                         skank, swung           (major)            square
ambient  60-80    --     no drums, 2-bar        i9 VI9 III9 VII9   saw, sine, organ     pink
                         pads                   (minor)            slow pads, open      bed
funk     96-116   4/4    syncopated 16ths,      i7 i7 IV7 IV7      fm, pluck, square    clean
                         ghost snares           (dorian)           stabs
march    104-124  4/4    bass drum 1 and 3,     I IV V7 I          square, saw, organ   clean
                         snare runs             (major)            after-beats
ballad   60-76    4/4    half-time, 8th         I7 vi7 ii7 V7      pluck, fm, sine      crackle
                         arpeggios              (major)            arpeggio, open
bossa    120-140  4/4    clave rim, surdo       ii9 V9 I7 vi7      pluck, fm, organ     clean
                         kick, shaker           (major)            open
noise    90-150   4/4    erratic, distorted     whole-tone         bell, fm, saw        pink +
                                                clusters                                crackle
=======  =======  =====  =====================  =================  ===================  ========

"clean" still carries a faint pink hiss, 35-50 dB below the instruments.

Deliberate overlaps, each broken by another feature family:

* tempo: techno, rock and bossa share 122-132 BPM; funk, march and rock share 110-116;
  waltz and rock share 132-140; reggae, ambient and ballad share 66-76; noise spans them.
* harmony: rock and reggae play the same progression (rhythm, voicing and timbre differ);
  waltz and march play the same progression (3/4 against 4/4, tempo).
* mode: techno, ambient and funk are minor-ish; rock, reggae, waltz, march, ballad, bossa major.
* timbre: every chord timbre but noise's bell is drawn by two or more genres (most by five),
  and bass timbre, drum decays, filter cutoffs and bus levels come from overlapping ranges.
* texture: reggae and ballad both carry vinyl crackle; ambient, noise and techno a pink bed.
* pulse: the tresillo (3+3+2) of bossa, and often the syncopation of funk, make onset-
  autocorrelation tempo estimators report 4/3 or 2/3 of the drawn tempo, as on real records.
* keys overlap across genres (the tonic is drawn per clip from each recipe's ``keys``), and the
  output peak is drawn from 0.3-0.9, so loudness and absolute chroma alone do not separate.

:func:`synthesize_dataset` writes the GTZAN layout (``out_dir/<genre>/<genre>.00000.wav``,
16-bit mono WAV); clip ``c`` of genre ``g`` uses the seed derived from ``(seed, g, c)`` by
:class:`numpy.random.SeedSequence`, so a dataset is byte-identical across runs and machines.

Every function that renders takes a ``domain`` (one of :data:`DOMAINS`). ``"default"`` is the
production described above. ``"shifted"`` plays the same recipes (patterns, progressions,
meter, keys, structure) with another production, so that a model trained on one domain and
tested on the other shows whether it learnt the genre or the mix. Per clip, drawn from its own
seed (:func:`_shift_production`):

* mix: drums 3-6 dB quieter, bass 2-4 dB louder, pink bed 2-4 dB quieter (chords unchanged);
* EQ: the whole mix tilted darker by 1-2 dB per octave about 1 kHz (flat below 100 Hz);
* tempo: the upper half of the genre's range (the drawn position in the range is halved
  towards the top), so it never leaves the tempos the genre is documented with;
* timbres: chord and bass timbres swapped for one of similar role (saw <-> square,
  sine <-> organ, fm <-> pluck, bell -> fm); kick decay x0.6-0.8, snare x1.2-1.5, hats x1.3-1.6.

A shifted clip keeps the key, register, swing and every other value of its default twin (same
seed), but not the bar-to-bar variation: the events are drawn for another tempo.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Hashable, Sequence, Union

import numpy as np
from scipy import signal

from .errors import OutputError, ParameterError
from .fileio import atomic_write

#: Lowest sample rate :func:`render_clip` accepts: the hi-hats need content up to ~4 kHz.
MIN_SAMPLE_RATE = 8000

#: Steps per beat of every drum, bass and chord pattern (16th notes).
STEPS_PER_BEAT = 4

#: Velocity of each pattern character: accent, normal, ghost, rest.
_VELOCITY = {"X": 1.0, "x": 0.8, "o": 0.35, ".": 0.0}

#: Bass-pattern characters: which chord tone to play (index into the stacked thirds, or the
#: octave); "." is a rest.
_BASS_TONE = {"1": 0, "3": 1, "5": 2, "7": 3, "8": 4}

_SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    # twelve steps: "stacking thirds" climbs by whole tones, giving atonal clusters
    "chromatic": tuple(range(12)),
}
_ROMAN = {"i": 0, "ii": 1, "iii": 2, "iv": 3, "v": 4, "vi": 5, "vii": 6}
_CHORD_SYMBOL = re.compile(r"(?P<roman>[ivIV]+)(?P<size>[579]?)")
_TIMBRES = ("sine", "saw", "square", "organ", "fm", "bell", "pluck")

#: Productions :func:`render_clip` can render the recipes with (see the module docstring).
DOMAINS = ("default", "shifted")

# The "shifted" production. A timbre becomes one of similar role (bright analog waveform,
# sustained additive tone, decaying key or string), so the part still sounds like its part.
_SHIFTED_TIMBRE = {"saw": "square", "square": "saw", "sine": "organ", "organ": "sine",
                   "fm": "pluck", "pluck": "fm", "bell": "fm"}
_SHIFT_DRUM_DB = (-6.0, -3.0)
_SHIFT_BASS_DB = (2.0, 4.0)
_SHIFT_NOISE_DB = (-4.0, -2.0)
_SHIFT_TILT = (-2.0, -1.0)            # dB per octave about _TILT_PIVOT
_SHIFT_KICK_DECAY = (0.6, 0.8)        # factors on the drawn decays
_SHIFT_SNARE_DECAY = (1.2, 1.5)
_SHIFT_HAT_DECAY = (1.3, 1.6)
_TILT_PIVOT = 1000.0                  # Hz: the tilt leaves this frequency's level alone
_TILT_FLOOR = 100.0                   # Hz: flat below, so the tilt does not pump the sub-bass

# Paul Kellet's economy pink-noise filter (-3 dB/octave within 0.05 dB above 10 Hz at 44.1 kHz;
# close enough at 22.05 kHz for a noise bed).
_PINK_B = (0.049922035, -0.095993537, 0.050612699, -0.004408786)
_PINK_A = (1.0, -2.494956002, 2.017265875, -0.522189400)

Range = tuple[float, float]


# --------------------------------------------------------------------------------------------
# Harmony


def _parse_chord(symbol: str) -> tuple[int, int]:
    """``"V7"`` -> (scale degree 4, 4 notes); ``"I5"`` -> (0, 2): a power chord."""
    match = _CHORD_SYMBOL.fullmatch(symbol)
    if match is None or match["roman"].lower() not in _ROMAN:
        raise ParameterError(f"chord symbol must be a Roman numeral with optional 5/7/9, "
                             f"got {symbol!r}")
    size = {"": 3, "5": 2, "7": 4, "9": 5}[match["size"]]
    return _ROMAN[match["roman"].lower()], size


def _stacked_thirds(degree: int, *, mode: str, count: int) -> list[int]:
    """Semitones above the tonic of ``count`` diatonic thirds stacked on ``degree``."""
    scale = _SCALES[mode]
    steps = [degree + 2 * k for k in range(count)]
    return [scale[s % len(scale)] + 12 * (s // len(scale)) for s in steps]


def _chord_midi(symbol: str, *, mode: str, tonic: int, centre: int, voicing: str) -> list[int]:
    """MIDI notes of one chord, its root in the octave that starts a fifth below ``centre``."""
    degree, size = _parse_chord(symbol)
    if size == 2:
        root = _stacked_thirds(degree, mode=mode, count=1)[0]
        intervals = [root, root + 7, root + 12]
    else:
        intervals = _stacked_thirds(degree, mode=mode, count=size)
    root = tonic + intervals[0]
    # keep every progression in one register instead of climbing with the degree
    shift = centre - 7 + (root - (centre - 7)) % 12 - root
    notes = [tonic + i + shift for i in intervals]
    if voicing == "open" and len(notes) >= 3:
        notes[1] += 12   # spread voicing: the second voice jumps an octave
    return sorted(notes)


def _bass_midi(symbol: str, tone: int, *, mode: str, tonic: int) -> int:
    """MIDI note of chord tone ``tone`` (index into stacked thirds; 4 = octave) in the bass."""
    degree, _ = _parse_chord(symbol)
    thirds = _stacked_thirds(degree, mode=mode, count=4)
    root = 28 + (tonic + thirds[0] - 28) % 12          # E1..D#2
    return root + 12 if tone == 4 else root + thirds[tone] - thirds[0]


def _hz(midi: float) -> float:
    """Equal-tempered frequency of a MIDI note (A4 = 69 = 440 Hz)."""
    return 440.0 * 2.0 ** ((midi - 69.0) / 12.0)


# --------------------------------------------------------------------------------------------
# Recipes


@dataclass(frozen=True)
class GenreRecipe:
    """Parameter ranges from which every clip of one genre is drawn.

    Patterns are strings of ``4 * beats_per_bar`` steps (16th notes). Drum and chord patterns
    use ``X`` (accent), ``x`` (normal), ``o`` (ghost) and ``.`` (rest); an empty string leaves
    the instrument out. Bass patterns name the chord tone per step: ``1``, ``3``, ``5``, ``7``
    (stacked thirds of the current chord), ``8`` (root an octave up), ``.`` (rest).
    Chord symbols are diatonic Roman numerals in ``mode`` with an optional size: none for a
    triad, ``5`` for a power chord, ``7`` for a seventh, ``9`` for a ninth chord.
    ``(lo, hi)`` tuples are ranges and ``*_timbres`` tuples are choices, drawn uniformly per
    clip by :func:`clip_params`; the description names the signature timbre (the first).
    """

    description: str
    tempo: Range
    beats_per_bar: int = 4
    swing: Range = (0.0, 0.0)            # delay of the off 16ths, fraction of a step
    humanize_ms: float = 0.0             # std of onset jitter
    kick: str = ""
    snare: str = ""
    hat: str = ""
    open_hat: str = ""
    rim: str = ""
    jitter: float = 0.05                 # per-step chance to drop a hit or add a ghost
    fill_prob: float = 0.0               # chance that a 4-bar phrase ends with a snare fill
    kick_decay: Range = (0.2, 0.3)       # seconds
    drum_drive: Range = (0.0, 0.0)       # tanh drive of the drum bus
    mode: str = "major"
    keys: tuple[int, ...] = tuple(range(12))   # tonic pitch classes, C = 0
    progression: tuple[str, ...] = ("I",)
    bars_per_chord: int = 1
    voicing: str = "close"               # "close" or "open" (second voice up an octave)
    chord_pattern: str = ""
    chord_style: str = "block"           # "block" chords or "arp" (one chord tone per hit)
    chord_gate: float = 0.9              # note length, fraction of the gap to the next hit
    chord_timbres: tuple[str, ...] = ("saw",)   # one drawn per clip
    chord_env: tuple[float, float, float] = (0.005, 0.3, 0.5)   # attack s, decay s, sustain
    chord_cutoff: Range = (2000.0, 4000.0)   # low-pass of the chord bus, Hz
    chord_drive: Range = (0.0, 0.0)
    bass_pattern: str = ""
    bass_gate: float = 0.8
    bass_timbres: tuple[str, ...] = ("sine",)
    bass_cutoff: Range = (300.0, 800.0)
    drum_level: Range = (0.4, 0.9)
    bass_level: Range = (0.3, 0.8)
    chord_level: Range = (0.3, 0.8)
    noise_level: Range = (0.003, 0.02)   # RMS of the pink bed; instrument buses play at RMS 1
    crackle: Range = (0.0, 0.0)          # vinyl clicks per second
    drive: Range = (0.0, 0.0)            # tanh drive of the master bus

    def __post_init__(self) -> None:
        if self.beats_per_bar not in (2, 3, 4):
            raise ParameterError(f"beats_per_bar must be 2, 3 or 4, got {self.beats_per_bar!r}")
        steps = self.steps_per_bar
        for name in ("kick", "snare", "hat", "open_hat", "rim", "chord_pattern",
                     "bass_pattern"):
            pattern = getattr(self, name)
            allowed = _BASS_TONE.keys() | {"."} if name == "bass_pattern" else _VELOCITY.keys()
            if pattern and (len(pattern) != steps or set(pattern) - set(allowed)):
                raise ParameterError(
                    f"{name} must be {steps} characters of {''.join(sorted(allowed))!r}, "
                    f"got {pattern!r}")
        if not self.chord_pattern.strip("."):
            # the chords carry the harmony and keep every clip audible
            raise ParameterError(
                f"chord_pattern needs at least one hit, got {self.chord_pattern!r}")
        if self.mode not in _SCALES:
            raise ParameterError(f"mode must be one of {sorted(_SCALES)}, got {self.mode!r}")
        for name in ("chord_timbres", "bass_timbres"):
            timbres = getattr(self, name)
            if not timbres or set(timbres) - set(_TIMBRES):
                raise ParameterError(f"{name} must be taken from {_TIMBRES}, got {timbres!r}")
        for symbol in self.progression:
            _parse_chord(symbol)
        if self.chord_style not in ("block", "arp") or self.voicing not in ("close", "open"):
            raise ParameterError(f"chord_style must be 'block' or 'arp' and voicing 'close' or "
                                 f"'open', got {self.chord_style!r} and {self.voicing!r}")
        if self.bars_per_chord < 1 or not self.progression:
            raise ParameterError(f"need a progression and bars_per_chord >= 1, got "
                                 f"{self.progression!r} and {self.bars_per_chord!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "Range" and not 0 <= value[0] <= value[1]:
                raise ParameterError(f"{f.name} must be a range (lo, hi) with 0 <= lo <= hi, "
                                     f"got {value!r}")
        if not self.keys or any(k not in range(12) for k in self.keys):
            raise ParameterError(f"keys must be pitch classes 0..11, got {self.keys!r}")

    @property
    def steps_per_bar(self) -> int:
        """Pattern length: 16th notes per bar."""
        return STEPS_PER_BEAT * self.beats_per_bar


RECIPES: dict[str, GenreRecipe] = {
    "techno": GenreRecipe(
        description="four-on-the-floor kick, off-beat open hats, minor saw stabs over an "
                    "off-beat saw bass, 122-132 BPM, quantised, light pink hiss",
        tempo=(122.0, 132.0),
        kick="X...X...X...X...", snare="....x.......x...", hat="x.x.x.x.x.x.x.x.",
        open_hat="..x...x...x...x.", jitter=0.04, fill_prob=0.15, kick_decay=(0.3, 0.45),
        mode="minor", keys=(9, 5, 7, 0, 2), progression=("i", "i", "VI", "VII"),
        chord_pattern="...x.....x....x.", chord_gate=0.6, chord_timbres=("saw", "square", "fm"),
        chord_env=(0.002, 0.12, 0.2), chord_cutoff=(1000.0, 4000.0),
        bass_pattern="..1...1...1...1.", bass_gate=0.7, bass_timbres=("saw", "square"),
        bass_cutoff=(250.0, 700.0), chord_level=(0.2, 0.5),
        noise_level=(0.01, 0.06)),
    "rock": GenreRecipe(
        description="backbeat snare on 2 and 4, 8th-note hats, distorted saw power chords "
                    "and a square 8th-note bass in major, 110-140 BPM, humanised",
        tempo=(110.0, 140.0), humanize_ms=6.0,
        kick="X.....x.X.x.....", snare="....X.......X...", hat="x.x.x.x.x.x.x.x.",
        jitter=0.08, fill_prob=0.5, kick_decay=(0.15, 0.25),
        mode="major", keys=(4, 9, 2, 7, 0), progression=("I5", "V5", "vi5", "IV5"),
        chord_pattern="X.x.x.x.X.x.x.x.", chord_gate=0.95, chord_timbres=("saw", "square"),
        chord_env=(0.003, 0.4, 0.7), chord_cutoff=(2000.0, 5000.0), chord_drive=(2.0, 5.0),
        bass_pattern="1.1.1.1.1.1.1.1.", bass_gate=0.85, bass_timbres=("square", "saw"),
        bass_cutoff=(500.0, 1200.0), chord_level=(0.3, 0.7)),
    "waltz": GenreRecipe(
        description="3/4 oom-pah-pah: bass on 1, plucked Karplus-Strong chords on 2 and 3, "
                    "I-IV-V7-I in major, 132-168 BPM, no snare",
        tempo=(132.0, 168.0), beats_per_bar=3, humanize_ms=8.0,
        kick="x...........", hat="....o...o...", jitter=0.03, kick_decay=(0.15, 0.25),
        mode="major", keys=(0, 5, 7, 2, 10), progression=("I", "IV", "V7", "I"),
        chord_pattern="....X...x...", chord_gate=0.8, chord_timbres=("pluck", "fm", "organ"),
        chord_cutoff=(2000.0, 6000.0),
        bass_pattern="1.......5...", bass_gate=0.6, bass_timbres=("sine", "pluck"),
        drum_level=(0.1, 0.45), chord_level=(0.5, 0.9)),
    "reggae": GenreRecipe(
        description="one-drop: kick and rim on beat 3, off-beat organ skank, deep sine bass, "
                    "I-V-vi-IV (rock's progression), 66-84 BPM, swung, vinyl crackle",
        tempo=(66.0, 84.0), swing=(0.1, 0.25), humanize_ms=5.0,
        kick="........X.......", rim="........x.......", hat="o.o.o.o.o.o.o.o.",
        jitter=0.05, kick_decay=(0.2, 0.3),
        mode="major", keys=(9, 7, 0, 2, 5), progression=("I", "V", "vi", "IV"),
        chord_pattern="..x...x...x...x.", chord_gate=0.5,
        chord_timbres=("organ", "pluck", "square"),
        chord_env=(0.003, 0.08, 0.5), chord_cutoff=(1500.0, 4000.0),
        bass_pattern="1.....1.5..3.1..", bass_gate=0.9, bass_timbres=("sine",),
        bass_cutoff=(200.0, 400.0), bass_level=(0.5, 0.9), chord_level=(0.5, 0.9),
        crackle=(3.0, 12.0)),
    "ambient": GenreRecipe(
        description="no drums: slow-attack detuned saw pads (minor ninth chords, open "
                    "voicing, two bars each), sine drone, loud pink-noise bed",
        tempo=(60.0, 80.0), jitter=0.0,
        mode="minor", progression=("i9", "VI9", "III9", "VII9"), bars_per_chord=2,
        voicing="open", chord_pattern="x...............", chord_gate=1.0,
        chord_timbres=("saw", "sine", "organ"), chord_env=(1.5, 3.0, 0.8),
        chord_cutoff=(600.0, 1500.0),
        bass_pattern="1...............", bass_gate=1.0, bass_timbres=("sine",),
        bass_cutoff=(150.0, 300.0), chord_level=(0.6, 0.9), bass_level=(0.2, 0.5),
        noise_level=(0.04, 0.15)),
    "funk": GenreRecipe(
        description="syncopated 16th kick, backbeat with ghost notes, 16th hats, octave-"
                    "jumping square bass, FM clav stabs on i7-IV7 (dorian), 96-116 BPM",
        tempo=(96.0, 116.0), swing=(0.0, 0.15), humanize_ms=4.0,
        kick="X.....x...x..x..", snare="....X..o.o..X..o", hat="XoxoXoxoXoxoXoxo",
        jitter=0.1, fill_prob=0.3, kick_decay=(0.15, 0.25),
        mode="dorian", keys=(4, 2, 7, 9), progression=("i7", "i7", "IV7", "IV7"),
        chord_pattern="..x..x....x..x..", chord_gate=0.3, chord_timbres=("fm", "pluck", "square"),
        chord_env=(0.002, 0.1, 0.3), chord_cutoff=(2000.0, 6000.0),
        bass_pattern="1..8..1.5.1.8..7", bass_gate=0.5, bass_timbres=("square", "saw", "fm"),
        bass_cutoff=(700.0, 1500.0), bass_level=(0.4, 0.85)),
    "march": GenreRecipe(
        description="bass drum on 1 and 3 with cymbal, snare rudiments, tuba root-fifth, "
                    "square-brass after-beats, I-IV-V7-I (waltz's progression), 104-124 BPM",
        tempo=(104.0, 124.0), humanize_ms=3.0,
        kick="X.......X.......", snare="X.x.x.xxX.x.x.xx", open_hat="X.......X.......",
        jitter=0.05, fill_prob=0.4, kick_decay=(0.25, 0.4),
        mode="major", keys=(10, 3, 5, 0, 8), progression=("I", "IV", "V7", "I"),
        chord_pattern="....X.......X...", chord_gate=0.5, chord_timbres=("square", "saw", "organ"),
        chord_env=(0.03, 0.3, 0.7), chord_cutoff=(1500.0, 4000.0),
        bass_pattern="1.......5.......", bass_gate=0.5, bass_timbres=("square", "sine"),
        bass_cutoff=(300.0, 600.0)),
    "ballad": GenreRecipe(
        description="half-time: soft kick, rim on 3, plucked 8th-note arpeggios of "
                    "seventh chords (I7-vi7-ii7-V7, open voicing), 60-76 BPM, vinyl crackle",
        tempo=(60.0, 76.0), humanize_ms=10.0,
        kick="x.........x.....", rim="........x.......", hat="o.o.o.o.o.o.o.o.",
        jitter=0.05, fill_prob=0.1, kick_decay=(0.2, 0.3),
        mode="major", keys=(0, 7, 2, 5, 3), progression=("I7", "vi7", "ii7", "V7"),
        voicing="open", chord_pattern="X.x.x.x.x.x.x.x.", chord_style="arp",
        chord_gate=1.0, chord_timbres=("pluck", "fm", "sine"), chord_cutoff=(2000.0, 4500.0),
        bass_pattern="1.......5.......", bass_gate=0.95, bass_timbres=("sine",),
        drum_level=(0.15, 0.5), chord_level=(0.5, 0.9), crackle=(2.0, 8.0)),
    "bossa": GenreRecipe(
        description="bossa clave on the rim, surdo kick, shaker 16ths, plucked nylon "
                    "ninth chords (ii9-V9-I7-vi7), root-fifth bass, 120-140 BPM",
        tempo=(120.0, 140.0), humanize_ms=5.0,
        kick="X..x....X..x....", rim="x..x..x...x..x..", hat="xoooxoooxoooxooo",
        jitter=0.04, kick_decay=(0.15, 0.25),
        mode="major", keys=(5, 0, 7, 2, 10), progression=("ii9", "V9", "I7", "vi7"),
        voicing="open", chord_pattern="x..x..x...x..x..", chord_gate=0.8,
        chord_timbres=("pluck", "fm", "organ"), chord_cutoff=(2500.0, 5000.0),
        bass_pattern="1..5....1..5....", bass_gate=0.9, bass_timbres=("pluck", "sine"),
        bass_cutoff=(400.0, 900.0), drum_level=(0.25, 0.6)),
    "noise": GenreRecipe(
        description="erratic distorted kicks and long noise bursts, FM bell whole-tone "
                    "clusters, driven saw bass, heavy pink noise and crackle, 90-150 BPM",
        tempo=(90.0, 150.0), humanize_ms=15.0,
        kick="X...x.x.X..x.x..", snare="....X.......X...", open_hat="..x...x...x...x.",
        jitter=0.3, fill_prob=0.5, kick_decay=(0.3, 0.6), drum_drive=(3.0, 8.0),
        mode="chromatic", progression=("i7", "ii7", "vi7", "v7"),
        chord_pattern="x.....x.....x...", chord_gate=0.9, chord_timbres=("bell", "fm", "saw"),
        chord_env=(0.002, 0.5, 0.3), chord_cutoff=(3000.0, 7000.0),
        bass_pattern="1.1..1.11..1..1.", bass_gate=0.6, bass_timbres=("saw", "square"),
        bass_cutoff=(400.0, 1500.0), noise_level=(0.1, 0.35), crackle=(10.0, 60.0),
        drive=(1.5, 4.0)),
}

#: Genre names, in the order :func:`synthesize_dataset` takes them.
GENRES: tuple[str, ...] = tuple(RECIPES)


@dataclass(frozen=True)
class ClipParams:
    """The values one clip draws from its recipe's ranges (see :func:`clip_params`)."""

    genre: str
    tempo: float          # BPM
    tonic: int            # pitch class of the key, C = 0
    swing: float
    register: int         # semitones added to the chord centre (middle C)
    chord_timbre: str
    bass_timbre: str
    kick_decay: float
    snare_decay: float
    hat_decay: float
    drum_drive: float
    chord_cutoff: float
    chord_drive: float
    bass_cutoff: float
    drum_level: float
    bass_level: float
    chord_level: float
    noise_level: float
    crackle: float        # clicks per second
    drive: float
    peak: float           # output peak amplitude
    events_seed: int = field(repr=False)   # seeds the per-bar variation and noise
    domain: str = "default"   # production (one of DOMAINS)
    tilt: float = 0.0         # EQ tilt of the mix, dB per octave about 1 kHz (0: flat)


# --------------------------------------------------------------------------------------------
# Parameters


def _check_genre(genre: str) -> GenreRecipe:
    if genre not in RECIPES:
        raise ParameterError(f"unknown genre {genre!r}; choose one of {', '.join(GENRES)}")
    return RECIPES[genre]


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParameterError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_domain(domain: str) -> str:
    if not isinstance(domain, str) or domain not in DOMAINS:
        raise ParameterError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    return domain


def clip_params(genre: str, *, seed: int, domain: str = "default") -> ClipParams:
    """Draw one clip's parameters from the recipe of ``genre``.

    :func:`render_clip` with the same ``genre``, ``seed`` and ``domain`` renders exactly these
    values, so tests can compare what they measure (tempo, key) with what was drawn.

    Parameters
    ----------
    genre : str
        One of :data:`GENRES`.
    seed : int >= 0
        Seed of the clip.
    domain : str
        One of :data:`DOMAINS`: ``"shifted"`` returns the default draw changed by
        :func:`_shift_production` (same key, register, swing; other levels, tempo, timbres).

    Returns
    -------
    ClipParams
    """
    recipe = _check_genre(genre)
    _check_domain(domain)
    # the third child seeds the shift: the first two, hence the default draw, stay as they were
    params_seq, events_seq, shift_seq = np.random.SeedSequence(_check_seed(seed)).spawn(3)
    rng = np.random.default_rng(params_seq)

    def uniform(bounds: Range) -> float:
        return float(rng.uniform(*bounds))

    p = ClipParams(
        genre=genre,
        tempo=uniform(recipe.tempo),
        tonic=int(rng.choice(recipe.keys)),
        swing=uniform(recipe.swing),
        register=int(rng.integers(-3, 4)),
        chord_timbre=str(rng.choice(recipe.chord_timbres)),
        bass_timbre=str(rng.choice(recipe.bass_timbres)),
        kick_decay=uniform(recipe.kick_decay),
        snare_decay=uniform((0.08, 0.2)),
        hat_decay=uniform((0.02, 0.06)),
        drum_drive=uniform(recipe.drum_drive),
        chord_cutoff=uniform(recipe.chord_cutoff),
        chord_drive=uniform(recipe.chord_drive),
        bass_cutoff=uniform(recipe.bass_cutoff),
        drum_level=uniform(recipe.drum_level),
        bass_level=uniform(recipe.bass_level),
        chord_level=uniform(recipe.chord_level),
        noise_level=uniform(recipe.noise_level),
        crackle=uniform(recipe.crackle),
        drive=uniform(recipe.drive),
        peak=float(rng.uniform(0.3, 0.9)),
        events_seed=int(events_seq.generate_state(1)[0]),
    )
    if domain == "default":
        return p
    return _shift_production(p, recipe, rng=np.random.default_rng(shift_seq))


def _shift_production(p: ClipParams, recipe: GenreRecipe, *,
                      rng: np.random.Generator) -> ClipParams:
    """The "shifted" domain: ``p`` with the production changed and the genre left alone.

    Only what a producer would choose moves (bus levels, EQ, instrument sounds, drum tuning,
    and the tempo within the genre's own range); patterns, progression, mode, key and register
    are the recipe's, so a model that learnt the genre still recognises it. The amounts are
    drawn per clip (ranges in ``_SHIFT_*``) so the domain is a distribution, not one offset a
    model could subtract; their direction is fixed so tests can check it.
    """
    def db(bounds: Range) -> float:
        return 10.0 ** (float(rng.uniform(*bounds)) / 20.0)

    hi = recipe.tempo[1]
    return replace(
        p,
        domain="shifted",
        # the upper half of the range: drawn positions 0..1 map to 0.5..1
        tempo=hi - (hi - p.tempo) / 2.0,
        chord_timbre=_SHIFTED_TIMBRE[p.chord_timbre],
        bass_timbre=_SHIFTED_TIMBRE[p.bass_timbre],
        kick_decay=p.kick_decay * float(rng.uniform(*_SHIFT_KICK_DECAY)),
        snare_decay=p.snare_decay * float(rng.uniform(*_SHIFT_SNARE_DECAY)),
        hat_decay=p.hat_decay * float(rng.uniform(*_SHIFT_HAT_DECAY)),
        drum_level=p.drum_level * db(_SHIFT_DRUM_DB),
        bass_level=p.bass_level * db(_SHIFT_BASS_DB),
        noise_level=p.noise_level * db(_SHIFT_NOISE_DB),
        tilt=float(rng.uniform(*_SHIFT_TILT)),
    )


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


# --------------------------------------------------------------------------------------------
# Public API


def _check_render_args(*, duration: float, sr: int) -> int:
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise ParameterError(f"sr must be a positive integer sample rate, got {sr!r}")
    if sr < MIN_SAMPLE_RATE:
        raise ParameterError(f"sr must be at least {MIN_SAMPLE_RATE} Hz, got {sr!r}")
    number = isinstance(duration, (int, float, np.number)) and not isinstance(duration, bool)
    if not number or not math.isfinite(duration) or duration <= 0:
        raise ParameterError(f"duration must be a finite number of seconds > 0, "
                             f"got {duration!r}")
    n = int(round(duration * sr))
    if n < 1:
        raise ParameterError(f"duration {duration!r} s is shorter than one sample at {sr} Hz")
    return n


def render_clip(genre: str, *, seed: int, duration: float = 30.0, sr: int = 22050,
                domain: str = "default") -> np.ndarray:
    """Render one clip of ``genre``, deterministically from ``seed`` (and ``domain``).

    Parameters
    ----------
    genre : str
        One of :data:`GENRES`.
    seed : int >= 0
        Seed of the clip; :func:`clip_params` returns the values it draws.
    duration : float > 0
        Length in seconds.
    sr : int >= 8000
        Sample rate in Hz.
    domain : str
        Production, one of :data:`DOMAINS`: ``"default"`` or ``"shifted"`` (same genre,
        another mix, EQ, tempo sub-range and timbres; see the module docstring).

    Returns
    -------
    np.ndarray [shape=(round(duration * sr),), dtype=float32]
        Mono audio, finite, peak amplitude between 0.3 and 0.9.

    Raises
    ------
    ParameterError
        Unknown genre or domain, negative seed, ``duration`` or ``sr`` out of range.
    """
    n = _check_render_args(duration=duration, sr=sr)
    p = clip_params(genre, seed=seed, domain=domain)
    recipe = RECIPES[genre]
    rng = np.random.default_rng(p.events_seed)
    step_s = 60.0 / p.tempo / STEPS_PER_BEAT
    n_bars = int(math.ceil(n / (step_s * recipe.steps_per_bar * sr))) + 1
    kwargs = dict(n=n, n_bars=n_bars, step_s=step_s, sr=sr, rng=rng)
    mix = (p.drum_level * _drums(recipe, p, **kwargs)
           + p.bass_level * _bass(recipe, p, **kwargs)
           + p.chord_level * _chords(recipe, p, **kwargs)
           + _texture(p, n=n, sr=sr, rng=rng))
    if p.tilt:
        mix = _tilt(mix, sr=sr, db_per_octave=p.tilt)
    mix = _drive(mix, p.drive)
    peak = np.abs(mix).max()
    # the pink bed is never silent, so peak > 0; the guard only protects against nan
    y = mix * (p.peak / peak) if peak > 0 and np.isfinite(peak) else np.zeros(n)
    return y.astype(np.float32)


def clip_seed(seed: int, genre_index: int, clip_index: int) -> int:
    """The seed of clip ``clip_index`` of genre ``genre_index`` in a dataset seeded ``seed``."""
    sequence = np.random.SeedSequence([_check_seed(seed), genre_index, clip_index])
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


def _check_count(name: str, value: int, *, low: int, high: int | None = None) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, np.integer))
          and value >= low and (high is None or value <= high))
    if not ok:
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ParameterError(f"{name} must be an integer {bound}, got {value!r}")


def _write_wav(path: Path, y: np.ndarray, *, sr: int) -> None:
    """Write 16-bit PCM atomically (:func:`deepfusion.fileio.atomic_write`).

    Quantising here (not in libsndfile) pins the bytes: rounding is numpy's, on every platform.

    Raises
    ------
    OutputError
        The file cannot be written (read-only folder, full disk, ...).
    """
    import soundfile  # only writing needs it

    pcm = np.round(np.clip(y, -1.0, 1.0) * 32767.0).astype(np.int16)
    try:
        with atomic_write(path) as handle:
            soundfile.write(handle, pcm, sr, format="WAV", subtype="PCM_16")
    except soundfile.SoundFileError as error:
        raise OutputError(f"{path}: cannot write ({error})") from None


def synthesize_dataset(out_dir: Union[str, os.PathLike], *, genres: int = 4,
                       clips_per_genre: int = 10, duration: float = 30.0, seed: int = 0,
                       sr: int = 22050, domain: str = "default") -> list[Path]:
    """Write a synthetic dataset in the GTZAN layout and return the written paths, sorted.

    Files are ``out_dir/<genre>/<genre>.<5-digit index>.wav``, 16-bit PCM mono at ``sr``,
    for the first ``genres`` names of :data:`GENRES`. Clip ``c`` of genre ``g`` is
    ``render_clip(GENRES[g], seed=clip_seed(seed, g, c), ..., domain=domain)``, so the same
    arguments give byte-identical files, and the two domains of one seed hold twin clips (same
    key and register, another production). Existing files of the same names are replaced.

    Parameters
    ----------
    out_dir : path
        Root folder; created if missing.
    genres : int, 1..len(GENRES)
        How many genres, taken from the start of :data:`GENRES`.
    clips_per_genre : int >= 1
    duration : float > 0
        Seconds per clip.
    seed : int >= 0
    sr : int >= 8000
        Sample rate in Hz.
    domain : str
        Production, one of :data:`DOMAINS` (see :func:`render_clip`).

    Returns
    -------
    list[pathlib.Path]
        ``genres * clips_per_genre`` paths, sorted.

    Raises
    ------
    ParameterError
        An argument is out of range (the message quotes it).
    OutputError
        ``out_dir`` or a file in it cannot be written.
    """
    _check_count("genres", genres, low=1, high=len(GENRES))
    _check_count("clips_per_genre", clips_per_genre, low=1)
    _check_seed(seed)
    _check_render_args(duration=duration, sr=sr)
    _check_domain(domain)
    out_dir = Path(out_dir)
    paths = []
    for g, genre in enumerate(GENRES[:genres]):
        folder = out_dir / genre
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"{folder}: cannot create folder ({error.strerror or error})") \
                from error
        for c in range(clips_per_genre):
            path = folder / f"{genre}.{c:05d}.wav"
            y = render_clip(genre, seed=clip_seed(seed, g, c), duration=duration, sr=sr,
                            domain=domain)
            _write_wav(path, y, sr=sr)
            paths.append(path)
    return sorted(paths)
