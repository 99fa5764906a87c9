"""The extract stage: a folder of labelled audio to a features file, through the cache.

Work is split so that nothing computed is ever lost: worker processes decode a clip, compute its
features and write its cache entry atomically; only then does the main process assemble the
features file (a pickle, or a memory-mappable store folder) from the cache, in sorted path
order, and replace the output atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from .audio import AudioItem, check_file, discover
from .io.cache import FeatureCache, file_digest, file_stamp
from .config import (DEFAULT_CACHE_DIR, DEFAULT_FEATURES, DEFAULT_STORE, FEATURE_FORMATS,
                     FeatureConfig)
from .errors import AudioError, DeepFusionError, OutputError, ParameterError
from .io.atomic import atomic_write, check_writable, remove_stale_temps, write_csv
from .io.features_file import write_features_file
from .io.guard import audio_inputs, check_free_space, check_outputs, check_replaceable
from .progress import progress_bar

ERRORS_CSV = "extract_errors.csv"


@dataclass
class ExtractResult:
    """What an extract run did."""

    out: Path
    errors_csv: Path
    n_items: int
    computed: int
    cached: int
    seconds: float
    errors: list[tuple[str, str]] = field(default_factory=list)          # (path, reason)
    duplicate_groups: list[list[str]] = field(default_factory=list)     # paths, >= 2 each
    labels: dict[str, int] = field(default_factory=dict)                # clips per genre
    workers: dict[str, int] = field(default_factory=dict)   # Dask worker -> files it processed


def default_out(fmt: str = "pickle") -> Path:
    """Where extract writes by default: ``data/features.pkl``, or ``data/features.store``."""
    return DEFAULT_STORE if fmt == "store" else DEFAULT_FEATURES


def default_jobs() -> int:
    """All usable cores."""
    import joblib

    return max(1, joblib.cpu_count())


DEFAULT_TIMEOUT = 120.0


class _FileTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: Optional[float]):
    """Raise :class:`_FileTimeout` in this thread after ``seconds`` (POSIX main thread only)."""
    usable = (seconds and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise _FileTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_warmed_up = False


def _warm_up(config: FeatureConfig) -> None:
    """Run every import and JIT compilation that decoding and features need, once per process.

    ``--timeout`` raises wherever the clock runs out. Inside a first import (librosa loads
    scipy and numba lazily) that leaves a half-initialised module in ``sys.modules``, and every
    later file of the process then fails (``NameError: name '_ndimage_api' is not defined``).
    So this runs before the first file's clock starts: a clip of noise through resampling and
    all six features.
    """
    global _warmed_up
    if _warmed_up:
        return
    _warmed_up = True
    try:
        import librosa
        import numpy as np
        import soundfile  # noqa: F401
        from threadpoolctl import threadpool_limits

        from .features import compute_features

        y = 0.1 * np.random.default_rng(0).standard_normal(config.n_samples).astype(np.float32)
        with threadpool_limits(limits=1):
            librosa.resample(y[:4410], orig_sr=44100, target_sr=config.sample_rate,
                             res_type="soxr_hq")
            compute_features(y, config)
    except Exception:  # noqa: BLE001 - a real file will report whatever this hit
        pass


def compute_entry(path: str, key: str, cache_dir: str, config_dict: dict,
                  timeout: Optional[float] = DEFAULT_TIMEOUT) -> Optional[str]:
    """Decode one file, compute its features and store them in the cache (runs in a worker).

    Returns ``None`` on success or the reason the file could not be used. A file that takes
    longer than ``timeout`` seconds (a hostile header, say) is abandoned and reported.
    """
    from threadpoolctl import threadpool_limits

    from .audio import decode
    from .io.cache import audio_digest
    from .features import compute_features

    config = FeatureConfig.from_dict(config_dict)
    cache = FeatureCache(Path(cache_dir), config)
    if timeout:
        _warm_up(config)
    try:
        before = file_stamp(Path(path))
    except OSError as exc:
        return f"cannot read ({os.strerror(exc.errno or 0)})"
    try:
        # One BLAS thread whatever --jobs is: OpenBLAS sums in a different order with more
        # threads, and an entry must not depend on how many workers happened to compute it.
        with _time_limit(timeout), threadpool_limits(limits=1):
            audio = decode(Path(path), sr=config.sample_rate, duration=config.duration,
                           min_duration=config.min_duration)
            feats = compute_features(audio.y, config)
            try:   # the same bytes now, and no write in between (a swap A -> B -> A
                #        while decoding leaves the bytes equal but decoded B)
                unchanged = file_digest(Path(path)) == key and file_stamp(Path(path)) == before
            except OSError:
                unchanged = False
    except _FileTimeout:
        return f"gave up after {timeout:g} s (--timeout)"
    except AudioError as exc:
        return exc.reason
    except DeepFusionError as exc:
        return str(exc)
    except Exception as exc:  # a library failing on odd input must not end the batch
        return f"feature computation failed ({type(exc).__name__}: {exc})"
    if not unchanged:  # what was decoded is not what was hashed: never cache it under that key
        return ("changed while it was read (a copy or download still in progress?); "
                "run extract again when it is complete")
    meta = {"audio_sha": audio_digest(audio.y), "source_sr": audio.source_sr,
            "channels": audio.channels, "source_seconds": round(audio.source_seconds, 4)}
    cache.store(key, feats, meta)
    return None


def extract(audio_dir: Path, *, out: Optional[Path] = None, fmt: str = "pickle",
            cache_dir: Path = DEFAULT_CACHE_DIR, jobs: Optional[int] = None,
            config: FeatureConfig = FeatureConfig(), manifest: Optional[Path] = None,
            quiet: bool = False, timeout: Optional[float] = DEFAULT_TIMEOUT,
            scheduler: Optional[str] = None, dtype: str = "float32") -> ExtractResult:
    """Compute (or fetch from the cache) the features of every clip under ``audio_dir``.

    Parameters
    ----------
    audio_dir : Path
        Dataset root in GTZAN layout (``genre/genre.00042.wav``), or the root that the paths
        of ``manifest`` are relative to.
    out : Path, optional
        Features to write: a pickle (see :func:`deepfusion.io.features_file.write_features_file`) or a
        store folder; default :func:`default_out`. ``extract_errors.csv`` is written beside it.
    fmt : {'pickle', 'store'}
        ``store`` writes a feature store (:mod:`deepfusion.io.store`) that train memory-maps;
        clips are copied one at a time from the cache, so extract holds one clip in memory.
    cache_dir : Path
        Where per-clip features are kept between runs.
    jobs : int, optional
        Worker processes; default all cores.
    config : FeatureConfig
    manifest : Path, optional
        CSV ``path,label`` listing the files to use instead of scanning folders.
    quiet : bool
        No progress bar.
    timeout : float, optional
        Seconds one file may take before it is abandoned and reported (None: no limit).
    scheduler : str, optional
        Run the per-clip work on a Dask cluster instead of ``jobs`` local processes: a
        scheduler address (``tcp://host:8786``) or ``local:N`` (see :mod:`deepfusion.cluster`).
        ``cache_dir`` must then be a folder every worker shares.
    dtype : {'float32', 'float16'}
        How a store holds the views (``float16``: half the disk and page cache); a pickle is
        always float32.

    Returns
    -------
    ExtractResult
        Unreadable files are listed in ``errors``; they do not stop the run.

    Raises
    ------
    DatasetError
        ``audio_dir`` missing or holding no audio files.
    OutputError
        ``out`` cannot be written (checked before any work).
    ClusterError
        ``scheduler`` unreachable, ``distributed`` missing, or a worker cannot use ``cache_dir``.
    """
    t0 = time.perf_counter()
    if fmt not in FEATURE_FORMATS:
        raise ParameterError(f"format must be one of {', '.join(FEATURE_FORMATS)}, got {fmt!r}")
    if dtype not in ("float32", "float16") or (dtype != "float32" and fmt != "store"):
        raise ParameterError(f"--dtype {dtype}: a store holds float32 or float16, a pickle "
                             "float32 (give --format store)")
    out, cache_dir = Path(out if out is not None else default_out(fmt)), Path(cache_dir)
    items = discover(Path(audio_dir), manifest=manifest)
    if out.name == ERRORS_CSV:
        raise ParameterError(f"{out}: that name is reserved for the error report; choose another --out")
    if fmt == "pickle" and out.is_dir():
        raise OutputError(f"{out}: is a folder (a feature store?); give --format store, or a file for --out")
    outputs = {out: "--out", out.with_name(ERRORS_CSV): "the error report"}
    check_outputs(outputs, {**audio_inputs(it.path for it in items),
                            **({Path(manifest): "the --manifest"} if manifest else {})})
    if fmt == "pickle":
        check_replaceable(out, name="--out", kind="a features pickle", magic=(b"\x80",))
    check_replaceable(out.with_name(ERRORS_CSV), name=ERRORS_CSV, kind="an extract error report",
                      magic=(b"path,reason",))
    if fmt == "store":
        from .io.store import check_destination

        check_destination(out)
    check_writable(out / "meta.json" if fmt == "store" and out.is_dir() else out)
    clip_bytes = 4 * sum(r * t for r, t in config.feature_shapes().values())
    # the new file is written beside the old one, which goes only when it is complete
    check_free_space(out.parent, len(items) * clip_bytes + 2**20,
                     f"the features of {len(items):,} clips")
    remove_stale_temps(out.parent)
    cache = FeatureCache(cache_dir, config)
    cache.prepare()

    fingerprint = _fingerprint(config, items, fmt, dtype)
    done = _up_to_date(out, fingerprint)
    if done is not None:  # same files (by their stat), same config, output untouched
        return ExtractResult(out=out, errors_csv=out.with_name(ERRORS_CSV), n_items=done["n_items"],
                             computed=0, cached=done["n_items"], seconds=time.perf_counter() - t0,
                             errors=[tuple(e) for e in done["errors"]],
                             duplicate_groups=done["duplicate_groups"], labels=done["labels"])

    errors: dict[str, str] = {}
    todo: list[AudioItem] = []
    for item in items:
        try:
            check_file(item.path)           # a stat: no byte is read on the driver
        except AudioError as exc:
            errors[item.relpath] = exc.reason
            continue
        except OSError as exc:
            errors[item.relpath] = f"cannot read ({os.strerror(exc.errno or 0)})"
            continue
        todo.append(item)

    # Workers hash each file, and decode and analyse it unless its content is cached: the
    # driver never reads the audio (a cluster's driver may sit far from the files). A store
    # is preallocated and filled as results arrive, not copied after the fact.
    config_dict = config.to_dict()
    computed = 0
    workers: dict[str, int] = {}
    found: dict[int, tuple[str, Any]] = {}       # todo index -> (key, cache entry metadata)
    tasks = [(str(item.path), str(cache_dir), config_dict, timeout) for item in todo]
    with contextlib.ExitStack() as stack:
        writer = None
        if fmt == "store" and todo:
            from .io.store import StoreWriter

            shapes = config.feature_shapes()
            writer = stack.enter_context(StoreWriter(
                out, n_clips=len(todo), rows={k: r for k, (r, _) in shapes.items()},
                frames=config.n_frames, dtype=dtype))
        bar = stack.enter_context(progress_bar(len(tasks), desc="extract", unit="clip", quiet=quiet))
        for index, (key, reason, fresh) in _run_tasks(tasks, jobs, scheduler, cache_dir, workers):
            bar.update(1)
            entry = None
            if reason is None:
                entry = cache.load(key)
                if entry is None:  # vanished or damaged since it was written: again, here
                    reason = compute_entry(str(todo[index].path), key, str(cache_dir),
                                           config_dict, timeout)
                    entry = None if reason else cache.load(key)
                    fresh = True
            if entry is None:
                errors[todo[index].relpath] = reason or "cache entry could not be read back"
                continue
            computed += fresh
            found[index] = (key, entry.meta, entry.features if fmt == "pickle" else None)
            if writer is not None:
                writer.put_at(index, entry.features)

        assembled: list[dict[str, Any]] = []
        by_audio: dict[str, list[str]] = {}
        group_ids: dict[str, int] = {}
        for index in sorted(found):
            item, (key, meta, features) = todo[index], found[index]
            sha = meta["audio_sha"]
            by_audio.setdefault(sha, []).append(item.relpath)
            assembled.append({
                "features": features, "label": item.label, "path": item.relpath,
                "duplicate_group": group_ids.setdefault(sha, len(group_ids)),
                "group": item.group, "audio_sha": sha, "file_sha": key,
                "source_sr": meta["source_sr"], "channels": meta["channels"],
                "source_seconds": meta["source_seconds"], "feature_config": config_dict,
            })
        if writer is not None and assembled:
            writer.keep_only(sorted(found))
            writer.commit(assembled, feature_config=config_dict, source=str(out))
        elif assembled:
            write_features_file(out, assembled)

    errors_csv = out.with_name(ERRORS_CSV)
    write_csv(errors_csv, ["path", "reason"], sorted(errors.items()))
    labels: dict[str, int] = {}
    for it in assembled:
        labels[it["label"]] = labels.get(it["label"], 0) + 1
    result = ExtractResult(
        out=out, errors_csv=errors_csv, n_items=len(assembled),
        computed=computed, cached=len(assembled) - computed,
        seconds=time.perf_counter() - t0,
        errors=sorted(errors.items()),
        duplicate_groups=[paths for paths in by_audio.values() if len(paths) > 1],
        labels=dict(sorted(labels.items())),
        workers=dict(sorted(workers.items())),
    )
    if assembled and not any(reason for reason in errors.values() if _transient(reason)):
        _record_state(out, fingerprint, result)
    return result


def _stamp(out: Path) -> list:
    """Size and mtime of every file extract wrote to ``out`` (a store: meta.json and the
    arrays it names), to tell whether the output was touched since."""
    from .io.store import META, is_store, read_meta

    if not is_store(out):
        files = [out]
    else:
        try:
            version = read_meta(out)["data"]
        except DeepFusionError:
            raise FileNotFoundError(out) from None
        files = [out / META, *sorted((out / version).iterdir())]
    return [[f.name, st.st_size, st.st_mtime_ns] for f in files for st in [f.stat()]]


def _state_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.extract.json")


def _fingerprint(config: FeatureConfig, items: list[AudioItem], fmt: str, dtype: str) -> str:
    """Identity of an extract run's inputs without reading them: format, config, and every
    file's path, label, group and stat (size, modification and change times, inode; the
    change time moves on any write and cannot be set back by users)."""
    def stat(path: Path):
        try:
            return [*file_stamp(path), os.stat(path).st_mode]
        except OSError as exc:
            return exc.errno
    payload = json.dumps([fmt, dtype, config.fingerprint(),
                          [(it.relpath, it.label, it.group, stat(it.path)) for it in items]])
    return hashlib.sha256(payload.encode()).hexdigest()


def _up_to_date(out: Path, fingerprint: str) -> Optional[dict]:
    """The recorded summary if ``out`` was written from exactly these inputs and not touched."""
    try:
        with open(_state_path(out)) as fh:
            state = json.load(fh)
        stamp = _stamp(out)
    except (OSError, ValueError):
        return None
    if (state.get("fingerprint") == fingerprint and state.get("stamp") == stamp
            and _state_path(out).with_name(ERRORS_CSV).exists()):
        return state["summary"]
    return None


def _record_state(out: Path, fingerprint: str, result: ExtractResult) -> None:
    summary = {"n_items": result.n_items, "errors": result.errors,
               "duplicate_groups": result.duplicate_groups, "labels": result.labels}
    with atomic_write(_state_path(out), "w") as fh:
        json.dump({"fingerprint": fingerprint, "stamp": _stamp(out), "summary": summary}, fh)


def hash_and_compute(path: str, cache_dir: str, config_dict: dict,
                     timeout: Optional[float]) -> tuple[Optional[str], Optional[str], bool]:
    """One file's task (in a worker): ``(content key, None, computed)`` or ``(None, reason,
    False)``. The file is hashed, and decoded and analysed only when the cache lacks its
    content; ``timeout`` bounds the hashing as it bounds the decoding."""
    try:
        with _time_limit(timeout):   # a huge or stalled file (a network mount) is a file
            key = file_digest(Path(path))   # that takes too long, like a slow decode
    except _FileTimeout:
        return None, f"gave up reading it after {timeout:g} s (--timeout)", False
    except OSError as exc:
        return None, f"cannot read ({os.strerror(exc.errno or 0)})", False
    if FeatureCache(Path(cache_dir), FeatureConfig.from_dict(config_dict)).has(key):
        return key, None, False
    reason = compute_entry(path, key, cache_dir, config_dict, timeout)
    return (None, reason, False) if reason else (key, None, True)


def _run_tasks(tasks: list[tuple], jobs: Optional[int], scheduler: Optional[str],
               cache_dir: Path, workers: dict[str, int]) -> Iterator[tuple[int, tuple]]:
    """``(index, hash_and_compute(*tasks[index]))`` as tasks finish, on joblib workers or on
    a Dask cluster (``scheduler``, see :mod:`deepfusion.cluster`; ``workers`` counts the
    tasks each Dask worker ran)."""
    if not tasks:
        return
    indexed = [(i, *task) for i, task in enumerate(tasks)]
    if scheduler:
        from .cluster import check_shared, connect, map_unordered

        with connect(scheduler) as client:
            check_shared(client, cache_dir)
            yield from map_unordered(client, _indexed, indexed, per_worker=workers)
        return
    from joblib import Parallel, delayed

    jobs = default_jobs() if jobs is None else max(1, int(jobs))
    runner = Parallel(n_jobs=min(jobs, len(tasks)), return_as="generator_unordered",
                      batch_size=1, pre_dispatch="2*n_jobs")
    yield from runner(delayed(_indexed)(*task) for task in indexed)


def _indexed(index: int, *task) -> tuple[int, tuple]:
    return index, hash_and_compute(*task)


def _transient(reason: str) -> bool:
    """A failure that may not recur (a time-out, a file still being written)."""
    return "--timeout" in reason or "changed while it was read" in reason
