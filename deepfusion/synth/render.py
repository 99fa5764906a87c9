"""Rendering clips and writing datasets: :func:`render_clip`, :func:`clip_seed` and
:func:`synthesize_dataset` (see :mod:`deepfusion.synth`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Union

import numpy as np

from deepfusion.errors import OutputError, ParameterError
from deepfusion.io.atomic import atomic_write
from deepfusion.synth.dsp import _drive, _tilt
from deepfusion.synth.params import _check_domain, _check_seed, clip_params
from deepfusion.synth.parts import _bass, _chords, _drums, _texture
from deepfusion.synth.recipes import GENRES, RECIPES, STEPS_PER_BEAT

#: Lowest sample rate :func:`render_clip` accepts: the hi-hats need content up to ~4 kHz.
MIN_SAMPLE_RATE = 8000


# --------------------------------------------------------------------------------------------
# Public API


def _check_render_args(*, duration: float, sr: int) -> int:
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise ParameterError(f"sr must be a positive integer sample rate, got {sr!r}")
    if sr < MIN_SAMPLE_RATE:
        raise ParameterError(f"sr must be at least {MIN_SAMPLE_RATE} Hz, got {sr!r}")
    number = isinstance(duration, (int, float, np.number)) and not isinstance(duration, bool)
    if not number or not math.isfinite(duration) or duration <= 0:
        raise ParameterError(f"--duration {duration}: give a number of seconds above 0")
    n = int(round(duration * sr))
    if n < 1:
        raise ParameterError(f"--duration {duration:g}: shorter than one sample at {sr} Hz")
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
        another mix, EQ, tempo sub-range and timbres; see :mod:`deepfusion.synth`).

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
        flag = "--" + name.replace("_", "-")
        if name == "genres" and high is not None:
            raise ParameterError(f"{flag} {value}: synth has {high} genres; give {low} to {high}")
        bound = f"from {low} to {high}" if high is not None else f"{low} or more"
        raise ParameterError(f"{flag} {value}: give a whole number {bound}")


def _write_wav(path: Path, y: np.ndarray, *, sr: int) -> None:
    """Write 16-bit PCM atomically (:func:`deepfusion.io.atomic.atomic_write`).

    Quantising here (not in libsndfile) pins the bytes: rounding is numpy's, on every platform.

    Raises
    ------
    OutputError
        The file cannot be written (read-only folder, full disk, ...).
    """
    import soundfile  # only writing needs it

    pcm = np.round(np.clip(y, -1.0, 1.0) * 32767.0).astype(np.int16)
    try:
        with atomic_write(path) as handle, soundfile.SoundFile(
                handle, "w", sr, 1, "PCM_16", format="WAV") as wav:
            wav.comment = SYNTH_COMMENT      # see _ours: a later synth may replace it
            wav.write(pcm)
    except soundfile.SoundFileError as error:
        raise OutputError(f"{path}: cannot write ({error})") from None


#: The comment (a WAV ``LIST/INFO/ICMT`` chunk) of every clip synth writes: a file that holds
#: it may be replaced by the next synth, any other is someone's recording.
SYNTH_COMMENT = "deepfusion synth"


def _ours(path: Path) -> bool:
    """Whether ``path`` is a clip synth wrote (its comment), read from the header alone."""
    import soundfile

    try:
        with soundfile.SoundFile(path) as fh:
            return fh.comment == SYNTH_COMMENT
    except Exception:  # noqa: BLE001 - not audio, unreadable, a folder: not ours
        return False


def synthesize_dataset(out_dir: Union[str, os.PathLike], *, genres: int = 4,
                       clips_per_genre: int = 10, duration: float = 30.0, seed: int = 0,
                       sr: int = 22050, domain: str = "default",
                       overwrite: bool = False) -> list[Path]:
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
        ``out_dir`` or a file in it cannot be written, or (unless ``overwrite``) a clip would
        replace a file synth did not write (a real recording at ``techno/techno.00000.wav``;
        synth's clips carry :data:`SYNTH_COMMENT`). Checked before any file is written.
    """
    _check_count("genres", genres, low=1, high=len(GENRES))
    _check_count("clips_per_genre", clips_per_genre, low=1)
    _check_seed(seed)
    _check_render_args(duration=duration, sr=sr)
    _check_domain(domain)
    out_dir = Path(out_dir)
    planned = [out_dir / genre / f"{genre}.{c:05d}.wav"
               for genre in GENRES[:genres] for c in range(clips_per_genre)]
    foreign = [] if overwrite else [p for p in planned if os.path.lexists(p) and not _ours(p)]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise OutputError(f"{foreign[0]}: synth would replace this file{more}, which it did not "
                          f"write; give --overwrite to replace {'them' if more else 'it'}, or "
                          "another --out")
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
