"""Models x files -> outputs, through the caches: the core of predict and embed.

Features come from the cache ``extract`` fills (:mod:`deepfusion.jobs.windows`): a file already
extracted or classified is not decoded again, and a killed run continues from what its
workers stored. Files are analysed in parallel worker processes, in the order given, with a
bounded number in flight, and classified in this process a few windows at a time
(:data:`BATCH_WINDOWS`, across files), so memory does not grow with the number of files or
their length. A model's outputs per file are kept in the cache too
(:class:`~deepfusion.io.cache.OutputsCache`): a second run over the same library runs no
network.

A file longer than the training clip is covered by consecutive clip-length windows (the last
one aligned to the end of the file, see :func:`deepfusion.audio.decode_windows`), each cut
into the same non-overlapping segments as evaluation; a file's logits are the mean over its
windows. Several checkpoints form an ensemble: their probabilities are averaged.

The engine is torch (a ``best.pth``) or onnxruntime (a model from ``deepfusion export``,
:mod:`deepfusion.inference.onnx_engine`); this module imports neither until asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from deepfusion.audio import AUDIO_EXTENSIONS, expand_inputs
from deepfusion.config import DEFAULT_CACHE_DIR
from deepfusion.errors import ParameterError
from deepfusion.io.atomic import CACHE_ENTRY_LOST
from deepfusion.io.cache import FeatureCache
from deepfusion.io.model_ids import ModelIds
from deepfusion.jobs.windows import load_window, run_file_tasks
from deepfusion.metrics import softmax
from deepfusion.views import FEATURE_KEYS

ENGINES = ("torch", "onnx")


@dataclass
class Prediction:
    """What the model says of one file."""

    path: str
    top: list[tuple[str, float]]       # (genre, probability), most probable first
    windows: int                       # clip-length windows analysed
    segments: int                      # segments per model whose outputs were averaged
    seconds: float                     # length of the file
    probabilities: dict[str, float] = field(default_factory=dict)   # every genre
    attention: Optional[np.ndarray] = None    # (views,) mean modality attention (first model)
    embedding: Optional[np.ndarray] = None    # (d,) mean classifier input (first model)
    computed: int = 0                  # windows whose features were computed (not cached)

    def to_dict(self) -> dict:
        return {"path": self.path, "top": [{"genre": g, "probability": round(p, 6)} for g, p in self.top],
                "windows": self.windows, "segments": self.segments, "seconds": round(self.seconds, 3)}


def load_engine(path: Path, *, engine: str = "torch", device: str = "auto",
                precision: str = "fp32", ids: Optional[ModelIds] = None):
    """A :class:`~deepfusion.inference.torch_engine.TorchEngine` for a checkpoint, or an
    :class:`~deepfusion.inference.onnx_engine.OnnxEngine` for an exported model (``engine='onnx'``,
    which never imports torch). ``ids``: model digests known so far (see the engines)."""
    if engine == "onnx":
        from deepfusion.inference.onnx_engine import OnnxEngine

        return OnnxEngine(Path(path), ids=ids)
    if engine != "torch":
        raise ParameterError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    from deepfusion.models.meta import check_checkpoint_path

    check_checkpoint_path(path)      # a mistyped path costs no torch import
    from deepfusion.inference.torch_engine import TorchEngine

    return TorchEngine(Path(path), device=device, precision=precision, ids=ids)


def check_ensemble(engines: Sequence[Any], paths: Sequence[Path]) -> None:
    """Refuse models that cannot be averaged: other features or other genres.

    Raises
    ------
    ParameterError
        Naming the first model that disagrees with the first one, and how.
    """
    first = engines[0]
    for engine, path in zip(engines[1:], paths[1:]):
        if engine.feature_config != first.feature_config:
            from deepfusion.config import flag_of

            diff = [f"{flag_of(k)} {'none' if b is None else b} here, {'none' if a is None else a} "
                    "there" for k, (a, b) in
                    first.feature_config.differences(engine.feature_config).items()]
            raise ParameterError(f"{path}: its features differ from {paths[0]}'s ("
                                 + ", ".join(diff[:3]) + "); an ensemble needs models trained on "
                                 "features of the same settings")
        if sorted(engine.class_names) != sorted(first.class_names):
            raise ParameterError(f"{path}: its genres ({', '.join(engine.class_names)}) differ from "
                                 f"{paths[0]}'s ({', '.join(first.class_names)}); an ensemble "
                                 "needs the same genres")


class Library:
    """Models loaded and checked, inputs listed and outputs checked: everything that can be
    refused is refused before any file is analysed. :meth:`run` then classifies the files.

    Parameters
    ----------
    inputs : files and folders (every audio file below a folder, sorted)
    checkpoints : one model, or several averaged as an ensemble (same features and genres)
    engine : 'torch' (checkpoints are ``.pth`` files) or 'onnx' (exported ``.onnx`` models)
    device : where the torch engine runs (auto, cpu, cuda[:N], mps)
    cache_dir : the feature cache extract uses (same default, same keys)
    precision : the torch engine's: fp32 (default: the same answer on every machine) or amp
    destinations : the files the caller will write
        (:class:`~deepfusion.io.guard.Destination`): refused when one would replace an input
        (an audio file, a model), is an existing file of another kind (unless ``overwrite``)
        or cannot be written
    adapt : normalise by the statistics of the files classified together
        (:mod:`deepfusion.inference.adapt`): ``none``, ``inputs``, ``full``, or ``auto`` (``full`` for
        at least ``ADAPT_MIN_CLIPS`` files, else ``none``); the torch engine only (the onnx
        engine's normalisation is inside its graph: ``auto`` is ``none`` there)

    Raises
    ------
    ParameterError
        The models cannot form an ensemble.
    CheckpointError, OutputError
        A model cannot be loaded; an output or the cache folder cannot be written.
    """

    def __init__(self, inputs: Iterable[Union[str, Path]], *, checkpoints: Sequence[Path],
                 engine: str = "torch", device: str = "auto",
                 cache_dir: Path = DEFAULT_CACHE_DIR, destinations: Sequence[Any] = (),
                 overwrite: bool = False, precision: str = "fp32", adapt: str = "auto"):
        from deepfusion.inference.adapt import resolve_mode
        from deepfusion.io.atomic import check_writable
        from deepfusion.io.guard import audio_inputs, check_destinations

        resolve_mode(adapt, n_clips=0, new_collection=True)     # an unknown mode: now
        if engine == "onnx" and precision != "fp32":
            raise ParameterError(f"--precision {precision}: the onnx engine computes in float32 "
                                 "only; leave --precision out, or use --engine torch")
        if engine == "onnx" and device not in ("auto", "cpu"):
            raise ParameterError(f"--device {device}: the onnx engine runs on onnxruntime's own "
                                 "providers; leave --device out, or use --engine torch")
        if engine == "onnx" and adapt in ("inputs", "full"):
            raise ParameterError(f"--adapt {adapt}: the onnx engine's normalisation is inside "
                                 "its graph; adapt with the torch engine (a .pth checkpoint)")
        self.adapt = "none" if engine == "onnx" else adapt
        inputs = [Path(p) for p in inputs]
        self.files = expand_inputs(inputs)
        # folders typed that hold no audio file; a folder found under one (a folder named
        # x.wav) is an input like a file, and says "is a folder, not an audio file"
        self._typed = set(inputs)
        paths = [Path(p) for p in checkpoints]
        if not paths:
            raise ParameterError("give at least one --checkpoint")
        if destinations:
            models = {p: f"the model {p}" for p in paths}
            check_destinations(destinations, {**audio_inputs(p for p in self.files if not p.is_dir()),
                                              **models}, overwrite=overwrite)
            for dest in destinations:
                check_writable(dest.path)
        if engine == "torch":
            from deepfusion.models.meta import check_checkpoint_path

            for path in paths:      # every one before torch is imported for the first
                check_checkpoint_path(path)
        ids = ModelIds(cache_dir)
        self.engines = [load_engine(p, engine=engine, device=device, precision=precision, ids=ids)
                        for p in paths]
        check_ensemble(self.engines, paths)
        first = self.engines[0]
        self.class_names = list(first.class_names)
        # each model's class order mapped onto the first's
        self._orders = [np.array([e.class_names.index(g) for g in self.class_names])
                        for e in self.engines]
        self.cache_dir = Path(cache_dir)
        self.cache = FeatureCache(self.cache_dir, first.feature_config)
        self.cache.prepare()
        ids.save()      # the models hashed now are not hashed again
        #: damaged cache entries (features of a window, a model's outputs) this run replaced
        self.repaired = 0

    def run(self, *, jobs: Optional[int] = None, timeout: Optional[float] = 120.0,
            quiet: bool = True) -> Iterator[Union[Prediction, tuple[str, str]]]:
        """Yield, in input order, a :class:`Prediction` per readable file (all genres,
        attention and embedding filled) or ``(path, reason)`` for the others.

        ``jobs``: worker processes computing features (default all cores); ``timeout``:
        seconds one file (one window of a long file) may take before it is reported;
        ``quiet``: no progress bar.
        """
        from deepfusion.inference.adapt import resolve_mode
        from deepfusion.progress import progress_bar

        folders = {i for i, p in enumerate(self.files) if p in self._typed and p.is_dir()}
        todo = [p for i, p in enumerate(self.files) if i not in folders]
        # the onnx engine's path never imports torch: musicnn's view on onnxruntime too
        runtime = "onnx" if self.engines[0].kind == "onnx" else None
        results = run_file_tasks(todo, cache_dir=self.cache_dir,
                                 config=self.engines[0].feature_config, jobs=jobs,
                                 timeout=timeout, view_runtime=runtime)
        self.adapted = resolve_mode(self.adapt, n_clips=len(todo), new_collection=True)
        if self.adapted == "none":
            for engine in self.engines:
                if hasattr(engine, "adapt"):
                    engine.adapt("none", lambda: iter(()))     # the trained model, as loaded
        else:
            # every file first: the statistics are the whole collection's
            with progress_bar(len(todo), desc="analyse", unit="file", quiet=quiet) as bar:
                done = []
                for result in results:
                    bar.update(1)
                    done.append(result)
            results = iter(done)
            usable = [(r[0], r[1]) for r in done if r[3] is None]
            for engine in self.engines:
                engine.adapt(self.adapted, lambda: _window_sets(self.cache, usable, self.class_names))
        with progress_bar(len(todo), desc="predict", unit="file", quiet=quiet) as bar:
            pending: list[tuple[Path, Optional[tuple]]] = []   # a batch of files, in order
            windows = 0
            for i, path in enumerate(self.files):
                if i in folders:
                    pending.append((path, None))
                    continue
                result = next(results)
                bar.update(1)
                self.repaired += result[5]
                pending.append((path, result))
                windows += result[1] if result[3] is None else 0
                if windows >= BATCH_WINDOWS:
                    yield from self._classify(pending)
                    pending, windows = [], 0
            yield from self._classify(pending)

    def _classify(self, pending: list[tuple[Path, Optional[tuple]]]
                  ) -> Iterator[Union[Prediction, tuple[str, str]]]:
        """The results of a batch of files, in order: their windows go through each model
        together (several files' windows per call are faster than one file's)."""
        from deepfusion.data.dataset import segments_per_clip

        ready = {j: r for j, (_, r) in enumerate(pending) if r is not None and r[3] is None}
        outputs, mended = _window_outputs(self.engines, self.cache,
                                          [(j, r[0], r[1]) for j, r in ready.items()])
        self.repaired += mended
        for j, (path, result) in enumerate(pending):
            if result is None:
                yield str(path), f"no audio files ({', '.join(AUDIO_EXTENSIONS)})"
                continue
            key, n_windows, seconds, reason, computed, _ = result
            out = outputs.get(j, reason)
            if isinstance(out, str):
                yield str(path), out
                continue
            logit_sums, att_sum, emb_sum, frames = out
            probs = np.mean([softmax((lg / n_windows)[None])[0][order]
                             for lg, order in zip(logit_sums, self._orders)], axis=0)
            order = np.argsort(-probs, kind="stable")
            segments = n_windows * segments_per_clip(frames, min(self.engines[0].segment_frames, frames))
            yield Prediction(str(path), [(self.class_names[c], float(probs[c])) for c in order],
                             n_windows, segments, seconds,
                             {g: float(p) for g, p in zip(self.class_names, probs)},
                             (att_sum / n_windows).astype(np.float32),
                             (emb_sum / n_windows).astype(np.float32), computed)


#: Windows classified per model call (several files; about 4 MB of views a window).
BATCH_WINDOWS = 4


def _window_sets(cache: FeatureCache, files: list[tuple[str, int]], class_names: list[str]
                 ) -> Iterator[Any]:
    """The windows of ``files`` (``(key, windows)``) as FeatureSets of up to
    :data:`BATCH_WINDOWS` windows (unlabelled), read from the cache; a window that cannot be
    read is left out (the classification pass reports its file)."""
    from deepfusion.io.featureset import FeatureSet

    batch: list[dict[str, np.ndarray]] = []

    def flush():
        n = len(batch)
        views = {k: np.concatenate([b[k] for b in batch]) for k in batch[0]}
        return FeatureSet(views, np.full(n, -1, np.int64), list(class_names), [""] * n,
                          np.zeros(n, np.int64))

    for key, n_windows in files:
        for w in range(n_windows):
            views = load_window(cache, key, w)
            if views is None:
                continue
            batch.append(views)
            if len(batch) >= BATCH_WINDOWS:
                yield flush()
                batch = []
    if batch:
        yield flush()


def _window_outputs(engines, cache: FeatureCache, files: list[tuple[int, str, int]]
                    ) -> tuple[dict, int]:
    """Per file ``j`` of ``files`` (``(j, key, windows)``): the sums over its windows of each
    model's logits, the first model's attention and embedding, and the frames per window; or
    the reason it failed. Files every model has seen before come from their
    :class:`~deepfusion.io.cache.OutputsCache`; the others' windows go through the models
    :data:`BATCH_WINDOWS` at a time, and their sums are kept for the next run. Also returns
    how many damaged outputs entries were found (each is computed again and replaced)."""
    from deepfusion.io.cache import OutputsCache

    kept_by = [OutputsCache(cache, getattr(e, "model_id", None),
                         (len(e.class_names), int(getattr(e, "embedding_dim", 0) or 0), len(e.keys)))
             for e in engines]
    done: dict = {}
    todo = []
    for j, key, n in files:
        kept = [m.get(key, n) for m in kept_by]
        if all(k is not None for k in kept):
            done[j] = ([k[0] for k in kept], kept[0][1], kept[0][2], kept[0][3])
        else:
            todo.append((j, key, n))
    pairs = [(j, key, w) for j, key, n in todo for w in range(n)]
    sums: dict = {}        # j -> [[per model [logits, attention, embedding]], frames]
    failed: dict[int, str] = {}
    for start in range(0, len(pairs), BATCH_WINDOWS):
        chunk, views = [], []
        for j, key, w in pairs[start:start + BATCH_WINDOWS]:
            if j in failed:
                continue
            v = load_window(cache, key, w)
            if v is None:
                failed[j] = CACHE_ENTRY_LOST
                continue
            chunk.append(j)
            views.append(v)
        if not chunk:
            continue
        stacked = {k: np.concatenate([v[k] for v in views]) for k in views[0]}
        frames = stacked[FEATURE_KEYS[0]].shape[-1]
        outs = [engine.window_outputs(stacked) for engine in engines]
        for row, j in enumerate(chunk):
            each = [[o[name][row].astype(np.float64) for name in ("logits", "attention", "embedding")]
                    for o in outs]
            if j not in sums:
                sums[j] = [each, frames]
            else:
                sums[j][0] = [[a + b for a, b in zip(old, new)] for old, new in zip(sums[j][0], each)]
    for j, key, n in todo:
        if j in sums and j not in failed:
            each, frames = sums[j]
            for outputs, (lg, att, emb) in zip(kept_by, each):
                outputs.put(key, n, lg, att, emb, frames)
            done[j] = ([e[0] for e in each], each[0][1], each[0][2], frames)
    return {**done, **failed}, sum(m.damaged for m in kept_by)
