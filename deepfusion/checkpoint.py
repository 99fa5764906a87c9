"""Self-contained checkpoints.

A checkpoint is a dict of tensors and plain data (no classes, no ``Namespace``), saved
atomically and loaded with ``torch.load(path, weights_only=True)``, so loading never runs code.
``best.pth`` holds everything ``evaluate`` and ``predict`` need: the model state and its
:class:`ModelConfig`, the class names in logit order, the :class:`FeatureConfig`, the
normalisation statistics, the split, the :class:`TrainConfig` and :class:`RuntimeConfig`, the
metrics, library versions and a format version. ``last.pth`` adds the optimizer, scheduler, scaler and RNG states.
"""

from __future__ import annotations

import platform
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .config import RUNTIME_FIELDS, FeatureConfig, ModelConfig, RuntimeConfig
from .errors import CheckpointError
from .io.atomic import atomic_write

FORMAT_VERSION = 1


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    import librosa
    import numpy
    import torchvision

    from . import __version__

    return {"deepfusion": __version__, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "librosa": str(librosa.__version__),
            "numpy": str(numpy.__version__), "python": platform.python_version()}


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (tensors and plain data only) atomically."""
    payload = {"format_version": FORMAT_VERSION, **payload}
    with atomic_write(Path(path)) as fh:
        sink = _Sink(fh)
        try:
            torch.save(payload, sink)
        except RuntimeError:
            if sink.error is not None:  # torch's zip writer turns a failed write (a full
                raise sink.error from None  # disk) into "enforce fail ... unexpected pos"
            raise


class _Sink:
    """A file for torch.save that remembers the OSError of a failed write."""

    def __init__(self, fh):
        self._fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self._fh.flush()
        except OSError as exc:
            self.error = exc
            raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint without running code in it.

    Raises
    ------
    CheckpointError
        Missing, unreadable, holding objects other than tensors and plain data, or of another
        format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: noise, not news
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        refused = _refused_object(str(exc))
        if refused:  # a pickle naming code: refused before anything in it ran
            raise CheckpointError(
                f"{path}: refused, the file holds objects other than tensors and plain data "
                f"({refused[:120]})") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file, or a damaged one "
                              f"({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or "model_state" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path}: not a deepfusion checkpoint (no model_state/model_config)")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {ckpt.get('format_version')!r}, "
                              f"this deepfusion reads format {FORMAT_VERSION}")
    return ckpt


#: How torch's weights-only unpickler names what it would not load (wordings vary by version).
_REFUSAL_PATTERNS = (
    re.compile(r"GLOBAL (?P<name>\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (?P<name>\S+) whose module \S+ is blocked"),
    re.compile(r"Unsupported global: GLOBAL (?P<name>\S+)"),
    re.compile(r"reduce for unrecognized function (?P<call>.+?)(?: which belongs|$)", re.M),
    re.compile(r"Can only (?:build|create new object) .* but got (?P<call>.+)$", re.M),
)


def _refused_object(message: str) -> str:
    """What a weights-only load refused to build (``GLOBAL posix.system``); '' for a damaged file."""
    for pattern in _REFUSAL_PATTERNS:
        match = pattern.search(message)
        if match:
            found = match.groupdict()
            return f"GLOBAL {found['name']}" if found.get("name") else found["call"].strip()
    return ""


def model_from_checkpoint(ckpt: dict[str, Any]):
    """Rebuild the model of a loaded checkpoint, weights loaded, in eval mode."""
    from .models import MultiModalNet

    # checkpoints written before a field existed were made without it
    config = ModelConfig.from_dict({"band_stats": False, **ckpt["model_config"], "pretrained": False})
    if config.kind == "probe":
        from .probe import LinearProbe

        model = LinearProbe.from_config(config)
    else:
        model = MultiModalNet(config)
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(f"model state does not fit its config ({str(exc)[:200]})") from None
    return model.eval()


def feature_config_of(ckpt: dict[str, Any]) -> FeatureConfig:
    return FeatureConfig.from_dict(ckpt["feature_config"])


def runtime_of(ckpt: dict[str, Any]) -> RuntimeConfig:
    """How the run that wrote ``ckpt`` executed (older checkpoints kept it in train_config)."""
    stored = ckpt.get("runtime_config")
    if stored is None:
        stored = {k: v for k, v in ckpt.get("train_config", {}).items() if k in RUNTIME_FIELDS}
    return RuntimeConfig.from_dict(stored)


def normalization_of(ckpt: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Normalisation statistics as numpy arrays."""
    return {k: {s: v.numpy() for s, v in d.items()} for k, d in ckpt["normalization"].items()}
