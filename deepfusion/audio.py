"""Finding genre-labelled audio files and decoding them to mono at one rate.

Decoding uses libsndfile (through :mod:`soundfile`), which reads WAV (8/16/24/32-bit integer,
32/64-bit float), AU, AIFF, FLAC, OGG/Vorbis/Opus and MP3; resampling uses soxr through
:func:`librosa.resample`. Only the first ``duration`` seconds are read, so a long file costs
no more memory than a clip.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from deepfusion.errors import AudioError, DatasetError

#: File name endings that discovery treats as audio.
AUDIO_EXTENSIONS = (".wav", ".au", ".snd", ".aif", ".aiff", ".flac", ".ogg", ".oga",
                    ".opus", ".mp3")


#: Sample rates a real recording can have (telephone speech to DXD); others are damage.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 768_000
#: Largest sample magnitude taken for audio: float files hold +-1, or +-2**31 when written
#: unscaled; the features are the same at any level up to about 1e16.
MAX_PEAK = 1e10


@dataclass(frozen=True)
class AudioItem:
    """One labelled file: its absolute path, its path relative to the dataset root, its genre.

    ``group`` (from a manifest's ``group`` or ``track_id`` column) names clips that must stay
    in one split: excerpts of one track, or of one artist.
    """

    path: Path
    relpath: str
    label: str
    group: Optional[str] = None


def resolve_inside(root: Path, relpath: str, *, source: str, show_root: bool = True) -> Path:
    """``root / relpath``, refusing paths that leave ``root`` (``../../etc/passwd``).

    ``source`` names the manifest or split file the path came from, for the error message;
    ``show_root``: whether the message names ``root`` (not when it is a stand-in).
    """
    root = Path(root).resolve()
    candidate = (root / relpath).resolve()
    if PurePosixPath(relpath).is_absolute() or not candidate.is_relative_to(root):
        where = f" {root}" if show_root else ""
        raise DatasetError(f"{source}: path {relpath!r} leaves the dataset root{where}; paths "
                           "are relative to --audio-dir")
    return candidate


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def discover(audio_dir: Path, *,
             extensions: Iterable[str] = AUDIO_EXTENSIONS) -> list[AudioItem]:
    """Every labelled audio file under ``audio_dir``, sorted by relative path.

    The genre is the name of the file's parent folder (``blues/blues.00042.wav``); hidden
    files and folders (``.DS_Store``, ``._x.wav``) are skipped. A metadata table instead:
    :func:`discover_collection`.

    Raises
    ------
    DatasetError
        ``audio_dir`` is missing or not a folder, or nothing is found.
    """
    audio_dir = Path(audio_dir)
    if not audio_dir.exists():
        raise DatasetError(f"{audio_dir}: audio folder does not exist")
    if not audio_dir.is_dir():
        raise DatasetError(f"{audio_dir}: not a folder")
    root = audio_dir.resolve()
    exts = tuple(e.lower() for e in extensions)
    items: list[AudioItem] = []
    for path in _walk(root):
        rel = path.relative_to(root)
        if path.name.lower().endswith(exts) and not _is_hidden(rel):
            if len(rel.parts) < 2:
                label = root.name  # a flat folder: the folder itself names the genre
            else:
                label = rel.parts[-2]
            items.append(AudioItem(path, rel.as_posix(), label))
    if not items:
        raise DatasetError(
            f"{audio_dir}: no audio files found (looked for {', '.join(exts)} in genre folders)")
    items.sort(key=lambda it: it.relpath)
    return items


def discover_collection(audio_dir: Path, *, manifest: Optional[Path] = None,
                        metadata: bool = True) -> tuple[list[AudioItem], Optional[Any]]:
    """The labelled files of a collection and the metadata table they came from.

    ``manifest`` is read as :func:`deepfusion.io.metadata.read_metadata` reads any table it
    recognises (deepfusion's manifest, MTG-Jamendo's TSV, FMA's tracks.csv): exactly the
    listed files, paths relative to ``audio_dir``, each clip's group from the coarsest group
    column (artist, then album, then track). Without one, a table found at the root of
    ``audio_dir`` (:func:`~deepfusion.io.metadata.find_metadata`) is used unless
    ``metadata`` is False; with none, :func:`discover`'s folder names give the genres and the
    clips have no groups. Returns ``(items, metadata or None)``.

    Raises
    ------
    DatasetError
        As :func:`discover`; a table that cannot be read or lists a path twice or outside
        ``audio_dir``.
    """
    from deepfusion.io.metadata import find_metadata, read_metadata

    audio_dir = Path(audio_dir)
    if manifest is None and metadata and audio_dir.is_dir():
        manifest = find_metadata(audio_dir)
    if manifest is None:
        return discover(audio_dir), None
    if not audio_dir.is_dir():
        return discover(audio_dir), None        # its one line: missing, or not a folder
    from deepfusion.io.guard import require_regular_file

    require_regular_file(Path(manifest), what="the manifest", error=DatasetError)
    root = audio_dir.resolve()
    meta = read_metadata(Path(manifest), root)
    items = [AudioItem(resolve_inside(root, rel, source=f"{manifest}: line {line}"),
                       PurePosixPath(rel).as_posix(), label, group)
             for rel, label, group, line in meta.rows]
    items.sort(key=lambda it: it.relpath)
    return items, meta


def expand_inputs(inputs: Iterable[Path]) -> list[Path]:
    """Files as given, and the audio files under each folder (sorted), spelled from the
    folder as given (a relative folder gives relative paths, as the user typed it)."""
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            try:
                files += [_as_typed(p, it) for it in discover(p)]
            except DatasetError:
                files.append(p)   # reported as "no audio files"
        else:
            files.append(p)
    return files


def _as_typed(folder: Path, item: AudioItem) -> Path:
    """``item``'s path under ``folder`` as the user spelled ``folder``."""
    try:
        return folder / item.path.relative_to(folder.resolve())
    except ValueError:
        return item.path


def _walk(root: Path) -> Iterator[Path]:
    """Every file under ``root``, symbolic links to folders followed (a genre folder may be a
    link), each folder read once: a second route to a folder, a link back up included (a
    loop), is not followed again. Hidden folders are not entered."""
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in [*files, *dirs]:    # a folder named x.wav is kept: decoding reports it
            yield Path(folder, name)


@dataclass(frozen=True)
class DecodedAudio:
    """A decoded clip and what the source file was."""

    y: np.ndarray          # [shape=(n_samples,)] float32 mono at the target rate
    source_sr: int
    channels: int
    source_seconds: float  # length of the file (frames / rate), before trimming or padding


def check_file(path: Path) -> None:
    """Raise :class:`AudioError` unless ``path`` is a non-empty regular file."""
    if not path.exists():
        raise AudioError(path, "file not found")
    if path.is_dir():
        raise AudioError(path, "is a folder, not an audio file")
    if not path.is_file():
        raise AudioError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")


def _open(path: Path):
    import soundfile as sf

    check_file(path)
    # soundfile encodes a str path strictly with the file-system codec, which fails on names
    # that are not valid in it (Latin-1 bytes, a C locale); the raw bytes always open.
    source = str(path) if sys.platform == "win32" else os.fsencode(path)
    fh = sf.SoundFile(source)
    # a damaged header can claim 1 Hz: its kilobytes then "last" hours, and predict cuts them
    # into thousands of windows
    if not (MIN_SAMPLE_RATE <= fh.samplerate <= MAX_SAMPLE_RATE and fh.channels > 0):
        fh.close()
        channels = f"{fh.channels} channel{'' if fh.channels == 1 else 's'}"
        raise AudioError(path, f"damaged header (it claims {channels} at {fh.samplerate} Hz)")
    return fh


def _decode_error(path: Path, exc: Exception) -> AudioError:
    import soundfile as sf

    # libsndfile's own words, without soundfile's "Error opening <path>: " prefix (a path may
    # itself contain ": ")
    reason = exc.error_string if isinstance(exc, sf.LibsndfileError) else str(exc)
    if reason.startswith("File does not exist or is not a regular file"):
        # what libsndfile's MP3 reader says of bytes it cannot parse; the file does exist
        reason = "no audio stream found: damaged, or not audio"
    from deepfusion.io.atomic import library_text

    if reason.startswith("Format not recognised"):
        return AudioError(path, "cannot decode: not an audio format libsndfile reads (format not "
                                "recognised); convert it to WAV or FLAC")
    return AudioError(path, f"cannot decode ({library_text(reason) or 'no reason given'})")


_DECODE_ERRORS = (RuntimeError, ValueError, OSError, EOFError, MemoryError)


def _finish(path: Path, y: np.ndarray, source_sr: int, sr: int, duration: Optional[float],
            min_duration: float) -> np.ndarray:
    """Check decoded samples, resample to ``sr`` and fix the length to ``duration``."""
    import librosa

    if y.shape[0] == 0:
        raise AudioError(path, "no audio samples")
    if not np.isfinite(y).all():
        raise AudioError(path, "contains NaN or infinite samples")
    peak = float(np.abs(y).max())
    if peak > MAX_PEAK:  # a flipped exponent byte: 1e28 overflows the float32 power spectrum
        raise AudioError(path, f"samples out of range (peak {peak:.3g}; audio lies within ±1)")
    seconds = y.shape[0] / source_sr
    if seconds < min_duration:
        raise AudioError(path, f"too short ({seconds:.2f} s; --min-duration is {min_duration:g} s)")
    if source_sr != sr:
        y = librosa.resample(y, orig_sr=source_sr, target_sr=sr, res_type="soxr_hq")
    if duration is not None:
        y = librosa.util.fix_length(y, size=int(round(duration * sr)))
    return np.ascontiguousarray(y, dtype=np.float32)


def decode(path: Path, *, sr: int, duration: Optional[float], min_duration: float = 1.0) -> DecodedAudio:
    """Decode ``path`` to mono float32 at ``sr``, trimmed or zero-padded to ``duration`` s.

    Channels are averaged block by block, so memory holds one mono copy at most. Only the
    first ``duration`` seconds of the file are read; ``duration=None`` reads the whole file and
    neither trims nor pads.

    Raises
    ------
    AudioError
        The file is missing, a folder, empty, undecodable, holds non-finite samples, or is
        shorter than ``min_duration`` seconds. The message starts with the path.
    """
    path = Path(path)
    try:
        with _open(path) as fh:
            source_sr, channels, frames = fh.samplerate, fh.channels, fh.frames
            want = None if duration is None else int(math.ceil(duration * source_sr))
            y = _read_mono(fh, want)
    except AudioError:
        raise
    except _DECODE_ERRORS as exc:
        raise _decode_error(path, exc) from None
    seconds = y.shape[0] / source_sr
    y = _finish(path, y, source_sr, sr, duration, min_duration)
    return DecodedAudio(y, int(source_sr), int(channels),
                        float(frames / source_sr if frames > 0 else seconds))


def window_starts(n: int, size: int, min_tail: int) -> list[int]:
    """Starts of consecutive ``size``-sample windows covering ``n`` samples.

    The last window is aligned to the end when the remainder holds at least ``min_tail``
    samples; a signal no longer than ``size`` is one window starting at 0 (padded later).
    """
    if n <= size:
        return [0]
    starts = list(range(0, n - size + 1, size))
    if n - (starts[-1] + size) >= max(1, min_tail):
        starts.append(n - size)
    return starts


def decode_windows(path: Path, *, sr: int, duration: float,
                   min_duration: float = 1.0) -> Iterator[tuple[float, float, np.ndarray]]:
    """Consecutive ``duration``-second windows of a whole file, one at a time.

    Yields ``(start_seconds, file_seconds, y)`` with ``y`` exactly what :func:`decode` returns for a file
    holding only that window: the first window equals ``decode(path, ...)``. A remainder of at
    least ``min_duration`` seconds gets a last window aligned to the end of the file. Memory
    holds one window, whatever the file's length.
    """
    path = Path(path)
    try:
        with _open(path) as fh:
            source_sr, frames = fh.samplerate, fh.frames
            size = int(math.ceil(duration * source_sr))
            for start in window_starts(frames, size, int(min_duration * source_sr)):
                if start:
                    fh.seek(start)
                y = _read_mono(fh, size)
                yield (start / source_sr, frames / source_sr,
                       _finish(path, y, source_sr, sr, duration, min_duration))
    except AudioError:
        raise
    except _DECODE_ERRORS as exc:
        raise _decode_error(path, exc) from None


def _read_mono(fh, frames: Optional[int], block: int = 1 << 20) -> np.ndarray:
    """Read up to ``frames`` frames (all when None) from an open SoundFile, channels averaged."""
    parts = []
    left = frames
    while left is None or left > 0:
        n = block if left is None else min(block, left)
        data = fh.read(frames=n, dtype="float32", always_2d=True)
        if data.shape[0] == 0:
            break
        # a NaN in any channel must survive the mean: np.mean propagates it
        parts.append(data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0].copy())
        if left is not None:
            left -= data.shape[0]
        if data.shape[0] < n:
            break
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
