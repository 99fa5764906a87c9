"""Per-clip parameters of the synthetic generator (:mod:`deepfusion.synth`).

:func:`clip_params` draws one clip's values from its genre's recipe, and
:func:`_shift_production` changes them into the "shifted" domain's production.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from deepfusion.errors import ParameterError
from deepfusion.synth.recipes import GENRES, RECIPES, GenreRecipe, Range

#: Productions :func:`render_clip` can render the recipes with (see :mod:`deepfusion.synth`).
DOMAINS = ("default", "shifted")

# The "shifted" production. A timbre becomes one of similar role (bright analog waveform,
# sustained additive tone, decaying key or string), so the part still sounds like its part.
_SHIFTED_TIMBRE = {"saw": "square", "square": "saw", "sine": "organ", "organ": "sine",
                   "fm": "pluck", "pluck": "fm", "bell": "fm"}
_SHIFT_DRUM_DB = (-6.0, -3.0)
_SHIFT_BASS_DB = (2.0, 4.0)
_SHIFT_NOISE_DB = (-4.0, -2.0)
_SHIFT_TILT = (-2.0, -1.0)            # dB per octave about dsp._TILT_PIVOT
_SHIFT_KICK_DECAY = (0.6, 0.8)        # factors on the drawn decays
_SHIFT_SNARE_DECAY = (1.2, 1.5)
_SHIFT_HAT_DECAY = (1.3, 1.6)


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
