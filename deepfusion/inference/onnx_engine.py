"""A deepfusion model exported to ONNX (:mod:`deepfusion.export`), run with onnxruntime.

This module never imports torch, nor does anything it imports (numpy, onnxruntime,
:mod:`deepfusion.config`, :mod:`deepfusion.data.dataset`, :mod:`deepfusion.models.meta`): a machine that
only classifies needs ``pip install 'deepfusion[onnx]'`` and no torch. The graph takes the views
of a batch of segments (the six, and the pretrained one when the model has it), un-normalised
(the checkpoint's normalisation is inside it); :meth:`OnnxEngine.window_outputs` cuts
clip-length windows into the same non-overlapping segments as
:func:`deepfusion.inference.clips.predict_clips` and averages the segments' outputs per window. The
model's ``deepfusion`` metadata is checked with the same schema as a checkpoint
(:mod:`deepfusion.models.meta`) and against the graph's inputs and outputs before it is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from deepfusion.config import FeatureConfig
from deepfusion.data.dataset import crop_views, segments_per_clip
from deepfusion.errors import OnnxModelError, ParameterError
from deepfusion.io.atomic import library_text
from deepfusion.views import ALL_KEYS, FEATURE_KEYS, PRETRAINED_KEY

#: The key of deepfusion's JSON entry in the ONNX model's ``metadata_props``.
METADATA_KEY = "deepfusion"
#: Version of that entry's layout; an engine reads only its own.
METADATA_FORMAT = 1
#: The graph's outputs, in this order.
OUTPUT_NAMES = ("logits", "attention", "embedding")
#: What that entry must hold (it holds more: the checkpoint's sha256, the versions, ...).
METADATA_KEYS = ("class_names", "feature_config", "model_config", "segment_frames", "rows")
#: Characters of that entry read at most (100,000 class names fit in well under that).
MAX_METADATA_CHARS = 2**24
#: Segments per onnxruntime call: bounds the memory of long inputs.
DEFAULT_BATCH = 64
INSTALL_HINT = "pip install 'deepfusion[onnx]'"


def import_onnxruntime():
    """onnxruntime, or :class:`OnnxModelError` saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise OnnxModelError(f"onnxruntime is not installed; {INSTALL_HINT}") from None
    return onnxruntime


def _not_onnx(model, exc: Exception) -> str:
    """Why onnxruntime refused ``model`` (a path or the bytes of one), in words."""
    import zipfile

    if isinstance(model, bytes):
        pytorch = model[:4] == b"PK\x03\x04"
    else:
        pytorch = Path(model).suffix.lower() in (".pth", ".pt") or zipfile.is_zipfile(model)
    if pytorch:   # torch.save writes a zip archive
        return ("a PyTorch checkpoint, not an ONNX model; drop --engine onnx, or export it "
                "with deepfusion export")
    text = str(exc)
    reason = "protobuf parsing failed" if "Protobuf parsing failed" in text else library_text(
        text.rsplit(" : ", 1)[-1], 120)
    return f"not an ONNX model, or a damaged one ({reason})"


class OnnxEngine:
    """An exported model loaded once, ready to classify any number of windows.

    Parameters
    ----------
    path : Path
        An ONNX file written by :func:`deepfusion.export.export_onnx`.
    providers : sequence of str, optional
        onnxruntime execution providers; default CUDA (when this onnxruntime offers it) then CPU.
    threads : int, optional
        Threads of one operator (onnxruntime's ``intra_op_num_threads``; default: its own choice).
    batch_size : int
        Segments per onnxruntime call.
    ids : ModelIds, optional
        The model files' digests known so far (:class:`~deepfusion.io.model_ids.ModelIds`): a model
        seen before is not hashed again to find its outputs in the cache.

    Attributes
    ----------
    class_names : list of str
        In logit order.
    feature_config : FeatureConfig
        The features the model was trained on (compute windows with it).
    segment_frames : int
        Frames of each segment the graph takes; a window is cut into
        ``segments_per_clip(T, segment_frames)`` non-overlapping segments.
    metadata : dict
        The whole metadata entry (checkpoint sha256 and format version, model config,
        exporter, versions).

    Raises
    ------
    OnnxModelError
        onnxruntime missing, or ``path`` not a deepfusion ONNX model.
    """

    def __init__(self, path: Union[str, Path], *, providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, batch_size: int = DEFAULT_BATCH, ids=None):
        path = Path(path)
        if not path.is_file():
            raise OnnxModelError(f"{path}: ONNX model not found")
        self._load(str(path), str(path), providers, threads, batch_size, ids)

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str = "<in memory>",
                   providers: Optional[Sequence[str]] = None, threads: Optional[int] = None,
                   batch_size: int = DEFAULT_BATCH) -> "OnnxEngine":
        """An engine over a serialised model (what :func:`~deepfusion.export.export_onnx` checks
        before it writes anything)."""
        engine = cls.__new__(cls)
        engine._load(data, name, providers, threads, batch_size)
        return engine

    def _load(self, model, name: str, providers, threads, batch_size: int, ids=None) -> None:
        from deepfusion.io.cache import stamp_or_none
        from deepfusion.io.model_ids import model_id

        ort = import_onnxruntime()
        stamp = None if isinstance(model, bytes) else stamp_or_none(model)
        if int(batch_size) < 1:
            raise ParameterError(f"batch_size must be >= 1, got {batch_size!r}")
        self.name, self.batch_size = name, int(batch_size)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(model, sess_options=options, providers=list(providers))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise OnnxModelError(f"{name}: {_not_onnx(model, exc)}") from None
        #: also sets described (the checked common fields), rows and segment_frames
        self.metadata = self._read_metadata()
        self.class_names: list[str] = list(self.described.class_names)
        self.feature_config: FeatureConfig = self.described.feature_config
        #: the graph's inputs: the six views, or seven with the pretrained one
        self.keys: tuple[str, ...] = self.described.keys
        # the width of the classifier's input (what embed writes): static in the graph
        shape = self.session.get_outputs()[OUTPUT_NAMES.index("embedding")].shape
        self.embedding_dim: int = int(shape[-1]) if isinstance(shape[-1], int) else 0
        # what deepfusion.io.model_ids keeps this model's outputs under (None: nothing kept)
        ran = self.session.get_providers()[0] if self.session.get_providers() else "cpu"
        self.model_id = (model_id(model, "onnx", ran) if isinstance(model, bytes) else
                         model_id(model, "onnx", ran, stamp=stamp, ids=ids) if stamp else None)
        self.kind = "onnx"

    def _read_metadata(self) -> dict:
        """The ``deepfusion`` metadata, checked field by field (:mod:`deepfusion.models.meta`,
        as a checkpoint is) and against the graph's inputs and outputs; sets
        :attr:`described`, :attr:`rows` and :attr:`segment_frames`."""
        from deepfusion.models.meta import (check_class_count, check_description, check_rows,
                                            check_segment_frames, show)

        name = self.name

        def bad(message: str) -> OnnxModelError:
            return OnnxModelError(f"{name}: damaged or inconsistent ONNX model: {message}")

        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise OnnxModelError(f"{name}: not a deepfusion ONNX model (no '{METADATA_KEY}' "
                                 "metadata); export one with deepfusion export")
        if len(raw) > MAX_METADATA_CHARS:
            raise bad(f"its '{METADATA_KEY}' metadata holds {len(raw):,} characters, over "
                      f"{MAX_METADATA_CHARS:,}")
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError):
            raise bad(f"its '{METADATA_KEY}' metadata is not JSON") from None
        if not isinstance(meta, dict):
            kind = {list: "array", str: "string", bool: "boolean", int: "number",
                    float: "number", type(None): "null"}.get(type(meta), "value")
            raise bad(f"its '{METADATA_KEY}' metadata is a JSON {kind}, not an object")
        found = meta.get("format")
        if not isinstance(found, int) or isinstance(found, bool) or found != METADATA_FORMAT:
            written = "no metadata format" if found is None else f"metadata format {show(found)}"
            raise OnnxModelError(f"{name}: exported by another deepfusion version ({written}; "
                                 f"this one reads {METADATA_FORMAT}); export it again with "
                                 "deepfusion export")
        missing = [k for k in METADATA_KEYS if k not in meta]
        if missing:
            raise bad(f"no {', '.join(missing)}")
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        names = [i.name for i in inputs], [o.name for o in outputs]
        if names[0] not in (list(FEATURE_KEYS), list(ALL_KEYS)) or names[1] != list(OUTPUT_NAMES):
            raise OnnxModelError(f"{name}: not a deepfusion ONNX model (inputs "
                                 f"{', '.join(names[0])}; outputs {', '.join(names[1])})")
        described = check_description(meta, bad)
        if list(described.keys) != names[0]:
            raise bad(f"feature_config: its views {', '.join(described.keys)} are not the "
                      f"graph's inputs {', '.join(names[0])}")
        rows = check_rows(meta["rows"], described, bad)
        seg = check_segment_frames(meta["segment_frames"], described, bad)
        fc = described.feature_config
        widths = {k: seg for k in described.keys}
        if PRETRAINED_KEY in widths:   # the patches a segment of frames covers
            from deepfusion.features.pretrained.view import patch_span

            widths[PRETRAINED_KEY] = patch_span(0, seg, fc.n_frames, fc.n_patches)[1]
        for given in inputs:   # (batch, rows, frames): static but the batch
            dims = list(given.shape)
            if len(dims) != 3:
                raise bad(f"rows: the graph's {given.name} input has shape {show(dims)}, not "
                          "(batch, rows, frames)")
            if isinstance(dims[1], int) and dims[1] != rows[given.name]:
                raise bad(f"rows: the graph's {given.name} input takes {dims[1]} rows, its "
                          f"metadata says {rows[given.name]}")
            if isinstance(dims[2], int) and dims[2] != widths[given.name]:
                raise bad(f"segment_frames: the graph's {given.name} input takes segments of "
                          f"{dims[2]}, its metadata says {widths[given.name]} "
                          f"(segment_frames {seg})")
        shapes = {o.name: list(o.shape) for o in outputs}
        width = shapes["logits"][-1] if shapes["logits"] else None
        if isinstance(width, int):
            check_class_count(described.class_names, width, "a graph whose logits output has", bad)
        views = shapes["attention"][-1] if shapes["attention"] else None
        if isinstance(views, int) and views != len(described.keys):
            raise bad(f"the graph's attention output has {views} views, its inputs "
                      f"{len(described.keys)}")
        self.described, self.rows, self.segment_frames = described, rows, seg
        return meta

    @property
    def providers(self) -> list[str]:
        """The execution providers the session runs on."""
        return list(self.session.get_providers())

    def segment_outputs(self, segments: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph on a batch of segments.

        Parameters
        ----------
        segments : dict of key -> np.ndarray [shape=(B, rows, segment_frames)]
            The model's views (:attr:`keys`), un-normalised (the pretrained view: the
            patches the segment covers).

        Returns
        -------
        dict of np.ndarray, float32: ``logits`` (B, n_classes), ``attention`` (B, M),
        ``embedding`` (B, d)
        """
        feeds = {k: np.ascontiguousarray(segments[k], dtype=np.float32) for k in self.keys}
        out = dict(zip(OUTPUT_NAMES, self.session.run(list(OUTPUT_NAMES), feeds)))
        if out["logits"].shape[-1] != len(self.class_names):   # a width the graph left open
            raise OnnxModelError(f"{self.name}: damaged or inconsistent ONNX model: class_names: "
                                 f"{len(self.class_names)} class names for a graph whose logits "
                                 f"output has {out['logits'].shape[-1]} classes")
        return out

    def window_outputs(self, views: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Mean outputs over the non-overlapping segments of each window.

        What :func:`deepfusion.inference.clips.predict_clips` computes (fp32) for clips holding these
        views: each window is cut into ``segments_per_clip(T, segment_frames)`` segments from
        frame 0, the outputs of all segments summed in float64 and divided by their number.

        Parameters
        ----------
        views : dict of key -> np.ndarray [shape=(n, rows, T)]
            The views of ``n`` clip-length windows (the pretrained view's ``T`` counts its
            patches), un-normalised (as
            :func:`deepfusion.features.numpy_views.compute_features` makes them, stacked), ``T >=
            segment_frames``.

        Returns
        -------
        dict of np.ndarray, float32: ``logits`` (n, n_classes), ``attention`` (n, M),
        ``embedding`` (n, d)

        Raises
        ------
        ParameterError
            A view missing, of other rows than the model takes, or windows shorter than a segment.
        """
        n, frames = self._check_views(views)
        mine = {k: views[k] for k in self.keys}
        seg = self.segment_frames
        per = segments_per_clip(frames, seg)
        total = n * per
        sums: dict[str, np.ndarray] = {}
        for lo in range(0, total, self.batch_size):
            items = range(lo, min(lo + self.batch_size, total))
            crops = [crop_views(mine, i // per, (i % per) * seg, seg, frames) for i in items]
            batch = {k: np.stack([c[k] for c in crops]) for k in self.keys}
            out = self.segment_outputs(batch)
            window = np.array([i // per for i in items])
            for name, value in out.items():
                if name not in sums:
                    sums[name] = np.zeros((n, value.shape[1]), np.float64)
                np.add.at(sums[name], window, value.astype(np.float64))
        if not sums:   # no window at all
            return {o.name: np.zeros((0, o.shape[1] if isinstance(o.shape[1], int) else 0),
                                     np.float32) for o in self.session.get_outputs()}
        return {name: (s / per).astype(np.float32) for name, s in sums.items()}

    def _check_views(self, views: dict[str, np.ndarray]) -> tuple[int, int]:
        missing = [k for k in self.keys if k not in views]
        if missing:
            raise ParameterError(f"window_outputs: missing view(s) {', '.join(missing)}")
        shapes = {k: np.shape(views[k]) for k in self.keys}
        wrong = [f"{k} {list(s)}" for k, s in shapes.items() if len(s) != 3 or s[1] != self.rows[k]]
        if wrong:
            expected = ", ".join(f"{k} {self.rows[k]}" for k in self.keys)
            raise ParameterError(f"window_outputs: views must be (windows, rows, frames) with rows "
                                 f"{expected}; got {', '.join(wrong)}")
        framed = {k: s for k, s in shapes.items() if k in FEATURE_KEYS}
        if PRETRAINED_KEY in shapes and shapes[PRETRAINED_KEY][2] != self.feature_config.n_patches:
            raise ParameterError(f"window_outputs: the {PRETRAINED_KEY} view has "
                                 f"{shapes[PRETRAINED_KEY][2]} patches, clip-length windows of "
                                 f"this model's features {self.feature_config.n_patches}")
        if len({s[0] for s in shapes.values()}) > 1 or len({s[2] for s in framed.values()}) > 1:
            raise ParameterError("window_outputs: the views differ in windows or frames: "
                                 + ", ".join(f"{k} {list(s)}" for k, s in shapes.items()))
        n, frames = shapes[FEATURE_KEYS[0]][0], shapes[FEATURE_KEYS[0]][2]
        if frames < self.segment_frames:
            raise ParameterError(f"window_outputs: windows of {frames} frames are shorter than the "
                                 f"model's segments of {self.segment_frames} frames")
        return int(n), int(frames)
