"""Every clip-length window of a file, through the feature cache extract fills.

``predict`` and ``embed`` classify whole files: a file longer than the training clip is cut
into consecutive clip-length windows (:func:`deepfusion.audio.decode_windows`). Window 0 is
exactly what ``extract`` computes for the file, so it is extract's cache entry (the file's
SHA-256 in the feature configuration's namespace); window ``i > 0`` is the entry
``<sha256>-<i>`` beside it. A file extracted or classified before is therefore not decoded
again, and a killed run continues from what its workers stored.

No torch here: the workers of ``predict --engine onnx`` run this module too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from deepfusion.config import FeatureConfig
from deepfusion.errors import AudioError
from deepfusion.io.atomic import read_error_reason
from deepfusion.io.cache import FeatureCache, audio_digest, file_digest, file_stamp, stamp_or_none
from deepfusion.jobs.job import hash_and_compute, numpy_features, warm_up
from deepfusion.jobs.limits import (CHANGED_WHILE_READ, Failure, FileTimeout, reason_of, time_limit,
                                    took_too_long)


def window_key(key: str, index: int) -> str:
    """The cache entry of window ``index`` of the file whose content hash is ``key``."""
    return key if index == 0 else f"{key}-{index}"


def count_windows(path: Path, config: FeatureConfig) -> tuple[int, float]:
    """``(windows, seconds)`` of an audio file, from its header alone (no sample is read).

    Raises
    ------
    AudioError
        Not a readable audio file.
    """
    from deepfusion.audio import _decode_error, _open, window_starts

    try:
        with _open(Path(path)) as fh:
            sr, frames = fh.samplerate, fh.frames
    except AudioError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever libsndfile says of a bad header
        raise _decode_error(Path(path), exc) from None
    size = int(math.ceil(config.duration * sr))
    return len(window_starts(frames, size, int(config.min_duration * sr))), frames / sr


def file_windows(path: str, cache_dir: str, config_dict: dict, timeout: Optional[float],
                 view_runtime: Optional[str] = None
                 ) -> tuple[Optional[str], int, float, Optional[str], int, int]:
    """One file's task (in a worker): make sure every window of ``path`` is in the cache,
    sound (a damaged entry is computed again and replaced).

    Returns ``(key, windows, seconds, reason, computed, repaired)``: the content hash, the
    number of windows, the file's length, ``None`` or the reason the file cannot be used, how
    many windows were computed (0 when all came from the cache) and how many of those replaced
    a damaged entry. ``timeout`` bounds the hashing, the first window (as in extract) and each
    further window. ``view_runtime``: what runs the pretrained view
    (:func:`~deepfusion.jobs.job.numpy_features`).
    """
    from deepfusion.audio import check_file
    from deepfusion.io.cache import DAMAGED, VALID

    config = FeatureConfig.from_dict(config_dict)
    cache = FeatureCache(Path(cache_dir), config)
    try:
        check_file(Path(path))     # not found, a folder, empty: the usual reasons
        # the stamp first: the header's window count must be that of the bytes hashed next
        before = file_stamp(Path(path))
        with time_limit(timeout):
            windows, seconds = count_windows(Path(path), config)
    except OSError as exc:
        return None, 0, 0.0, Failure(read_error_reason(exc)), 0, 0
    except (AudioError, FileTimeout) as exc:
        return None, 0, 0.0, reason_of(exc, timeout, "reading its header"), 0, 0
    if 0 < seconds < config.min_duration:   # the model's minimum, not an option of this command
        return (None, 0, seconds, Failure(f"too short ({seconds:.2f} s; this model needs "
                f"{config.min_duration:g} s)"), 0, 0)
    key, reason, fresh, mended = hash_and_compute(path, cache_dir, config_dict, timeout,
                                                  view_runtime=view_runtime)
    if not reason and stamp_or_none(path) != before:
        reason = CHANGED_WHILE_READ
    if reason:
        return None, windows, seconds, reason, 0, 0
    states = {i: cache.check(window_key(key, i)) for i in range(1, windows)}
    missing = [i for i, state in states.items() if state != VALID]
    repaired = int(mended) + sum(state == DAMAGED for state in states.values())
    if not missing:
        return key, windows, seconds, None, int(fresh), repaired
    # imports and JIT compilation never under the clock (see there)
    warm_up(config, view_runtime=view_runtime)
    written: list[str] = []
    try:
        reason = _later_windows(Path(path), key, missing, cache, config, timeout, written,
                                total=windows, view_runtime=view_runtime)
        if reason is None:
            with time_limit(timeout):
                if file_digest(Path(path)) != key or stamp_or_none(path) != before:
                    reason = CHANGED_WHILE_READ
    except FileTimeout:
        reason = took_too_long(timeout, "hashing it")
    except OSError:
        reason = CHANGED_WHILE_READ
    if reason:
        for name in written:     # never keep windows of other bytes under this file's key
            cache.path(name).unlink(missing_ok=True)
        return None, windows, seconds, reason, 0, 0
    return key, windows, seconds, None, int(fresh) + len(missing), repaired


def _later_windows(path: Path, key: str, missing: list[int], cache: FeatureCache,
                   config: FeatureConfig, timeout: Optional[float], written: list[str], *,
                   total: int, view_runtime: Optional[str] = None) -> Optional[str]:
    """Compute and store windows ``missing`` (all > 0) of ``path`` (``total`` by its header),
    one at a time; ``None``, or why it failed (the window that ran past ``timeout``)."""
    from threadpoolctl import threadpool_limits

    from deepfusion.audio import decode_windows

    wanted = set(missing)
    index = 0
    try:
        with threadpool_limits(limits=1):    # as extract: numbers independent of --jobs
            windows = decode_windows(path, sr=config.sample_rate, duration=config.duration,
                                     min_duration=config.min_duration)
            for index in range(max(wanted) + 1):
                with time_limit(timeout):
                    start, seconds, y = next(windows)
                    if index not in wanted:
                        continue
                    feats = numpy_features(y, config, view_runtime)
                meta = {"audio_sha": audio_digest(y), "source_sr": None, "channels": None,
                        "source_seconds": round(seconds, 4), "start_seconds": round(start, 4)}
                cache.store(window_key(key, index), feats, meta)
                written.append(window_key(key, index))
    except StopIteration:
        return Failure(f"damaged: shorter than its header says (window {index + 1} of {total} "
                       "is missing)")
    except Exception as exc:  # noqa: BLE001 - one bad file never ends the batch
        return reason_of(exc, timeout, f"on window {index + 1} of {total}")
    return None


def load_window(cache: FeatureCache, key: str, index: int) -> Optional[dict[str, np.ndarray]]:
    """The views of one window, shape (1, rows, frames) each (patches for the pretrained view),
    or None when the entry is missing or damaged."""
    entry = cache.load(window_key(key, index))
    if entry is None:
        return None
    return {k: v[None] for k, v in entry.features.items()}


def run_file_tasks(paths: list[Path], *, cache_dir: Path, config: FeatureConfig,
                   jobs: Optional[int], timeout: Optional[float],
                   view_runtime: Optional[str] = None) -> Iterator[tuple]:
    """:func:`file_windows` of every path, in the order of ``paths``, on ``jobs`` processes
    (default all cores); ``view_runtime``: what runs the pretrained view.

    At most ``2 * jobs`` files are in flight, so memory does not grow with the number of files.
    """
    config_dict = config.to_dict()
    tasks = [(str(p), str(cache_dir), config_dict, timeout, view_runtime) for p in paths]
    if len(tasks) > 1:
        from deepfusion.runtime.pool import default_jobs

        jobs = default_jobs() if jobs is None else max(1, int(jobs))
    if len(tasks) <= 1 or jobs <= 1:   # here: no pool to start (nor joblib to import)
        for task in tasks:
            yield file_windows(*task)
        return
    from deepfusion.runtime.pool import pool_results

    yield from pool_results(file_windows, tasks, min(jobs, len(tasks)), ordered=True,
                            what="analysing files")
