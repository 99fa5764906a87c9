"""One file's work for extract (and predict's library), run in worker processes.

The one per-file job (:func:`_file_job`): hashing, the cache check, decoding under
``--timeout`` with the check that the file did not change meanwhile, then computing the views
and storing the cache entry (numpy: :func:`hash_and_compute`), or handing the decoded clip
back to the torch backend's pipeline, which computes it in a batch on the device in the main
process (:func:`hash_and_decode`, :mod:`deepfusion.jobs.batcher`). :func:`_run_tasks` hands
the jobs to joblib's workers or Dask (:mod:`deepfusion.runtime.pool`); the limits and
failures are :mod:`deepfusion.jobs.limits`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from deepfusion.config import FeatureConfig
from deepfusion.errors import ParameterError
from deepfusion.io.atomic import read_error_reason
from deepfusion.io.cache import DAMAGED, VALID, FeatureCache, file_digest, file_stamp
from deepfusion.jobs.limits import (CHANGED_WHILE_READ, DEFAULT_TIMEOUT, Failure, FileTimeout,
                                    reason_of, time_limit, took_too_long)
from deepfusion.runtime.heap import claimed, freeze_imports, keep_large_blocks
from deepfusion.runtime.pool import default_jobs, indexed, pool_results

_warmed: set[tuple[bool, Optional[str]]] = set()


@contextlib.contextmanager
def one_torch_thread(needed: bool = True):
    """One torch thread inside (when ``needed``: torch is not imported otherwise), as numpy's
    one BLAS thread: the workers share the cores."""
    try:
        if not needed:
            raise ImportError
        import torch
    except ImportError:      # no torch (an onnx-only machine): the view runs on onnxruntime
        yield
        return

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def numpy_features(y, config: FeatureConfig, view_runtime: Optional[str] = None) -> dict:
    """:func:`~deepfusion.features.numpy_views.compute_features` as a worker runs it: one torch thread
    when torch runs the pretrained view (:func:`~deepfusion.features.pretrained.view.runtime_of`),
    none imported otherwise."""
    from deepfusion.features.numpy_views import compute_features
    from deepfusion.features.pretrained.view import runtime_of

    with one_torch_thread(config.pretrained_view is not None
                          and runtime_of(view_runtime) == "torch"):
        return compute_features(y, config, view_runtime=view_runtime)


def _jit_marker(features: bool) -> Optional[Path]:
    """The file that says a warm-up of this kind completed with this librosa and numba, so
    numba's on-disk cache of them is whole (None where that cannot be told).

    Its name holds librosa's location and modification time, numba's version, the
    ``NUMBA_CACHE_DIR`` and Python's version: a reinstall or another cache gets another name.
    """
    import getpass
    import hashlib
    import importlib.metadata
    import importlib.util
    import sys
    import tempfile

    try:
        origin = importlib.util.find_spec("librosa").origin
        ident = "|".join([origin, str(os.stat(origin).st_mtime_ns),
                          importlib.metadata.version("numba"), os.environ.get("NUMBA_CACHE_DIR", ""),
                          sys.version, "features" if features else "decode"])
        digest = hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"deepfusion-jit-{getpass.getuser()}-{digest}.done"
    except Exception:  # noqa: BLE001 - no marker: every warm-up takes the lock
        return None


@contextlib.contextmanager
def _one_compiler(marker: Optional[Path]) -> Iterator[Callable[[], None]]:
    """One process of this user at a time through the warm-up's first JIT compilation.

    librosa's numba functions are compiled on first use and written to numba's on-disk cache.
    Two processes compiling them at once (the workers of a first ``--jobs 2`` run on a fresh
    install) can leave cache files that make every later process crash with SIGSEGV: seen in
    1 of 4 such runs here. So the first process compiles while the others wait; once one has
    finished (``marker`` written by the callable this yields), the rest load the cache side by
    side without the lock: serialising every worker's whole warm-up cost 16 workers 67 s on a
    16-core machine for 48 clips. Where the lock cannot be taken, the warm-up runs without it.
    """
    import tempfile

    from deepfusion.io.lock import exclusive

    def done() -> None:
        if marker is not None:
            with contextlib.suppress(OSError):
                marker.touch()

    if marker is not None and marker.exists():
        yield done
        return
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(Exception):
            import getpass

            name = f"deepfusion-jit-{getpass.getuser()}.lock"
            stack.enter_context(exclusive(Path(tempfile.gettempdir()) / name, wait=True,
                                          what="the JIT warm-up"))
        if marker is not None and marker.exists():
            stack.close()      # compiled by the process this one waited for
        yield done


#: Seconds of noise :func:`warm_up` analyses: more than one of musicnn's 3-s patches.
WARM_UP_SECONDS = 5.0


def warm_up(config: FeatureConfig, *, features: bool = True,
            view_runtime: Optional[str] = None) -> None:
    """Run every import and JIT compilation that decoding and features need, once per process.

    ``--timeout`` raises wherever the clock runs out. Inside a first import (librosa loads
    scipy and numba lazily) that leaves a half-initialised module in ``sys.modules``, and every
    later file of the process then fails (``NameError: name '_ndimage_api' is not defined``).
    So this runs before the first file's clock starts: a clip of noise through resampling and
    (unless ``features`` is False: a worker that only decodes, for the torch backend) all
    the views, the pretrained one on ``view_runtime`` (see :func:`numpy_features`). The clip
    is :data:`WARM_UP_SECONDS` long, not a whole clip: the same code and the same array types
    (what numba compiles for), at a sixth of the cost, which a run of one new file pays in
    full (a 30-s clip of noise cost 0.9 s of CPU here, the six views and musicnn's, on top of
    the file's own). In a process deepfusion owns, the first warm-up also sets the allocator
    to keep a clip's large arrays for the next one and freezes what the imports made
    (:mod:`deepfusion.runtime.heap`).
    """
    if (features, view_runtime) in _warmed:
        return
    first = not _warmed and claimed()       # deepfusion's own process (runtime.heap)
    _warmed.add((features, view_runtime))
    if first:
        keep_large_blocks()
    marker = _jit_marker(features)
    compiles = marker is None or not marker.exists()     # numba's cache is cold
    # see _one_compiler: a cache that crashes every later run
    with _one_compiler(marker) as done:
        try:
            import librosa
            import numpy as np
            import soundfile  # noqa: F401
            from threadpoolctl import threadpool_limits

            n = min(config.n_samples, int(WARM_UP_SECONDS * config.sample_rate))
            y = 0.1 * np.random.default_rng(0).standard_normal(n).astype(np.float32)
            with threadpool_limits(limits=1):
                librosa.resample(y[:4410], orig_sr=44100, target_sr=config.sample_rate,
                                 res_type="soxr_hq")
                if features:
                    numpy_features(y, config, view_runtime)
            done()
            if first:
                freeze_imports(collect=compiles)
        except Exception:  # noqa: BLE001 - a real file will report whatever this hit
            pass


def compute_entry(path: str, key: str, cache_dir: str, config_dict: dict,
                  timeout: Optional[float] = DEFAULT_TIMEOUT, *,
                  view_runtime: Optional[str] = None) -> Optional[str]:
    """Decode one file, compute its features with the numpy backend and store them in the
    cache (runs in a worker; the torch backend's clips are computed in batches instead, see
    :mod:`deepfusion.jobs.batcher`).

    Returns ``None`` on success or the reason the file could not be used. A file that takes
    longer than ``timeout`` seconds (a hostile header, say) is abandoned and reported.
    ``view_runtime``: what runs the pretrained view (:func:`numpy_features`).
    """
    config = FeatureConfig.from_dict(config_dict)
    audio, feats, reason = _decode_checked(
        path, key, config, timeout, lambda y: numpy_features(y, config, view_runtime),
        view_runtime)
    if reason is None:
        FeatureCache(Path(cache_dir), config).store(key, feats, _entry_meta(audio))
    return reason


def decode_entry(path: str, key: str, config_dict: dict,
                 timeout: Optional[float] = DEFAULT_TIMEOUT) -> tuple[Optional[str], Any]:
    """Decode one file for the torch backend, which computes its features in a batch in the
    main process (runs in a worker).

    Returns ``(None, (samples, entry metadata))`` or ``(reason, None)``; the same checks as
    :func:`compute_entry` (time limit, the file unchanged since it was hashed as ``key``).
    """
    config = FeatureConfig.from_dict(config_dict)
    audio, _, reason = _decode_checked(path, key, config, timeout, None)
    return (reason, None) if reason else (None, (audio.y, _entry_meta(audio)))


def _entry_meta(audio) -> dict[str, Any]:
    from deepfusion.io.cache import audio_digest

    return {"audio_sha": audio_digest(audio.y), "source_sr": audio.source_sr,
            "channels": audio.channels, "source_seconds": round(audio.source_seconds, 4)}


def _decode_checked(path: str, key: str, config: FeatureConfig, timeout: Optional[float],
                    compute, view_runtime: Optional[str] = None
                    ) -> tuple[Any, Any, Optional[str]]:
    """``(audio, compute(audio.y), None)``, or ``(None, None, reason)``.

    Decoding and ``compute`` (None: decode only) run under ``timeout``; afterwards the file
    must still hash to ``key`` with the stat it had before, or nothing is returned.
    """
    from threadpoolctl import threadpool_limits

    from deepfusion.audio import decode

    # always: imports never under the clock, and the JIT compiled by one process at a time
    warm_up(config, features=compute is not None, view_runtime=view_runtime)
    try:
        before = file_stamp(Path(path))
    except OSError as exc:
        return None, None, Failure(read_error_reason(exc))
    feats = None
    try:
        # One BLAS thread whatever --jobs is: OpenBLAS sums in a different order with more
        # threads, and an entry must not depend on how many workers happened to compute it.
        with time_limit(timeout), threadpool_limits(limits=1):
            audio = decode(Path(path), sr=config.sample_rate, duration=config.duration,
                           min_duration=config.min_duration)
            if compute is not None:
                feats = compute(audio.y)
            try:   # the same bytes now, and no write in between (a swap A -> B -> A
                #        while decoding leaves the bytes equal but decoded B)
                unchanged = file_digest(Path(path)) == key and file_stamp(Path(path)) == before
            except OSError:
                unchanged = False
    except Exception as exc:  # noqa: BLE001 - one bad file never ends the batch
        return None, None, reason_of(exc, timeout, "decoding it")
    if not unchanged:  # what was decoded is not what was hashed: never cache it under that key
        return None, None, CHANGED_WHILE_READ
    return audio, feats, None


def _hash(path: str, timeout: Optional[float]) -> tuple[Optional[str], Optional[str]]:
    """``(content key, None)`` or ``(None, reason)``; ``timeout`` bounds the hashing."""
    try:
        with time_limit(timeout):   # a huge or stalled file (a network mount) is a file
            return file_digest(Path(path)), None   # that takes too long, like a slow decode
    except FileTimeout:
        return None, took_too_long(timeout, "hashing it")
    except OSError as exc:
        return None, Failure(read_error_reason(exc))


def _cache_state(cache_dir: str, config_dict: dict, key: str) -> str:
    """What the cache holds under ``key`` (:meth:`FeatureCache.check`: read and verified, so a
    damaged entry is computed again, never handed on)."""
    return FeatureCache(Path(cache_dir), FeatureConfig.from_dict(config_dict)).check(key)


def hash_and_compute(path: str, cache_dir: str, config_dict: dict, timeout: Optional[float],
                     view_runtime: Optional[str] = None
                     ) -> tuple[Optional[str], Optional[str], bool, bool]:
    """One file's task for the numpy backend (in a worker): ``(content key, None, computed,
    repaired)`` or ``(None, reason, False, False)``. The file is hashed, and decoded and
    analysed unless the cache holds a sound entry for its content; ``repaired``: the entry
    there was damaged and has been replaced. ``timeout`` bounds the hashing as it bounds the
    decoding. ``view_runtime``: what runs the pretrained view (see :func:`compute_entry`)."""
    key, reason, computed, repaired = _file_job(path, cache_dir, config_dict, timeout, lambda key: (
        compute_entry(path, key, cache_dir, config_dict, timeout,
                      view_runtime=view_runtime), True))
    return key, reason, bool(computed), repaired


def hash_and_decode(path: str, cache_dir: str, config_dict: dict,
                    timeout: Optional[float]) -> tuple[Optional[str], Optional[str], Any, bool]:
    """One file's task for the torch backend (in a worker): ``(content key, None, decoded,
    repaired)`` or ``(None, reason, None, False)``, where ``decoded`` is ``None`` when the
    cache holds a sound entry for the content and else ``(samples, entry metadata)`` for the
    main process to analyse (``repaired``: it replaces a damaged entry)."""
    return _file_job(path, cache_dir, config_dict, timeout,
                     lambda key: decode_entry(path, key, config_dict, timeout))


def _file_job(path: str, cache_dir: str, config_dict: dict, timeout: Optional[float],
              work: Callable[[str], tuple[Optional[str], Any]]
              ) -> tuple[Optional[str], Optional[str], Any, bool]:
    """The one per-file job: hash the file, and unless the cache holds a sound entry for its
    content run ``work(key)`` (``(reason, output)``). Returns ``(key, None, output, repaired)``
    (``output`` None: the cache had it) or ``(None, reason, None, False)``."""
    key, reason = _hash(path, timeout)
    if reason:
        return None, reason, None, False
    state = _cache_state(cache_dir, config_dict, key)
    if state == VALID:
        return key, None, None, False
    reason, output = work(key)
    return (None, reason, None, False) if reason else (key, None, output, state == DAMAGED)


def _run_tasks(tasks: list[tuple], jobs: Optional[int], scheduler: Optional[str],
               cache_dir: Path, workers: dict[str, int], task: Callable = hash_and_compute, *,
               ahead: int = 0) -> Iterator[tuple[int, tuple]]:
    """``(index, task(*tasks[index]))`` as tasks finish, on joblib's workers (``jobs``; one:
    in this process) or on a Dask cluster (``scheduler``, see :mod:`deepfusion.runtime.cluster`;
    ``workers`` counts the tasks each Dask worker ran).

    Tasks are submitted as results are taken, never more than the pool's bound ahead of the
    caller (:func:`~deepfusion.runtime.pool.pool_results`, :func:`~deepfusion.runtime.pool.map_unordered`),
    and at least ``ahead`` (a caller that gathers batches: the next batch is decoded while it
    computes one)."""
    if not tasks:
        return
    numbered = [(i, task, *args) for i, args in enumerate(tasks)]
    if scheduler:
        from deepfusion.runtime.cluster import check_shared, connect
        from deepfusion.runtime.pool import dask_in_flight, map_unordered, recount

        with connect(scheduler) as client:
            started = check_shared(client, cache_dir)
            results = map_unordered(client, indexed, numbered, per_worker=workers,
                                    label=lambda args: args[2], total=len(numbered),
                                    in_flight=max(ahead, dask_in_flight(client)))
            if task is hash_and_compute:   # a task run again after a lost worker says "cached"
                cache = FeatureCache(Path(cache_dir), FeatureConfig.from_dict(tasks[0][2]))
                results = recount(results, cache.path, started)
            yield from results
        return
    if len(tasks) == 1 or (jobs is not None and int(jobs) <= 1):
        # as joblib runs one job (in this process), without importing it or starting a pool
        yield from (indexed(*args) for args in numbered)
        return
    n_jobs = min(default_jobs() if jobs is None else int(jobs), len(tasks))
    yield from pool_results(indexed, numbered, n_jobs, ordered=False, what="extracting",
                            in_flight=max(ahead, 2 * n_jobs))


def resolve_backend(backend: Optional[str] = None,
                    device: str = "auto") -> tuple[str, Optional[str]]:
    """Which feature code extract runs, and where: ``("numpy", None)`` or ``("torch", device)``.

    ``backend=None`` means numpy on a machine without a GPU and torch on its GPU (cuda, else
    mps) when ``device`` is ``auto`` or names one; ``device="cpu"`` keeps numpy unless
    ``backend="torch"``.

    Raises
    ------
    ParameterError
        An unknown backend, a GPU asked for with the numpy backend, or a device this machine
        does not have.
    """
    if backend not in (None, "numpy", "torch"):
        raise ParameterError(f"--backend must be numpy or torch, got {backend!r}")
    if backend == "numpy" or (backend is None and device == "cpu"):
        if device not in ("auto", "cpu"):
            raise ParameterError(f"--device {device}: the numpy backend runs on the CPU; "
                                 f"give --backend torch to compute the features on {device}")
        return "numpy", None
    if device == "cpu" or (device == "auto" and not _gpu_possible()):
        resolved = "cpu"      # told without importing torch (seconds): a cached clip needs none
    else:
        from deepfusion.runtime.device import resolve_device

        resolved = str(resolve_device(device))     # DeviceError (a ParameterError): not here
    if backend is None and resolved == "cpu":
        return "numpy", None
    return "torch", resolved


#: Device files of the GPU drivers torch uses on Linux: NVIDIA's, ROCm's, WSL's.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def _gpu_possible() -> bool:
    """Whether torch may find a GPU here; False only where that is certain without importing
    torch: on Linux, no GPU driver's device file. Elsewhere (macOS has MPS), or once torch is
    imported (its answer is then free, and what a test pretends), torch is asked."""
    import sys

    if "torch" in sys.modules or not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in GPU_DEVICE_FILES)
