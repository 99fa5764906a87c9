"""Extract's per-file work, dispatched by backend.

numpy: the workers run the whole per-file job (hash, decode, analyse, store).

torch, on every device (``cpu`` included): one pipeline. The workers run the same per-file job
up to the decoded clip (:func:`~deepfusion.jobs.job.hash_and_decode`: hash, cache check,
decode under ``--timeout``, the file unchanged meanwhile) and hand the waveform back; this
process gathers the clips into batches of at most :data:`TORCH_BATCH_SAMPLES` samples,
computes every view of a batch on the device (:func:`~deepfusion.features.torch_views.compute_features_torch`,
the pretrained view included) and writes their cache entries as they come. The workers keep
decoding while a batch is computed, up to a bound on the clips decoded and not yet taken (a
batch ahead: :func:`~deepfusion.jobs.job._run_tasks`), so memory does not grow with the
collection. ``--jobs`` counts the decoding workers (1: decoding in this process, between
batches); this process's torch uses its own threads (torch's default: every core).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from deepfusion.config import FeatureConfig
from deepfusion.errors import ClusterLostError, DeepFusionError, WorkerCrashError
from deepfusion.io.cache import FeatureCache
from deepfusion.jobs.job import _run_tasks, compute_entry, decode_entry, hash_and_decode
from deepfusion.jobs.limits import failed

#: Samples of decoded audio the torch backend analyses at once: 16 clips of 30 s at 22,050 Hz
#: (a few GB of device memory at the peak, the HPSS medians; see torch_views).
TORCH_BATCH_SAMPLES = 16 * 30 * 22050


@dataclass
class DeviceTime:
    """Seconds this process spent computing batches of clips (on a GPU, to the end of the
    device's work), for :attr:`deepfusion.extract.ExtractResult.device_busy`."""

    seconds: float = 0.0


def batch_size(config: FeatureConfig) -> int:
    """Clips per batch: :data:`TORCH_BATCH_SAMPLES` of clips of ``config``'s length."""
    return max(1, TORCH_BATCH_SAMPLES // config.n_samples)


def feature_tasks(tasks: list[tuple], jobs: Optional[int], scheduler: Optional[str],
                  cache_dir: Path, workers: dict[str, int], *, cache: FeatureCache,
                  config: FeatureConfig, device: Optional[str],
                  clock: Optional[DeviceTime] = None) -> Iterator[tuple[int, tuple]]:
    """``(index, (content key, reason, computed, repaired))`` for every ``(path, cache_dir,
    config_dict, timeout)`` of ``tasks``, as they finish.

    ``device`` None (numpy): the workers hash, decode, analyse and store. Otherwise the
    workers hash and decode, and this process analyses the decoded clips in batches on
    ``device`` and stores their entries in ``cache``; ``clock`` adds up the seconds it spends
    computing them.
    """
    if device is None:
        yield from _run_tasks(tasks, jobs, scheduler, cache_dir, workers)
        return
    decoded = _run_tasks(tasks, jobs, scheduler, cache_dir, workers, hash_and_decode,
                         ahead=batch_size(config))
    yield from torch_batches(decoded, cache, config, device, clock)


def torch_batches(results: Iterator[tuple[int, tuple]], cache: FeatureCache,
                  config: FeatureConfig, device: str, clock: Optional[DeviceTime] = None
                  ) -> Iterator[tuple[int, tuple]]:
    """Turn ``(index, hash_and_decode(...))`` into ``(index, hash_and_compute(...))``: decoded
    clips are gathered into batches of :func:`batch_size`, analysed on ``device`` here, in the
    main process, and stored in ``cache``. A batch that fails is retried clip by clip, so that
    a failure is reported for the file that causes it."""
    size = batch_size(config)
    pending: list[tuple[int, str, Any, dict, bool]] = []
    try:
        for index, (key, reason, decoded, repaired) in results:
            if decoded is None:
                yield index, (key, reason, False, False)
                continue
            pending.append((index, key, *decoded, repaired))
            if len(pending) >= size:
                batch, pending = pending, []
                yield from _analyse(batch, cache, config, device, clock)
    except (WorkerCrashError, ClusterLostError):
        # the run stops; what was decoded before the worker or cluster was lost is kept
        for _ in _analyse(pending, cache, config, device, clock):
            pass
        raise
    if pending:
        yield from _analyse(pending, cache, config, device, clock)


def compute_again(path: str, key: str, cache_dir: Path, timeout: Optional[float], *,
                  cache: FeatureCache, config: FeatureConfig, device: Optional[str],
                  clock: Optional[DeviceTime] = None) -> Optional[str]:
    """Compute and store the entry of one file again, here (one that vanished or was damaged
    after its task reported it): ``None`` or the reason the file cannot be used. The numpy
    backend runs its job's :func:`~deepfusion.jobs.job.compute_entry`; the torch backend
    decodes the file as its workers do and computes a batch of one on ``device``."""
    if device is None:
        return compute_entry(path, key, str(cache_dir), config.to_dict(), timeout)
    reason, decoded = decode_entry(path, key, config.to_dict(), timeout)
    if reason:
        return reason
    ((_, (_, reason, _, _)),) = _analyse([(0, key, *decoded, False)], cache, config, device, clock)
    return reason


def _analyse(pending: list[tuple[int, str, Any, dict, bool]], cache: FeatureCache,
             config: FeatureConfig, device: str, clock: Optional[DeviceTime]
             ) -> Iterator[tuple[int, tuple]]:
    import numpy as np

    try:
        feats = _timed(np.stack([y for _, _, y, _, _ in pending]), config, device, clock)
    except Exception:  # noqa: BLE001 - out of device memory, or one bad clip: one at a time
        feats = [None] * len(pending)
    for (index, key, y, meta, repaired), f in zip(pending, feats):
        if f is None:
            try:
                f = _timed(y, config, device, clock)[0]
            except DeepFusionError as exc:
                yield index, (None, str(exc), False, False)
                continue
            except Exception as exc:  # noqa: BLE001 - as compute_entry: report, carry on
                _stop_if_out_of_memory(exc, device)
                yield index, (None, failed(exc), False, False)
                continue
        cache.store(key, f, meta)
        yield index, (key, None, True, repaired)


def _timed(ys, config: FeatureConfig, device: str, clock: Optional[DeviceTime]) -> list[dict]:
    """:func:`~deepfusion.features.torch_views.compute_features_torch` of ``ys``, its seconds
    (to the end of the device's work) added to ``clock``."""
    from deepfusion.features.torch_views import compute_features_torch

    start = time.perf_counter()
    try:
        return compute_features_torch(ys, config, device=device)
    finally:
        _synchronize(device)
        if clock is not None:
            clock.seconds += time.perf_counter() - start


def _synchronize(device: str) -> None:
    """Wait for ``device``'s queued work (a GPU runs asynchronously); nothing on the CPU."""
    import torch

    kind = torch.device(device).type
    # a failing device raises again on its next use; here only the clock is at stake
    with contextlib.suppress(Exception):
        if kind == "cuda":
            torch.cuda.synchronize(device)
        elif kind == "mps":
            torch.mps.synchronize()


def _stop_if_out_of_memory(exc: Exception, device: str) -> None:
    """One clip alone does not fit on ``device``: no later clip will, so stop in one line."""
    from deepfusion.runtime.memory import is_out_of_memory

    if is_out_of_memory(exc):
        from deepfusion.errors import DeviceMemoryError

        raise DeviceMemoryError(f"out of memory on {device} computing the features of one clip; "
                                "give --device cpu, or --backend numpy") from None
