"""The extract stage: a folder of labelled audio to a features file, through the cache.

Work is split so that nothing computed is ever lost: worker processes decode a clip, compute its
features and write its cache entry atomically; only then does the main process assemble the
features file (a pickle, or a memory-mappable store folder) from the cache, in sorted path
order, and replace the output atomically (the per-file work is in :mod:`deepfusion.jobs.job`).
With the torch backend (``--backend torch`` on any device, or a GPU found by ``--device
auto``) the workers only hash and decode; the main process analyses the decoded clips in
batches on the device and writes their cache entries itself, while the workers decode the
next ones (:mod:`deepfusion.jobs.batcher`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from deepfusion.audio import AudioItem, check_file, discover_collection
from deepfusion.config import (DEFAULT_CACHE_DIR, DEFAULT_FEATURES, DEFAULT_STORE, FEATURE_FORMATS,
                               FeatureConfig)
from deepfusion.errors import AudioError, DeepFusionError, OutputError, ParameterError
from deepfusion.io.atomic import (CACHE_ENTRY_LOST, atomic_write, check_writable, read_error_reason,
                                  remove_stale_temps, write_csv)
from deepfusion.io.cache import FeatureCache, file_stamp
from deepfusion.io.features_file import write_features_file
from deepfusion.io.guard import (Destination, audio_inputs, check_destinations, check_free_space,
                                 check_outputs)
from deepfusion.jobs.batcher import DeviceTime, compute_again, feature_tasks
from deepfusion.jobs.job import resolve_backend
from deepfusion.jobs.limits import DEFAULT_TIMEOUT, is_transient
from deepfusion.progress import progress_bar

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
    repaired: int = 0          # damaged cache entries computed again (counted in ``computed``)
    #: the metadata table the clips came from, in one line (None: genres from folder names)
    metadata: Optional[str] = None
    #: the torch backend: the share (0..1) of the feature phase's wall time this process spent
    #: computing batches (on a GPU, to the end of the device's work); None: numpy, or nothing
    #: to do (the output was up to date)
    device_busy: Optional[float] = None


def default_out(fmt: str = "pickle") -> Path:
    """Where extract writes by default: ``data/features.pkl``, or ``data/features.store``."""
    return DEFAULT_STORE if fmt == "store" else DEFAULT_FEATURES


def extract(audio_dir: Path, *, out: Optional[Path] = None, fmt: str = "pickle",
            cache_dir: Path = DEFAULT_CACHE_DIR, jobs: Optional[int] = None,
            config: FeatureConfig = FeatureConfig(), manifest: Optional[Path] = None,
            quiet: bool = False, timeout: Optional[float] = DEFAULT_TIMEOUT,
            scheduler: Optional[str] = None, dtype: str = "float32",
            backend: Optional[str] = None, device: str = "auto",
            overwrite: bool = False, metadata: bool = True) -> ExtractResult:
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
        Worker processes; default all cores. With the torch backend they only decode (1:
        decoding in this process), and this process computes with torch's threads.
    config : FeatureConfig
    manifest : Path, optional
        A metadata table listing the files to use instead of scanning folders: deepfusion's
        CSV (``path`` and ``label`` or ``genre``; optional ``artist``, ``album``,
        ``track_id`` or ``group`` columns), MTG-Jamendo's TSV or FMA's ``tracks.csv``
        (:mod:`deepfusion.io.metadata`). Without one, a table at the root of ``audio_dir`` is
        used (``metadata=False``: never); each clip's group is the coarsest the table has, and
        train keeps a group on one side of its split.
    quiet : bool
        No progress bar.
    timeout : float, optional
        Seconds one file may take before it is abandoned and reported (None: no limit).
    scheduler : str, optional
        Run the per-clip work on a Dask cluster instead of ``jobs`` local processes: a
        scheduler address (``tcp://host:8786``) or ``local:N`` (see :mod:`deepfusion.runtime.cluster`).
        ``cache_dir`` must then be a folder every worker shares.
    dtype : {'float32', 'float16'}
        How a store holds the views (``float16``: half the disk and page cache); a pickle is
        always float32.
    backend : {None, 'numpy', 'torch'}
        The feature code: :func:`deepfusion.features.numpy_views.compute_features` in the
        worker processes (numpy), or :func:`deepfusion.features.torch_views.compute_features_torch`
        (torch): in this process, on ``device``, on batches of the clips the workers decode
        (:mod:`deepfusion.jobs.batcher`). ``None``: torch when ``device`` finds or names a GPU,
        else numpy. Both write the same cache entries (they agree to float32 rounding, see
        docs/cli.md), so either reuses the other's.
    device : {'auto', 'cpu', 'cuda', 'cuda:N', 'mps'}
        Where the torch backend runs; ``auto``: cuda, else mps, else the CPU.

    Returns
    -------
    ExtractResult
        Unreadable files are listed in ``errors``; they do not stop the run.

    Raises
    ------
    DatasetError
        ``audio_dir`` missing or holding no audio files.
    OutputError
        ``out`` cannot be written, is an input, or is an existing file of another kind than
        a features pickle (unless ``overwrite``); checked before any work
        (:func:`~deepfusion.io.guard.check_destinations`).
    ClusterError
        ``scheduler`` unreachable, ``distributed`` missing, or a worker cannot use ``cache_dir``.
    ParameterError
        An unknown backend, or a device this machine does not have (``DeviceError``).
    """
    t0 = time.perf_counter()
    backend, device = resolve_backend(backend, device)
    if scheduler:
        from deepfusion.runtime.cluster import parse_scheduler

        parse_scheduler(scheduler)   # not an address: one line, even when nothing is to do
    if fmt not in FEATURE_FORMATS:
        raise ParameterError(f"format must be one of {', '.join(FEATURE_FORMATS)}, got {fmt!r}")
    if dtype not in ("float32", "float16") or (dtype != "float32" and fmt != "store"):
        raise ParameterError(f"--dtype {dtype}: " + ("needs --format store (a pickle holds "
                             "float32 only)" if dtype == "float16" else "give float32 or float16"))
    out, cache_dir = Path(out if out is not None else default_out(fmt)), Path(cache_dir)
    items, table = discover_collection(Path(audio_dir), manifest=manifest, metadata=metadata)
    group_by = table.group_by if table is not None else None
    if out.name == ERRORS_CSV:
        raise ParameterError(f"{out}: that name is reserved for the error report; give another --out")
    if fmt == "pickle" and out.is_dir():
        raise OutputError(f"{out}: a folder (a feature store?); give --format store, or a file "
                          "for --out")
    inputs = {**audio_inputs(it.path for it in items),
              **({Path(manifest): "the --manifest"} if manifest else {})}
    report = Destination(out.with_name(ERRORS_CSV), "the error report", "extract_errors")
    if fmt == "pickle":
        check_destinations([Destination(out, "--out", "features"), report], inputs,
                           overwrite=overwrite)
    else:       # a store is a folder: never one that holds anything else (store.py)
        check_outputs({out: "--out"}, inputs)
        check_destinations([report], inputs, overwrite=overwrite)
    if fmt == "store":
        from deepfusion.io.store_writer import check_destination

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
                             duplicate_groups=done["duplicate_groups"], labels=done["labels"],
                             metadata=table.describe() if table is not None else None)

    errors: dict[str, str] = {}
    todo: list[AudioItem] = []
    for item in items:
        try:
            check_file(item.path)           # a stat: no byte is read on the driver
        except AudioError as exc:
            errors[item.relpath] = exc.reason
            continue
        except OSError as exc:
            errors[item.relpath] = read_error_reason(exc)
            continue
        todo.append(item)

    # Workers hash each file, and decode and analyse it unless its content is cached: the
    # driver never reads the audio (a cluster's driver may sit far from the files). A store
    # is preallocated and filled as results arrive, not copied after the fact.
    config_dict = config.to_dict()
    computed = repaired = 0
    entries: dict[int, str] = {}                 # todo index -> its cache entry's key
    workers: dict[str, int] = {}
    found: dict[int, tuple[str, Any]] = {}       # todo index -> (key, cache entry metadata)
    tasks = [(str(item.path), str(cache_dir), config_dict, timeout) for item in todo]
    with contextlib.ExitStack() as stack:
        writer = None
        if fmt == "store" and todo:
            from deepfusion.io.store_writer import StoreWriter

            shapes = config.feature_shapes()
            writer = stack.enter_context(StoreWriter(
                out, n_clips=len(todo), rows={k: r for k, (r, _) in shapes.items()},
                frames=config.n_frames, patches=config.n_patches if config.pretrained_view else None,
                dtype=dtype))
        bar = stack.enter_context(progress_bar(len(tasks), desc="extract", unit="clip", quiet=quiet))
        clock = DeviceTime() if device is not None else None
        started = time.perf_counter()
        results = feature_tasks(tasks, jobs, scheduler, cache_dir, workers, cache=cache,
                                config=config, device=device, clock=clock)
        for index, (key, reason, fresh, mended) in results:
            bar.update(1)
            entry = None
            if reason is None:
                entry = cache.load(key)
                if entry is None:  # vanished or damaged since it was written: again, here
                    mended = mended or cache.has(key)
                    reason = compute_again(str(todo[index].path), key, cache_dir, timeout,
                                           cache=cache, config=config, device=device, clock=clock)
                    entry = None if reason else cache.load(key)
                    fresh = True
            if entry is None:
                errors[todo[index].relpath] = reason or CACHE_ENTRY_LOST
                continue
            computed += fresh
            repaired += bool(fresh and mended)
            entries[index] = key
            found[index] = (key, entry.meta, entry.features if fmt == "pickle" else None)
            if writer is not None:
                writer.put_at(index, entry.features)
        phase = time.perf_counter() - started

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
                "group": item.group, "group_by": group_by if item.group is not None else None,
                "audio_sha": sha, "file_sha": key,
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
        metadata=table.describe() if table is not None else None,
        workers=dict(sorted(workers.items())), repaired=repaired,
        device_busy=min(1.0, clock.seconds / phase) if clock is not None and phase > 0 else None,
    )
    if assembled and not any(reason for reason in errors.values() if is_transient(reason)):
        _record_state(out, fingerprint, result, [cache.path(entries[i]) for i in sorted(found)])
    return result


def _stamp(out: Path) -> list:
    """Size and mtime of every file extract wrote to ``out`` (a store: meta.json and the
    arrays it names), to tell whether the output was touched since."""
    from deepfusion.io.store import META, is_store, read_meta

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
    """The recorded summary if ``out`` was written from exactly these inputs and not touched,
    and no cache entry it came from was changed since (a truncated copy, a write by another
    program: the full run reads them, and recomputes what is damaged). An entry removed
    since (a cache cleaned to save space) is no reason to run: ``out`` holds its views."""
    try:
        with open(_state_path(out)) as fh:
            state = json.load(fh)
        stamp = _stamp(out)
    except (OSError, ValueError):
        return None
    if not (state.get("fingerprint") == fingerprint and state.get("stamp") == stamp
            and _state_path(out).with_name(ERRORS_CSV).exists()):
        return None
    entries = state.get("entries")
    if not isinstance(entries, list):
        return None
    for item in entries:
        try:
            path, size, mtime = item
            st = os.stat(path)
        except FileNotFoundError:
            continue
        except (OSError, TypeError, ValueError):
            return None
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            return None
    return state["summary"]


def _record_state(out: Path, fingerprint: str, result: ExtractResult,
                  entries: list[Path]) -> None:
    summary = {"n_items": result.n_items, "errors": result.errors,
               "duplicate_groups": result.duplicate_groups, "labels": result.labels}
    stamps = []
    for path in entries:
        try:
            st = os.stat(path)
        except OSError:         # removed meanwhile: nothing to compare with later
            continue
        stamps.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    with atomic_write(_state_path(out), "w") as fh:
        json.dump({"fingerprint": fingerprint, "stamp": _stamp(out), "summary": summary,
                   "entries": stamps}, fh)
