"""The pretrained view: what a frozen music network (musicnn) makes of each 3-s patch of a clip.

Per patch, the rows are musicnn's penultimate layer (200) and its 50 tag likelihoods: what
the network learnt about music, not its front end's filter responses (561 per patch), which
carry the recording and production as much as the music and transferred worst from one
collection to another in the cross-source protocol (README). The time axis is the
network's patches, not STFT frames: one 3-s patch in every ``stride`` of the clip's (with the
default stride 4, patches 0, 4 and 8 of a 30-s clip's 10, the selection centred), because the
network costs about 70 ms per patch on a CPU core: all ten patches of a 30-s clip would cost
3.5 times the six hand-made views of the whole clip (0.2 s), three of them cost about as much
as those views (the extraction budget is 2.5x the six views); ``stride=1`` takes every patch (``deepfusion tag``). The patches and
rows are counted in :mod:`deepfusion.patches` (:func:`patch_span` maps a segment of frames to
the patches that represent it).

Pure: arrays in, arrays out; the network is loaded once per process
(:func:`deepfusion.features.pretrained.musicnn.load_musicnn`). Importing this module loads neither
torch nor librosa.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from deepfusion.io.atomic import library_text
# the view's geometry is plain arithmetic the config sizes it with; its names stay importable here
from deepfusion.patches import (MIN_SAMPLES, PARTS, VIEW_ROWS, all_patches,  # noqa: F401
                                chosen_patches, n_patches, part_rows, patch_span, samples_16k)


def pretrained_view(y: np.ndarray, sample_rate: int, model: str = "MTT_musicnn", *,
                    stride: int = 1, device: Optional[str] = None,
                    runtime: Optional[str] = None) -> np.ndarray:
    """The pretrained view of one clip.

    Parameters
    ----------
    y : np.ndarray [shape=(n_samples,)]
        Mono waveform at ``sample_rate`` (already padded or trimmed to the clip length).
    model : str
        ``MSD_musicnn`` or ``MTT_musicnn``.
    stride : int
        One patch in every ``stride`` (:func:`chosen_patches`); 1: all of them.
    device : str, optional
        A torch device for the network (default: the CPU).
    runtime : {None, 'onnx', 'torch'}
        What runs the network (:func:`runtime_of`): None, onnxruntime on the CPU where it is
        installed, else torch; ``onnx`` or ``torch`` is obeyed (``predict --engine onnx``
        never imports torch). Either gives the view within float32 rounding.

    Returns
    -------
    np.ndarray [shape=(VIEW_ROWS, n_patches(len(y), sample_rate, stride))], float32
    """
    return pretrained_views(y[None], sample_rate, model, stride=stride, device=device,
                            runtime=runtime)[0]


def pretrained_views(ys: np.ndarray, sample_rate: int, model: str = "MTT_musicnn", *,
                     stride: int = 1, device: Optional[str] = None,
                     runtime: Optional[str] = None) -> np.ndarray:
    """:func:`pretrained_view` of a batch of clips of one length.

    Parameters
    ----------
    ys : np.ndarray [shape=(batch, n_samples)]

    Returns
    -------
    np.ndarray [shape=(batch, VIEW_ROWS, n_patches)], float32
    """
    from deepfusion.features.pretrained.musicnn_input import log_mel, patches, resample_16k

    ys = np.asarray(ys, np.float32)
    chosen = list(chosen_patches(all_patches(ys.shape[-1], sample_rate), stride))
    want = len(chosen)
    mels = []
    for y in ys:
        y16 = resample_16k(y, sample_rate)
        if y16.shape[0] < MIN_SAMPLES:
            y16 = np.pad(y16, (0, MIN_SAMPLES - y16.shape[0]))
        p = patches(log_mel(y16))                                   # (n, 187, 96)
        mels.append(p[chosen])
    x = np.concatenate(mels)                                        # (batch * want, 187, 96)
    rows = _run(model, device, x, runtime).reshape(len(ys), want, VIEW_ROWS)
    return np.ascontiguousarray(rows.transpose(0, 2, 1), dtype=np.float32)


def clip_view(clip) -> np.ndarray:
    """The view of a :class:`deepfusion.features.numpy_views.Clip`, as its config says (the
    registry's numpy function, :data:`deepfusion.views.VIEWS`)."""
    c = clip.config
    return pretrained_view(clip.y, c.sample_rate, c.pretrained_view, stride=c.pretrained_stride,
                           runtime=clip.view_runtime)


def batch_view(batch) -> np.ndarray:
    """The views of a :class:`deepfusion.features.torch_views.Batch`: resampled on the CPU,
    the network on the batch's device (the registry's torch function)."""
    c = batch.config
    return pretrained_views(batch.y.float().cpu().numpy(), c.sample_rate, c.pretrained_view,
                            stride=c.pretrained_stride, device=str(batch.device))


def view_rows(out: dict):
    """The view's rows from :meth:`Musicnn.forward`'s outputs: (P, 250) in :data:`PARTS` order
    (the one place that says what the rows are; the ONNX form is exported from it)."""
    import torch

    return torch.cat([out["penultimate"],                           # (P, 200)
                      out["taggram"]], dim=1)                       # (P, 50)


def runtime_of(runtime: Optional[str] = None, device: Optional[str] = None) -> str:
    """What runs the network: ``"onnx"`` (onnxruntime on the shipped ONNX form) or
    ``"torch"``.

    ``runtime`` ``onnx`` or ``torch`` is obeyed. Otherwise (None): on the CPU (``device`` None
    or ``cpu``) onnxruntime where it is installed, as it is faster there, to start (0.3 s to
    import against torch's 1.3-2 s) and per patch (about half torch's time on one core,
    ``benchmarks/extract_speed.py``), with the same rows within float32 rounding (1.8e-6 on
    20 real clips against the tolerance 1e-3); torch on any other device, or where
    onnxruntime is not installed.
    """
    if runtime in ("onnx", "torch"):
        return runtime
    if device not in (None, "cpu"):
        return "torch"
    import importlib.util

    return "onnx" if importlib.util.find_spec("onnxruntime") is not None else "torch"


def _run(model: str, device: Optional[str], x: np.ndarray,
         runtime: Optional[str] = None) -> np.ndarray:
    """The rows of patches ``x`` (P, 187, 96) on :func:`runtime_of` ``runtime``: onnxruntime
    on the shipped ONNX form of the network (also on a machine without torch, one that only
    classifies with ``predict --engine onnx``), or torch."""
    chosen = runtime_of(runtime, device)
    if chosen == "torch":
        try:
            import torch
        except ImportError:
            chosen = "onnx"
    if chosen == "onnx":
        return _onnx_session(model).run(None, {"patches": x})[0]
    net = _network(model, str(torch.device(device or "cpu")))
    dev = next(net.parameters()).device
    # float32 convolutions on CUDA too (not TF32): the view must agree with the CPU's within
    # features_torch.TOLERANCE, since both share the cache key
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        rows = view_rows(net(torch.from_numpy(x).to(dev)))
    return rows.float().cpu().numpy()


@functools.lru_cache(maxsize=4)
def _onnx_session(model: str):
    """An onnxruntime session on ``weights/<model>.onnx``, once per process."""
    from importlib import resources

    from deepfusion.errors import WeightsNotFoundError

    try:
        import onnxruntime as ort
    except ImportError:
        raise WeightsNotFoundError("the pretrained view needs torch or onnxruntime, and neither "
                                   "is installed (pip install torch, or pip install "
                                   "'deepfusion[onnx]')") from None
    path = resources.files("deepfusion") / "features" / "pretrained" / "weights" / f"{model}.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1      # as torch's one thread in a worker
    try:
        return ort.InferenceSession(path.read_bytes(), sess_options=options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a missing or damaged file: one line
        raise WeightsNotFoundError(f"{path}: the ONNX form of {model} cannot be loaded "
                                   f"({library_text(exc, 120)}); reinstall deepfusion (pip "
                                   "install --force-reinstall deepfusion)") from None


@functools.lru_cache(maxsize=8)
def _network(model: str, device: str):
    """musicnn on ``device``: the process's one CPU copy, or a copy per other device (the
    CPU copy is never moved, other callers share it)."""
    import copy

    from deepfusion.features.pretrained.musicnn import load_musicnn

    net = load_musicnn(model)
    return net if device == "cpu" else copy.deepcopy(net).to(device)
