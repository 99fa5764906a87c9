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
from typing import Any, Optional

from .audio import AudioItem, check_file, discover
from .io.cache import FeatureCache, file_digest
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
        # One BLAS thread whatever --jobs is: OpenBLAS sums in a different order with more
        # threads, and an entry must not depend on how many workers happened to compute it.
        with _time_limit(timeout), threadpool_limits(limits=1):
            audio = decode(Path(path), sr=config.sample_rate, duration=config.duration,
                           min_duration=config.min_duration)
            feats = compute_features(audio.y, config)
            try:
                unchanged = file_digest(Path(path)) == key
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
            quiet: bool = False, timeout: Optional[float] = DEFAULT_TIMEOUT) -> ExtractResult:
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
    """
    from joblib import Parallel, delayed

    t0 = time.perf_counter()
    if fmt not in FEATURE_FORMATS:
        raise ParameterError(f"format must be one of {', '.join(FEATURE_FORMATS)}, got {fmt!r}")
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

    errors: dict[str, str] = {}
    keys: dict[str, str] = {}               # relpath -> content key
    todo: dict[str, AudioItem] = {}         # key -> first item with that content
    for item in items:
        try:
            check_file(item.path)
            with _time_limit(timeout):   # a huge or stalled file (a network mount) is a file
                key = file_digest(item.path)   # that takes too long, like a slow decode
        except _FileTimeout:
            errors[item.relpath] = f"gave up reading it after {timeout:g} s (--timeout)"
            continue
        except AudioError as exc:
            errors[item.relpath] = exc.reason
            continue
        except OSError as exc:
            errors[item.relpath] = f"cannot read ({os.strerror(exc.errno or 0)})"
            continue
        keys[item.relpath] = key
        if key not in todo and not cache.has(key):
            todo[key] = item

    fingerprint = _fingerprint(config, items, keys, errors, fmt)
    if not todo:
        done = _up_to_date(out, fingerprint)
        if done is not None:  # same inputs, same config, output untouched: nothing to do
            return ExtractResult(out=out, errors_csv=out.with_name(ERRORS_CSV), n_items=done["n_items"],
                                 computed=0, cached=done["n_items"],
                                 seconds=time.perf_counter() - t0,
                                 errors=[tuple(e) for e in done["errors"]],
                                 duplicate_groups=done["duplicate_groups"], labels=done["labels"])

    jobs = default_jobs() if jobs is None else max(1, int(jobs))
    failed_keys: dict[str, str] = {}
    recomputed = 0                          # entries found damaged and computed again below
    config_dict = config.to_dict()
    if todo:
        tasks = list(todo.items())
        with progress_bar(len(tasks), desc="extract", unit="clip", quiet=quiet) as bar:
            runner = Parallel(n_jobs=min(jobs, len(tasks)), return_as="generator_unordered",
                              batch_size=1, pre_dispatch="2*n_jobs")
            results = runner(delayed(_compute_keyed)(key, str(item.path), str(cache_dir),
                                                     config_dict, timeout) for key, item in tasks)
            for key, reason in results:
                if reason is not None:
                    failed_keys[key] = reason
                bar.update(1)

    assembled: list[dict[str, Any]] = []
    shapes: Optional[dict[str, tuple]] = None
    by_audio: dict[str, list[str]] = {}
    group_ids: dict[str, int] = {}
    for item in items:
        key = keys.get(item.relpath)
        if key is None:
            continue
        if key in failed_keys:
            errors[item.relpath] = failed_keys[key]
            continue
        entry = cache.load(key)
        if entry is None:  # vanished or damaged since it was written: recompute in-process
            reason = compute_entry(str(item.path), key, str(cache_dir), config_dict, timeout)
            entry = None if reason else cache.load(key)
            if entry is None:
                errors[item.relpath] = reason or "cache entry could not be read back"
                continue
            recomputed += 1
        sha = entry.meta["audio_sha"]
        group = group_ids.setdefault(sha, len(group_ids))
        by_audio.setdefault(sha, []).append(item.relpath)
        if shapes is None:
            shapes = {k: v.shape for k, v in entry.features.items()}
        assembled.append({
            "features": entry.features if fmt == "pickle" else None,  # a store re-reads them
            "label": item.label,
            "path": item.relpath,
            "duplicate_group": group,
            "group": item.group,
            "audio_sha": sha,
            "file_sha": key,
            "source_sr": entry.meta["source_sr"],
            "channels": entry.meta["channels"],
            "source_seconds": entry.meta["source_seconds"],
            "feature_config": config_dict,
        })

    errors_csv = out.with_name(ERRORS_CSV)
    if assembled and fmt == "store":
        _write_store(out, assembled, cache, shapes, config_dict)
    elif assembled:
        write_features_file(out, assembled)
    write_csv(errors_csv, ["path", "reason"], sorted(errors.items()))
    labels: dict[str, int] = {}
    for it in assembled:
        labels[it["label"]] = labels.get(it["label"], 0) + 1
    computed = len(todo) - len(failed_keys) + recomputed
    result = ExtractResult(
        out=out, errors_csv=errors_csv, n_items=len(assembled),
        computed=computed, cached=len(assembled) - computed,
        seconds=time.perf_counter() - t0,
        errors=sorted(errors.items()),
        duplicate_groups=[paths for paths in by_audio.values() if len(paths) > 1],
        labels=dict(sorted(labels.items())),
    )
    if assembled and not failed_keys:
        _record_state(out, fingerprint, result)
    return result


def _write_store(out: Path, assembled: list[dict[str, Any]], cache: FeatureCache,
                 shapes: dict[str, tuple], config_dict: dict) -> None:
    """Copy the clips' cache entries into a feature store, one clip in memory at a time."""
    from .io.store import StoreWriter

    rows = {k: int(shape[0]) for k, shape in shapes.items()}
    with StoreWriter(out, n_clips=len(assembled), rows=rows, frames=int(shapes["mel_spec_orig"][1])) as writer:
        for it in assembled:
            entry = cache.load(it["file_sha"])
            if entry is None:
                raise OutputError(f"{cache.path(it['file_sha'])}: cache entry of {it['path']} vanished "
                                  "while the store was written (another process cleaning the cache?); "
                                  "run extract again")
            writer.put(entry.features)
        writer.commit(assembled, feature_config=config_dict, source=str(out))


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


def _fingerprint(config: FeatureConfig, items: list[AudioItem], keys: dict[str, str],
                 errors: dict[str, str], fmt: str) -> str:
    """Identity of an extract run: format, config, every (path, label, content) and errors."""
    payload = json.dumps([fmt, config.fingerprint(),
                          [(it.relpath, it.label, it.group, keys.get(it.relpath)) for it in items],
                          sorted(errors.items())])
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


def _compute_keyed(key: str, path: str, cache_dir: str, config_dict: dict, timeout):
    return key, compute_entry(path, key, cache_dir, config_dict, timeout)
