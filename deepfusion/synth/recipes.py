"""Music theory and the genre recipes of the synthetic generator (:mod:`deepfusion.synth`).

Chord symbols (diatonic Roman numerals), scales and stacked thirds, the
:class:`GenreRecipe` ranges every clip of a genre is drawn from, and :data:`RECIPES`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from deepfusion.errors import ParameterError

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
