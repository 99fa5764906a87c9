"""The pretrained view's geometry: musicnn's 16-kHz frames, its 3-s patches and the rows it
gives per patch, in plain arithmetic (no imports), so that :mod:`deepfusion.config` can size
the view without importing the network (:mod:`deepfusion.features.pretrained`).

The view's time axis is the network's patches, not STFT frames: one 3-s patch in every
``stride`` of the clip's (:func:`chosen_patches`); :func:`patch_span` maps a segment of frames
to the patches that represent it.
"""

from __future__ import annotations

import math

#: musicnn's input: 16-kHz audio, frames of 256 samples (its STFT's n_fft is 512)
SAMPLE_RATE = 16000
HOP = 256
#: 3 s of frames: librosa.time_to_frames(3, sr=16000, n_fft=512, hop_length=256) + 1
PATCH_FRAMES = 187

#: The parts of each patch's rows, in order, with their sizes.
PARTS = (("penultimate", 200), ("taggram", 50))
VIEW_ROWS = sum(n for _, n in PARTS)
#: The shortest 16-kHz signal that gives one whole patch (shorter clips are zero-padded).
MIN_SAMPLES = (PATCH_FRAMES - 1) * HOP


def part_rows(name: str) -> slice:
    """The rows of one part of the view (``penultimate`` or ``taggram``)."""
    start = 0
    for part, n in PARTS:
        if part == name:
            return slice(start, start + n)
        start += n
    raise KeyError(name)


def samples_16k(n_samples: int, sample_rate: int) -> int:
    """Samples of a clip of ``n_samples`` at ``sample_rate`` once resampled to 16 kHz."""
    return max(int(math.ceil(n_samples * SAMPLE_RATE / sample_rate)), MIN_SAMPLES)


def all_patches(n_samples: int, sample_rate: int) -> int:
    """Whole patches of a clip (at least one: a short clip is zero-padded to one)."""
    frames = 1 + samples_16k(n_samples, sample_rate) // HOP
    return max(1, frames // PATCH_FRAMES)


def chosen_patches(total: int, stride: int) -> range:
    """The patches of a clip of ``total`` that go through the network: one in every
    ``stride``, the selection centred in the clip."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride!r}")
    return range(((total - 1) % stride) // 2, total, stride)


def n_patches(n_samples: int, sample_rate: int, stride: int = 1) -> int:
    """Patches of the view of a clip: :func:`chosen_patches` of :func:`all_patches`."""
    return len(chosen_patches(all_patches(n_samples, sample_rate), stride))


def patch_span(start: int, length: int, n_frames: int, patches: int) -> tuple[int, int]:
    """The patches ``[first, first + count)`` that a segment of STFT frames
    ``[start, start + length)`` of an ``n_frames`` clip covers, ``count`` depending on
    ``length`` only (a batch of segments stacks)."""
    count = min(patches, max(1, round(length * patches / n_frames)))
    first = min(patches - count, int(start * patches // n_frames))
    return first, count
