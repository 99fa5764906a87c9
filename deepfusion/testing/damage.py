"""Good and damaged audio files, made in memory, and the kill-at-a-moment harness, for
``tests/test_hardening.py`` and ``benchmarks/robustness.py``.

A good file is a short deterministic clip encoded by soundfile (WAV 8/16/24-bit and float, AU,
AIFF, FLAC, OGG/Vorbis, MP3 where libsndfile writes it). A damaged file is the bytes of a good
one broken in one of the ways of :data:`DAMAGES`: truncated inside the header or the data,
random bytes, header fields that claim huge sizes, zero or 65,535 channels, a zero or absurd
sample rate, impossible sample widths, unknown format codes, a valid header over garbage,
zero-length data chunks, flipped bytes, float samples of 1e28. Everything is seeded: the same
arguments give the same bytes.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import soundfile as sf

SR = 22050

#: (extension, soundfile format, subtype) of the good encodings.
FORMATS = [("wav", "WAV", "PCM_16"), ("wav", "WAV", "PCM_24"), ("wav", "WAV", "FLOAT"),
           ("wav", "WAV", "PCM_U8"), ("au", "AU", "PCM_16"), ("aiff", "AIFF", "PCM_16"),
           ("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS")]
if "MPEG_LAYER_III" in sf.available_subtypes("MP3"):
    FORMATS.append(("mp3", "MP3", "MPEG_LAYER_III"))

#: Bytes of each format's header: where "inside the header" ends.
HEADER_BYTES = {"wav": 44, "au": 24, "aiff": 54, "flac": 42, "ogg": 58, "mp3": 4}


def clip(seed: int, *, seconds: float = 1.0, sr: int = SR, channels: int = 1) -> np.ndarray:
    """A deterministic clip, different for every seed: a tone, its octave, a click track, noise.

    Returns float32 ``(n,)`` for mono, ``(n, channels)`` otherwise.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    f0 = 110.0 * 2 ** (rng.integers(0, 24) / 12)
    y = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(2 * np.pi * 2 * f0 * t + rng.uniform(0, 6))
    y[:: max(1, int(sr * rng.uniform(0.2, 0.5)))] += 0.8
    y += 0.01 * rng.standard_normal(t.size)
    y = (0.9 * y / np.abs(y).max()).astype(np.float32)
    return y if channels == 1 else np.stack([np.roll(y, 37 * c) for c in range(channels)], axis=1)


def encode(y: np.ndarray, fmt: str, subtype: str, sr: int = SR) -> bytes:
    """``y`` as the bytes of a file of format ``fmt``."""
    buf = io.BytesIO()
    sf.write(buf, y, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def good_files(n: int, *, seed: int = 0, seconds: float = 1.0) -> dict[str, bytes]:
    """``n`` readable files, every format in turn (some stereo): name -> bytes."""
    out = {}
    for i in range(n):
        ext, fmt, subtype = FORMATS[i % len(FORMATS)]
        channels = 2 if i % 5 == 4 and fmt != "MP3" else 1
        out[f"good_{i:04d}_{subtype.lower()}.{ext}"] = encode(
            clip(seed * 100_003 + i, seconds=seconds, channels=channels), fmt, subtype)
    return out


# ----------------------------------------------------------------------------- byte surgery

def _put(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _chunk(data: bytes, name: bytes) -> int:
    """Offset of the RIFF chunk ``name`` (its 8-byte header) in a WAV file."""
    pos = 12
    while pos + 8 <= len(data):
        size = struct.unpack_from("<I", data, pos + 4)[0]
        if data[pos:pos + 4] == name:
            return pos
        pos += 8 + size + (size & 1)
    raise ValueError(f"no {name!r} chunk")


def _fmt_field(offset: int, fmt: str, value: int) -> Callable:
    """Set a field of the WAV ``fmt `` chunk (offset from the start of its body)."""
    return lambda rng, d: _put(d, _chunk(d, b"fmt ") + 8 + offset, fmt, value)


def _flip(rng: np.random.Generator, data: bytes, lo: int, hi: int, count: int) -> bytes:
    out = bytearray(data)
    hi = min(hi, len(out))
    for pos in rng.integers(lo, max(lo + 1, hi), size=count):
        out[pos] ^= int(rng.integers(1, 256))
    return bytes(out)


def _data_start(d: bytes) -> int:
    return _chunk(d, b"data") + 8


def _header_bytes(data: bytes) -> int:
    """Header length of a good file's format, recognised by its magic bytes."""
    magic = {b"RIFF": "wav", b".snd": "au", b"FORM": "aiff", b"fLaC": "flac", b"OggS": "ogg"}
    return min(HEADER_BYTES[magic.get(data[:4], "mp3")], len(data) - 1)


def _huge_float_samples(rng: np.random.Generator, d: bytes) -> bytes:
    """A float WAV of the same audio in which some samples hold +-3e28 (a flipped exponent)."""
    y, sr = sf.read(io.BytesIO(d), dtype="float32", always_2d=True)
    idx = rng.integers(0, y.shape[0], size=int(rng.integers(1, 20)))
    y[idx, 0] = np.float32(3e28) * rng.choice([-1, 1], size=idx.size)
    return encode(y, "WAV", "FLOAT", sr)


def _flac_streaminfo(field: str) -> Callable:
    """Damage one field of FLAC's STREAMINFO block (bytes 8-41)."""
    def damage(rng, d: bytes) -> bytes:
        out = bytearray(d)
        if field == "length":                     # the block claims 16 MB
            out[5:8] = b"\xff\xff\xff"
        elif field == "blocksize":                # min/max block size 0
            out[8:12] = b"\0\0\0\0"
        else:                                     # bits 80-143: rate(20) ch-1(3) bps-1(5) total(36)
            bits = int.from_bytes(out[18:26], "big")
            if field == "rate":
                bits &= ~(0xFFFFF << 44)
            elif field == "bps":
                bits |= 0x1F << 36
            elif field == "total":
                bits |= (1 << 36) - 1
            out[18:26] = bits.to_bytes(8, "big")
        return bytes(out)
    return damage


#: name -> (extensions it applies to, or None for all; function (rng, good bytes) -> bytes)
DAMAGES: dict[str, tuple[tuple[str, ...] | None, Callable]] = {
    # anything
    "empty": (None, lambda rng, d: b""),
    "one_byte": (None, lambda rng, d: d[:1]),
    "random_bytes": (None, lambda rng, d: rng.bytes(int(rng.integers(1, 40_000)))),
    "text": (None, lambda rng, d: b"this is not a recording\n" * int(rng.integers(1, 400))),
    "zeros": (None, lambda rng, d: bytes(len(d))),
    "truncated_header": (None, lambda rng, d: d[:int(rng.integers(1, _header_bytes(d)))]),
    "header_only": (None, lambda rng, d: d[:_header_bytes(d)]),
    "truncated_data": (None, lambda rng, d: d[:int(rng.integers(_header_bytes(d), len(d)))]),
    "flipped_header": (None, lambda rng, d: _flip(rng, d, 0, _header_bytes(d), int(rng.integers(1, 6)))),
    "flipped_bytes": (None, lambda rng, d: _flip(rng, d, 0, len(d), int(rng.integers(1, 64)))),
    "header_over_garbage": (None, lambda rng, d: d[:_header_bytes(d)]
                            + rng.bytes(len(d) - _header_bytes(d))),
    "header_twice": (None, lambda rng, d: d[:_header_bytes(d)] + d),
    # WAV: RIFF and chunk sizes
    "wav_riff_size_huge": (("wav",), lambda rng, d: _put(d, 4, "<I", 0xFFFFFFFF)),
    "wav_riff_size_zero": (("wav",), lambda rng, d: _put(d, 4, "<I", 0)),
    "wav_not_riff": (("wav",), lambda rng, d: b"RIFX" + d[4:]),
    "wav_data_size_huge": (("wav",), lambda rng, d: _put(d, _chunk(d, b"data") + 4, "<I", 0xFFFFFFFF)),
    "wav_data_size_zero": (("wav",), lambda rng, d: _put(d, _chunk(d, b"data") + 4, "<I", 0)),
    "wav_data_size_zero_no_data": (("wav",), lambda rng, d: _put(d[:_data_start(d)],
                                                                 _chunk(d, b"data") + 4, "<I", 0)),
    "wav_data_past_end": (("wav",), lambda rng, d: _put(d, _chunk(d, b"data") + 4, "<I",
                                                        len(d) + 12_345)),
    "wav_no_data_chunk": (("wav",), lambda rng, d: d[:_chunk(d, b"data")]),
    "wav_no_fmt_chunk": (("wav",), lambda rng, d: d[:12] + b"xxxx" + d[16:]),
    "wav_fmt_size_huge": (("wav",), lambda rng, d: _put(d, _chunk(d, b"fmt ") + 4, "<I", 0xFFFFFFF0)),
    "wav_fmt_size_tiny": (("wav",), lambda rng, d: _put(d, _chunk(d, b"fmt ") + 4, "<I", 2)),
    # WAV: fmt fields
    "wav_format_unknown": (("wav",), _fmt_field(0, "<H", 0x1234)),
    "wav_format_extensible_no_extension": (("wav",), _fmt_field(0, "<H", 0xFFFE)),
    "wav_channels_zero": (("wav",), _fmt_field(2, "<H", 0)),
    "wav_channels_65535": (("wav",), _fmt_field(2, "<H", 65535)),
    "wav_channels_1000": (("wav",), _fmt_field(2, "<H", 1000)),
    "wav_rate_zero": (("wav",), _fmt_field(4, "<I", 0)),
    "wav_rate_one": (("wav",), _fmt_field(4, "<I", 1)),
    "wav_rate_huge": (("wav",), _fmt_field(4, "<I", 0xFFFFFFFF)),
    "wav_byte_rate_zero": (("wav",), _fmt_field(8, "<I", 0)),
    "wav_block_align_zero": (("wav",), _fmt_field(12, "<H", 0)),
    "wav_block_align_huge": (("wav",), _fmt_field(12, "<H", 0xFFFF)),
    "wav_bits_0": (("wav",), _fmt_field(14, "<H", 0)),
    "wav_bits_7": (("wav",), _fmt_field(14, "<H", 7)),
    "wav_bits_64": (("wav",), _fmt_field(14, "<H", 64)),
    "wav_bits_65535": (("wav",), _fmt_field(14, "<H", 0xFFFF)),
    "wav_float_samples_huge": (("wav",), _huge_float_samples),
    # AU: big-endian header of six 32-bit fields
    "au_offset_huge": (("au",), lambda rng, d: _put(d, 4, ">I", 0x7FFFFFF0)),
    "au_offset_zero": (("au",), lambda rng, d: _put(d, 4, ">I", 0)),
    "au_size_huge": (("au",), lambda rng, d: _put(d, 8, ">I", 0xFFFFFFF0)),
    "au_size_zero": (("au",), lambda rng, d: _put(d, 8, ">I", 0)),
    "au_encoding_unknown": (("au",), lambda rng, d: _put(d, 12, ">I", 99)),
    "au_rate_zero": (("au",), lambda rng, d: _put(d, 16, ">I", 0)),
    "au_rate_huge": (("au",), lambda rng, d: _put(d, 16, ">I", 0xFFFFFFFF)),
    "au_channels_zero": (("au",), lambda rng, d: _put(d, 20, ">I", 0)),
    "au_channels_huge": (("au",), lambda rng, d: _put(d, 20, ">I", 0xFFFFFFFF)),
    # AIFF: COMM chunk fields
    "aiff_channels_zero": (("aiff",), lambda rng, d: _put(d, 20, ">H", 0)),
    "aiff_frames_huge": (("aiff",), lambda rng, d: _put(d, 22, ">I", 0xFFFFFFFF)),
    "aiff_bits_zero": (("aiff",), lambda rng, d: _put(d, 26, ">H", 0)),
    "aiff_form_size_huge": (("aiff",), lambda rng, d: _put(d, 4, ">I", 0xFFFFFFFF)),
    # FLAC: STREAMINFO
    "flac_streaminfo_length_huge": (("flac",), _flac_streaminfo("length")),
    "flac_blocksize_zero": (("flac",), _flac_streaminfo("blocksize")),
    "flac_rate_zero": (("flac",), _flac_streaminfo("rate")),
    "flac_bits_32": (("flac",), _flac_streaminfo("bps")),
    "flac_total_samples_huge": (("flac",), _flac_streaminfo("total")),
    # OGG: damaged pages
    "ogg_page_flipped": (("ogg",), lambda rng, d: _flip(rng, d, 28, 200, 4)),
    "ogg_second_page_flipped": (("ogg",), lambda rng, d: _flip(rng, d, 200, 4000, 16)),
}


def damaged_files(n: int, *, seed: int = 0, seconds: float = 1.0) -> dict[str, tuple[bytes, str]]:
    """``n`` damaged files, every kind of :data:`DAMAGES` in turn: name -> (bytes, damage).

    The good file each one starts from is a fresh clip in a format the damage applies to, so a
    damage that leaves the file readable (flipped bytes in the samples) still gives new audio.
    """
    rng = np.random.default_rng(seed)
    names = list(DAMAGES)
    out = {}
    for i in range(n):
        damage = names[i % len(names)]
        exts, func = DAMAGES[damage]
        choices = [f for f in FORMATS if exts is None or f[0] in exts]
        ext, fmt, subtype = choices[int(rng.integers(len(choices)))]
        channels = 2 if rng.random() < 0.2 and fmt != "MP3" else 1
        good = encode(clip(seed * 100_003 + 50_000 + i, seconds=seconds, channels=channels),
                      fmt, subtype)
        out[f"bad_{i:04d}_{damage}.{ext}"] = (func(rng, good), damage)
    return out


#: ``python -c`` source that runs the deepfusion CLI and reports its peak memory on stderr
#: (``MAXRSS_KB main workers``). VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's size when it was forked
# (pytest with torch loaded), which would hide any growth. Workers are only bounded from above.
MAXRSS_SCRIPT = """
import atexit, resource, sys
def report():
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with open("/proc/self/status") as fh:
            own = next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"MAXRSS_KB {own} {workers}", file=sys.stderr)
atexit.register(report)
from deepfusion.cli import main
main(prog_name="deepfusion")
"""


# Malicious pickle payloads: unpickling one of these would create MARKER.

class RunsShell:
    """Unpickling this runs ``touch MARKER`` through os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsPython:
    """Unpickling this creates MARKER through builtins.exec."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def write_long_wav(path: Path, seconds: int, *, sr: int = 48_000, channels: int = 2) -> Path:
    """A long 16-bit WAV written ten seconds at a time (this process never holds it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seconds)
    with sf.SoundFile(str(path), "w", sr, channels, subtype="PCM_16", format="WAV") as fh:
        for start in range(0, seconds, 10):
            t = (start * sr + np.arange(10 * sr)) / sr
            tone = 0.3 * np.sin(2 * np.pi * 220 * t)[:, None]
            fh.write((tone + 0.01 * rng.standard_normal((t.size, channels))).astype(np.float32))
    return path


# Kills at a moment of progress.

def kill_when(cmd: list[str], progress: Callable[[], int], target: int, delay: float, *,
              env: dict, timeout: float) -> tuple[bool, Optional[int], str]:
    """Start ``cmd``; once ``progress()`` reaches ``target``, wait ``delay`` s more and SIGKILL
    its whole process group (the command and its workers, as a crash would).

    Progress-triggered kills land in every phase (start-up, mid-work, the final writes) where
    kills at uniform times would mostly hit the seconds spent importing. Returns ``(killed,
    exit status, stderr)``; the status and stderr are those of a run that ended by itself
    first (None and '' when killed).
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and progress() < target and time.monotonic() < deadline:
            time.sleep(0.005)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True, None, ""
        return False, proc.returncode, proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()


def cache_entries(cache: Path) -> Callable[[], int]:
    """Progress of an extract: cache entries written."""
    return lambda: sum(1 for _ in cache.rglob("*.npz")) if cache.exists() else 0


def history_epochs(model_dir: Path) -> Callable[[], int]:
    """Progress of a training run: epochs in its history file."""
    def count() -> int:
        try:
            return len((model_dir / "training_history.csv").read_text().splitlines()) - 1
        except OSError:
            return 0
    return count
