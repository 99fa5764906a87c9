"""Extract's per-file work, dispatched: on the workers (numpy, or torch on the CPU: hash,
decode, analyse, store), or, for the torch backend on a GPU, clips the workers decoded analysed
in batches on the device in this process, their entries written to the cache as they come.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

from deepfusion.config import FeatureConfig
from deepfusion.errors import DeepFusionError
from deepfusion.io.cache import FeatureCache
from deepfusion.jobs.job import _run_tasks, hash_and_decode
from deepfusion.jobs.limits import failed

#: Devices on which the torch backend runs per file in the workers, as numpy does (on a GPU
#: the workers only decode, and this process analyses batches of their clips).
TORCH_IN_WORKERS = ("cpu",)

#: Samples of decoded audio the torch backend analyses at once: 16 clips of 30 s at 22,050 Hz
#: (a few GB of device memory at the peak, the HPSS medians; see features_torch).
TORCH_BATCH_SAMPLES = 16 * 30 * 22050


def torch_batches(results: Iterator[tuple[int, tuple]], cache: FeatureCache,
                   config: FeatureConfig, device: str) -> Iterator[tuple[int, tuple]]:
    """Turn ``(index, hash_and_decode(...))`` into ``(index, hash_and_compute(...))``: decoded
    clips are gathered into batches, analysed on ``device`` here, in the main process, and
    stored in ``cache``. A batch that fails is retried clip by clip, so that a failure is
    reported for the file that causes it."""
    batch = max(1, TORCH_BATCH_SAMPLES // config.n_samples)
    pending: list[tuple[int, str, Any, dict, bool]] = []
    for index, (key, reason, decoded, repaired) in results:
        if decoded is None:
            yield index, (key, reason, False, False)
            continue
        pending.append((index, key, *decoded, repaired))
        if len(pending) >= batch:
            yield from _analyse(pending, cache, config, device)
            pending = []
    if pending:
        yield from _analyse(pending, cache, config, device)


def _analyse(pending: list[tuple[int, str, Any, dict, bool]], cache: FeatureCache,
             config: FeatureConfig, device: str) -> Iterator[tuple[int, tuple]]:
    import numpy as np

    from deepfusion.features.torch_views import compute_features_torch

    try:
        feats = compute_features_torch(np.stack([y for _, _, y, _, _ in pending]), config,
                                       device=device)
    except Exception:  # noqa: BLE001 - out of device memory, or one bad clip: one at a time
        feats = [None] * len(pending)
    for (index, key, y, meta, repaired), f in zip(pending, feats):
        if f is None:
            try:
                f = compute_features_torch(y, config, device=device)[0]
            except DeepFusionError as exc:
                yield index, (None, str(exc), False, False)
                continue
            except Exception as exc:  # noqa: BLE001 - as compute_entry: report, carry on
                _stop_if_out_of_memory(exc, device)
                yield index, (None, failed(exc), False, False)
                continue
        cache.store(key, f, meta)
        yield index, (key, None, True, repaired)


def _stop_if_out_of_memory(exc: Exception, device: str) -> None:
    """One clip alone does not fit on ``device``: no later clip will, so stop in one line."""
    from deepfusion.runtime.memory import is_out_of_memory

    if is_out_of_memory(exc):
        from deepfusion.errors import DeviceMemoryError

        raise DeviceMemoryError(f"out of memory on {device} computing the features of one clip; "
                                "give --device cpu, or --backend numpy") from None


def feature_tasks(tasks: list[tuple], jobs: Optional[int], scheduler: Optional[str],
                  cache_dir: Path, workers: dict[str, int], *, cache: FeatureCache,
                  config: FeatureConfig, device: Optional[str]) -> Iterator[tuple[int, tuple]]:
    """``(index, (content key, reason, computed, repaired))`` for every ``(path, cache_dir, config_dict,
    timeout)`` of ``tasks``, as they finish.

    ``device`` None (numpy) or in :data:`TORCH_IN_WORKERS`: the workers hash, decode, analyse
    and store. Otherwise (a GPU) the workers hash and decode, and this process analyses the
    decoded clips in batches on ``device`` and stores their entries in ``cache``.
    """
    if device is not None and device not in TORCH_IN_WORKERS:
        yield from torch_batches(
            _run_tasks(tasks, jobs, scheduler, cache_dir, workers, hash_and_decode),
            cache, config, device)
    else:   # numpy, or (device "cpu") one torch thread in each worker
        yield from _run_tasks([(*task, device) for task in tasks], jobs, scheduler,
                              cache_dir, workers)
