"""Export a checkpoint to ONNX, checked against torch before anything is written.

The exported graph takes the views of a batch of *segments*, un-normalised, as one input per
view named and ordered as the model's views (:data:`deepfusion.views.FEATURE_KEYS`, and
``musicnn`` after them when the model has the pretrained view), each ``(B, rows,
segment_frames)`` float32 (the pretrained view: the patches a segment covers) with a dynamic
batch axis ``B``; the checkpoint's normalisation (per row, ``(view - mean) / std``) is inside
the graph. Its outputs are ``logits`` ``(B, n_classes)``, ``attention`` ``(B, M)`` for M
views and ``embedding`` ``(B, d)``. One JSON entry of the model's
``metadata_props`` (key ``deepfusion``) holds what :class:`~deepfusion.inference.onnx_engine.OnnxEngine`
needs: class names in logit order, the :class:`FeatureConfig`, the segment frames, the
checkpoint's sha256 and format version, the versions that wrote it.

Exporter: torch's ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``,
torch's default since 2.9, needs ``onnxscript``), the maintained one; the TorchScript exporter
(``dynamo=False``, deprecated since torch 2.9) is the fallback when onnxscript is missing or
the dynamo export fails. Both give the same numbers on light, resnet18 and probe checkpoints
with torch 2.14 (max probability difference about 1e-7); the dynamo one takes 5-30 s on 2 CPU
cores, the TorchScript one under a second. Whichever ran, the result is checked: onnxruntime
and torch classify the same real windows and the file is written (atomically) only when their
probabilities and attention agree within ``tolerance``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from deepfusion.config import FeatureConfig
from deepfusion.errors import ExportError, FeaturesFileError, ParameterError
from deepfusion.features.pretrained.view import patch_span
from deepfusion.inference.onnx_engine import METADATA_FORMAT, METADATA_KEY, OUTPUT_NAMES, OnnxEngine
from deepfusion.io.atomic import atomic_write, check_writable, library_text
from deepfusion.io.cache import file_digest
from deepfusion.io.guard import Destination, check_destinations
from deepfusion.models.checkpoint import Checkpoint, read_checkpoint
from deepfusion.views import FEATURE_KEYS, PRETRAINED_KEY

EXPORTERS = ("auto", "dynamo", "torchscript")
INSTALL_HINT = "pip install 'deepfusion[onnx-export]'"
#: Clips of the training features file that the check classifies (evenly spread).
CHECK_CLIPS = 8


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how closely onnxruntime matched torch."""

    path: Path
    exporter: str                  # "dynamo" or "torchscript"
    opset: int
    max_prob_diff: float           # largest |p_onnx - p_torch| over windows and classes
    max_attention_diff: float
    max_logit_diff: float
    windows: int                   # windows the check classified
    check_source: str              # where they came from
    size_bytes: int
    metadata: dict = field(default_factory=dict)


class NormalisedModel(nn.Module):
    """A model with the checkpoint's normalisation in front, taking its views positionally.

    ``forward(mel_spec_orig, ..., tempogram[, musicnn])``, each ``(B, rows, T)``
    un-normalised, returns ``(logits, attention, embedding)``.
    """

    def __init__(self, model: nn.Module, norm: dict, keys: tuple[str, ...] = FEATURE_KEYS):
        super().__init__()
        self.model, self.keys = model, tuple(keys)
        for k in self.keys:   # (rows, 1): broadcast over time
            self.register_buffer(f"mean_{k}", torch.as_tensor(norm[k]["mean"], dtype=torch.float32)[:, None])
            self.register_buffer(f"std_{k}", torch.as_tensor(norm[k]["std"], dtype=torch.float32)[:, None])

    def forward(self, *views):
        x = {k: (v - getattr(self, f"mean_{k}")) / getattr(self, f"std_{k}")
             for k, v in zip(self.keys, views)}
        out = self.model(x)
        return tuple(out[name] for name in OUTPUT_NAMES)


def export_onnx(checkpoint: Path, out: Path, *, check_windows: Optional[dict[str, np.ndarray]] = None,
                opset: Optional[int] = None, tolerance: float = 1e-4, exporter: str = "auto",
                overwrite: bool = False, echo: Callable[[str], None] = print) -> ExportResult:
    """Export ``checkpoint`` to the ONNX file ``out``, after checking it against torch.

    Parameters
    ----------
    checkpoint : Path
        A deepfusion checkpoint (network of any backbone, or the linear probe).
    out : Path
        The ONNX file; replaced atomically, written only when the check passes.
    check_windows : dict of key -> np.ndarray [shape=(n, rows, T)], optional
        Real clip windows (un-normalised views, ``T`` >= the segment frames) to check on.
        Default: up to 8 clips of the features file the checkpoint was trained on, if it still
        exists and fits; else two synthetic clips rendered by :mod:`deepfusion.synth` and
        analysed with the checkpoint's feature config.
    opset : int, optional
        ONNX opset; default the exporter's.
    tolerance : float
        Largest difference allowed between onnxruntime's and torch's clip probabilities
        (softmax of the mean logits) and mean attention.
    exporter : {"auto", "dynamo", "torchscript"}
        ``auto``: dynamo, falling back to TorchScript (see the module docstring).
    echo : callable
        Receives one line: where it wrote, the exporter, the differences.

    Returns
    -------
    ExportResult

    Raises
    ------
    CheckpointError
        The checkpoint cannot be loaded.
    ExportError
        onnx or onnxruntime missing (``pip install 'deepfusion[onnx-export]'``), every
        exporter failed, or onnxruntime's outputs differ from torch's by more than
        ``tolerance`` (nothing written).
    OutputError
        ``out`` is the checkpoint, an existing file that is not an ONNX model deepfusion
        exported (unless ``overwrite``), or not writable.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if exporter not in EXPORTERS:
        raise ParameterError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if not tolerance >= 0:
        raise ParameterError(f"tolerance must be >= 0, got {tolerance!r}")
    for module in ("onnx", "onnxruntime"):
        if not _installed(module):
            raise ExportError(f"exporting to ONNX needs {module}, which is not installed; {INSTALL_HINT}")
    check_destinations([Destination(out, "--out", "onnx")],
                       {checkpoint: "the checkpoint"}, overwrite=overwrite)
    check_writable(out)
    ckpt = read_checkpoint(checkpoint)

    model = ckpt.build_model().float().eval()
    norm, fc, keys, rows = ckpt.normalization, ckpt.feature_config, ckpt.keys, ckpt.rows
    seg = ckpt.segment_frames
    # the pretrained view's segment: the patches a segment of frames covers
    widths = {k: seg for k in keys}
    if PRETRAINED_KEY in keys:
        widths[PRETRAINED_KEY] = patch_span(0, seg, fc.n_frames, fc.n_patches)[1]
    wrapper = NormalisedModel(model, norm, keys).eval()
    proto, used = _to_onnx(wrapper, rows, widths, opset=opset, exporter=exporter, name=checkpoint)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    meta = _metadata(ckpt, rows, seg, exporter=used, opset=opset_used)
    _set_metadata(proto, meta)
    data = proto.SerializeToString()

    windows, source = _windows_for_check(check_windows, ckpt, rows, seg)
    windows = {k: windows[k] for k in keys if k in windows}
    diffs = compare_with_torch(model, norm, OnnxEngine.from_bytes(data, name=str(out)), windows, seg)
    n = len(windows[FEATURE_KEYS[0]])
    if not (diffs["probability"] <= tolerance and diffs["attention"] <= tolerance):
        raise ExportError(
            f"{checkpoint}: the ONNX graph ({used}) differs from the torch model on {n} windows of "
            f"{source}: max probability difference {diffs['probability']:.3g}, attention "
            f"{diffs['attention']:.3g}, over --tolerance {tolerance:g}; {out} not written; give "
            + ("a larger --tolerance" if used == "torchscript" else
               "--exporter torchscript, or a larger --tolerance"))
    with atomic_write(out) as fh:
        fh.write(data)
    echo(f"exported {checkpoint} -> {out} ({used} exporter, opset {opset_used}, "
         f"{len(data) / 1e6:.1f} MB); onnxruntime vs torch on {n} windows of {source}: "
         f"max probability difference {diffs['probability']:.2e}, attention {diffs['attention']:.2e}")
    return ExportResult(out, used, opset_used, diffs["probability"], diffs["attention"],
                        diffs["logits"], n, source, len(data), meta)


# ------------------------------------------------------------------------------- the exporters

def _example(rows: dict[str, int], widths: dict[str, int]) -> tuple[torch.Tensor, ...]:
    # batch 2: an example batch of 1 may be specialised into the graph
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, rows[k], widths[k], generator=g) for k in rows)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):   # ValueError: blocked in sys.modules
        return False


def _dynamo(wrapper: nn.Module, example, opset: Optional[int]):
    if not _installed("onnxscript"):
        raise ImportError("onnxscript is not installed")
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(wrapper, example, None, dynamo=True, verbose=False,
                                input_names=list(wrapper.keys), output_names=list(OUTPUT_NAMES),
                                opset_version=opset,
                                # forward(*views): one argument, the tuple of the views
                                dynamic_shapes=(tuple({0: batch} for _ in wrapper.keys),))
    return program.model_proto


def _torchscript(wrapper: nn.Module, example, opset: Optional[int]):
    import onnx

    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in (*wrapper.keys, *OUTPUT_NAMES)}
    torch.onnx.export(wrapper, example, buffer, dynamo=False, input_names=list(wrapper.keys),
                      output_names=list(OUTPUT_NAMES), opset_version=opset, dynamic_axes=axes)
    return onnx.load_from_string(buffer.getvalue())


_EXPORT = {"dynamo": _dynamo, "torchscript": _torchscript}


def _to_onnx(wrapper: nn.Module, rows: dict[str, int], widths: dict[str, int], *,
             opset: Optional[int], exporter: str, name: Path):
    """The ONNX ModelProto of ``wrapper`` and the exporter that made it."""
    order = ("dynamo", "torchscript") if exporter == "auto" else (exporter,)
    failures = []
    for which in order:
        try:
            with warnings.catch_warnings():   # deprecation and axis-naming notes: not news
                warnings.simplefilter("ignore")
                return _EXPORT[which](wrapper, _example(rows, widths), opset), which
        except Exception as exc:  # noqa: BLE001 - exporters raise many types
            failures.append(f"{which}: {library_text(exc, 160)}")
    advice = "give another --opset" if "torchscript" in order else \
        "give --exporter torchscript, or another --opset"
    raise ExportError(f"{name}: ONNX export failed ({', '.join(failures)}); {advice}")


def _metadata(ckpt: Checkpoint, rows: dict[str, int], seg: int, *, exporter: str,
              opset: int) -> dict:
    from deepfusion import __version__

    return {"format": METADATA_FORMAT,
            "class_names": list(ckpt.class_names),
            "feature_config": ckpt.feature_config.to_dict(),
            "segment_frames": int(seg),
            "segment_seconds": ckpt.train_config.segment_seconds,
            "rows": rows,
            "inputs": list(rows), "outputs": list(OUTPUT_NAMES),
            "normalization": "inside the graph",
            "model_config": ckpt.model_config.to_dict(),
            "checkpoint": {"file": ckpt.path.name, "sha256": file_digest(ckpt.path),
                           "format_version": ckpt.format_version},
            "deepfusion_version": __version__, "torch_version": str(torch.__version__),
            "exporter": exporter, "opset": opset}


def _set_metadata(proto, meta: dict) -> None:
    for i in reversed(range(len(proto.metadata_props))):
        if proto.metadata_props[i].key == METADATA_KEY:
            del proto.metadata_props[i]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True)


# ----------------------------------------------------------------------------------- the check

def _windows_for_check(given: Optional[dict], ckpt: Checkpoint, rows: dict[str, int],
                       seg: int) -> tuple[dict[str, np.ndarray], str]:
    """The windows to check on, and where they came from (for the messages)."""
    if given is not None:
        return {k: np.asarray(given[k], np.float32) for k in rows if k in given}, "the given windows"
    path = ckpt.features_file
    if path and Path(path).exists():
        from deepfusion.io.features_file import load_features

        try:
            fs = load_features(Path(path), class_names=list(ckpt.class_names))
        except FeaturesFileError:
            fs = None
        if fs is not None and len(fs) and all(fs.rows().get(k) == r for k, r in rows.items()) \
                and fs.n_frames >= seg:
            idx = np.unique(np.linspace(0, len(fs) - 1, min(CHECK_CLIPS, len(fs))).round().astype(int))
            return ({k: np.asarray(fs.arrays[k][idx], np.float32) for k in rows},
                    f"the training features file {path}")
    return _synthetic_windows(ckpt.feature_config), "two synthetic clips"


def _synthetic_windows(fc: FeatureConfig) -> dict[str, np.ndarray]:
    from deepfusion.features.numpy_views import compute_features
    from deepfusion.synth import GENRES, render_clip

    feats = [compute_features(render_clip(genre, seed=i, duration=fc.duration, sr=fc.sample_rate), fc)
             for i, genre in enumerate(GENRES[:2])]
    return {k: np.stack([f[k] for f in feats]) for k in feats[0]}


def compare_with_torch(model: nn.Module, norm: dict, engine: OnnxEngine,
                       windows: dict[str, np.ndarray], seg: int) -> dict[str, float]:
    """Largest differences between torch (:func:`~deepfusion.inference.clips.predict_clips`, fp32)
    and ``engine`` (:meth:`~deepfusion.inference.onnx_engine.OnnxEngine.window_outputs`) on ``windows``.

    Returns
    -------
    dict: ``probability`` (softmax of the mean logits), ``attention``, ``logits``, ``embedding``
    (each the max absolute difference)
    """
    from deepfusion.inference.clips import predict_clips
    from deepfusion.io.featureset import FeatureSet
    from deepfusion.metrics import softmax

    onnx_out = engine.window_outputs(windows)
    n = len(windows[FEATURE_KEYS[0]])
    fs = FeatureSet(dict(windows), np.full(n, -1, np.int64),
                    list(engine.class_names), [""] * n, np.arange(n, dtype=np.int64))
    ref = predict_clips(model, fs, norm, np.arange(n), seg=seg, embeddings=True)

    def most(a, b) -> float:
        return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))

    return {"probability": most(softmax(onnx_out["logits"]), softmax(ref.logits)),
            "attention": most(onnx_out["attention"], ref.attention),
            "logits": most(onnx_out["logits"], ref.logits),
            "embedding": most(onnx_out["embedding"], ref.embeddings)}
