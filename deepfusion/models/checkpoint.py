"""Self-contained checkpoints.

A checkpoint is a dict of tensors and plain data (no classes, no ``Namespace``), saved
atomically and loaded with ``torch.load(path, weights_only=True)``, so loading never runs code.
Every tensor is saved as a CPU tensor and loaded onto the CPU, so a file written on a GPU
loads on a machine without one. ``best.pth`` holds everything ``evaluate`` and ``predict``
need: the model state and its :class:`ModelConfig`, the class names in logit order, the
:class:`FeatureConfig`, the normalisation statistics, the split, the :class:`TrainConfig` and
:class:`RuntimeConfig`, the metrics, library versions and a format version. ``last.pth`` adds
the optimizer, scheduler, scaler and RNG states.

:func:`read_checkpoint` is how a command reads one: :func:`load_checkpoint`'s checks, then the
fields unpacked once into a typed :class:`Checkpoint` (configs, class names, numpy
normalisation, segment frames, provenance), which builds the network itself.
"""

from __future__ import annotations

import platform
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from deepfusion.config import RUNTIME_FIELDS, FeatureConfig, ModelConfig, RuntimeConfig, TrainConfig
from deepfusion.errors import CheckpointError, ParameterError
from deepfusion.io.atomic import atomic_write, library_text
from deepfusion.io.names import one_line
from deepfusion.models.meta import (MODEL_DEFAULTS, check_checkpoint_path, check_description,
                                    check_normalization)
from deepfusion.views import view_keys

FORMAT_VERSION = 1


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    import librosa
    import numpy
    import torchvision

    from deepfusion import __version__

    return {"deepfusion": __version__, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "librosa": str(librosa.__version__),
            "numpy": str(numpy.__version__), "python": platform.python_version()}


def to_cpu(obj: Any, *, copy: bool = False) -> Any:
    """``obj`` with every tensor in it (in dicts, lists and tuples, as in optimizer states)
    copied to the CPU; tensors already there are kept as they are, or with ``copy`` copied
    too (a snapshot that later in-place training steps leave as it is)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True) if copy else obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v, copy=copy) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v, copy=copy) for v in obj)
    return obj


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (tensors and plain data only) atomically, every tensor as a CPU tensor:
    the file loads with ``torch.load(path, weights_only=True)`` on any machine, whichever
    device (``cuda:1``, ``mps``) the run trained on."""
    payload = to_cpu({"format_version": FORMAT_VERSION, **payload})
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


def expected_sizes(model: torch.nn.Module, *, ema: bool = False) -> tuple[int, int]:
    """About how many bytes ``best.pth`` and ``last.pth`` of ``model`` take (AdamW: two moments
    per parameter in ``last.pth``, and the raw weights beside the averaged ones with ``ema``)."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return state + 2**20, state * (2 if ema else 1) + 2 * params + 2**20


def load_checkpoint(path: Path, *, resume: bool = False) -> dict[str, Any]:
    """Load a checkpoint without running code in it, its contents checked (:func:`check_contents`).

    Raises
    ------
    CheckpointError
        Missing, unreadable, holding objects other than tensors and plain data, of another
        format version, or with parts that disagree or lie outside sane ranges.
    """
    path = Path(path)
    check_checkpoint_path(path)
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
        if is_onnx_file(path):
            raise CheckpointError(f"{path}: an ONNX model, not a checkpoint; give --engine onnx "
                                  "to predict or embed, or the .pth it was exported from")
        raise CheckpointError(f"{path}: not a checkpoint written by deepfusion train, or a "
                              "damaged one (cut short?); give a best.pth or last.pth") from None
    if not isinstance(ckpt, dict) or "model_state" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path}: not a deepfusion checkpoint (it holds no model weights "
                              "and settings); give a best.pth or last.pth")
    if ckpt.get("format_version") != FORMAT_VERSION:
        version = ckpt.get("format_version")
        written = f"format {version}" if isinstance(version, int) else "no format number"
        raise CheckpointError(f"{path}: written by another deepfusion version ({written}; this "
                              f"one reads {FORMAT_VERSION}); train it again, or use the version "
                              "that wrote it")
    check_contents(ckpt, path, resume=resume)
    return ckpt


_RESUME_KEYS = ("epoch", "optimizer_state", "scheduler_state", "scaler_state", "rng_state",
                "history", "best_epoch", "bad_epochs")


def check_contents(ckpt: dict[str, Any], path: Path, *, resume: bool = False) -> None:
    """Check a loaded checkpoint's parts against each other and against sane ranges.

    Runs before anything is built or allocated from the file: the fields every saved model
    has (class names, feature and model configs, normalisation statistics) are checked by
    :mod:`deepfusion.models.meta`, as an ONNX model's metadata is, then every tensor of the
    model state must have the shape the model config gives it (checked on the meta device,
    which allocates nothing). ``resume`` also asks for what ``last.pth`` adds.

    Raises
    ------
    CheckpointError
        Naming ``path`` and the first part that is wrong.
    """
    def bad(message: str) -> CheckpointError:
        return CheckpointError(f"{path}: damaged or inconsistent checkpoint: {message}")

    wanted = ("class_names", "feature_config", "normalization", "train_config",
              *(_RESUME_KEYS if resume else ()))
    missing = [k for k in wanted if k not in ckpt]
    if missing:
        raise bad(f"no {', '.join(missing)}")
    described = check_description(ckpt, bad)
    try:   # the recipe: not part of what a model says of itself (no limits, runtime fields allowed)
        TrainConfig.from_dict(ckpt["train_config"])
    except (ParameterError, TypeError, ValueError, AttributeError) as exc:
        raise bad(f"train_config: {one_line(exc)}") from None
    _check_normalization(ckpt["normalization"], described, bad)
    _check_state(ckpt["model_state"], described.model_config, bad)
    if resume:
        epoch = ckpt["epoch"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 < epoch <= 100_000:
            raise bad(f"epoch {epoch!r} is not a positive whole number")
        if not isinstance(ckpt["history"], list) or len(ckpt["history"]) != epoch:
            raise bad(f"the history does not hold one row per epoch up to epoch {epoch}")


def _check_normalization(norm: Any, described, bad) -> None:
    """The statistics' views and shapes (:func:`~deepfusion.models.meta.check_normalization`),
    then their values: float tensors, finite, the standard deviations positive."""
    check_normalization(norm, described, bad)
    for key in described.keys:
        stats = norm[key]
        for stat in ("mean", "std"):
            value = stats[stat]
            if not isinstance(value, torch.Tensor):
                raise bad(f"normalization {key} {stat} is not a vector of "
                          f"{described.rows[key]} values")
            if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                raise bad(f"normalization {key} {stat} holds non-finite or non-float values")
        if not bool((stats["std"] > 0).all()):
            raise bad(f"normalization {key} std is not positive")


def _check_state(state: Any, config: ModelConfig, bad) -> None:
    """The state's tensors against a model built on the meta device (nothing allocated)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise bad("model_state is not a dict of tensors")
    with torch.device("meta"):
        model = _untrained_model(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise bad(f"model_state does not fit its {config.backbone} config "
                  f"({len(missing)} missing, {len(unexpected)} unexpected: "
                  f"{', '.join((missing + unexpected)[:3])})")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise bad(f"model_state {key} has shape {list(state[key].shape)}, the config makes {list(shape)}")
        if state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all()):
            raise bad(f"model_state {key} holds non-finite values")


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


def _untrained_model(config: ModelConfig):
    """The network or linear probe ``config`` describes, never loading ImageNet weights (a
    checkpoint's own weights replace them)."""
    from deepfusion.models.net import MultiModalNet
    from deepfusion.models.probe import LinearProbe

    if config.kind == "probe":
        return LinearProbe.from_config(config)
    return MultiModalNet(replace(config, pretrained=False))


def is_onnx_file(path: Path) -> bool:
    """Whether ``path`` is named or looks like an ONNX model (a protobuf whose first field is
    the IR version and which names its producer early)."""
    if Path(path).suffix.lower() == ".onnx":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return head[:1] == b"\x08" and any(w in head for w in (b"pytorch", b"onnx", b"ONNX"))


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded checkpoint, its fields typed: what evaluate, export, the torch engine and
    fine-tuning read of it, unpacked in one place (:meth:`from_dict`)."""

    path: Optional[Path]                  # the file it came from (None: a dict in memory)
    model_config: ModelConfig
    feature_config: FeatureConfig
    train_config: TrainConfig
    class_names: tuple[str, ...]          # in logit order
    normalization: dict[str, dict[str, np.ndarray]]   # view -> {"mean", "std"}, numpy
    model_state: dict[str, torch.Tensor]
    # as stored (None where absent): only their readers rely on them
    split: Optional[dict[str, Any]]       # {"by": "path" or "index", "train": [...], ...}
    features_file: Optional[str]          # provenance: the features file it was trained on,
    features_sha256: Optional[str]        # its digest,
    pretrained_source: Optional[str]      # where its ImageNet weights came from,
    versions: Optional[dict[str, str]]    # and the libraries that wrote it
    format_version: Optional[int]
    epoch: Optional[int]                  # of the weights held
    metrics: Optional[dict[str, Any]]

    @classmethod
    def from_dict(cls, ckpt: dict[str, Any], path: Any = None) -> "Checkpoint":
        """Unpack a checkpoint :func:`load_checkpoint` returned (checked), ``path`` its file."""
        return cls(path=Path(path) if path is not None else None,
                   model_config=model_config_of(ckpt), feature_config=feature_config_of(ckpt),
                   train_config=TrainConfig.from_dict(ckpt["train_config"]),
                   class_names=tuple(ckpt["class_names"]),
                   normalization=normalization_of(ckpt), model_state=ckpt["model_state"],
                   split=ckpt.get("split"), features_file=ckpt.get("features_file"),
                   features_sha256=ckpt.get("features_sha256"),
                   pretrained_source=ckpt.get("pretrained_source"),
                   versions=ckpt.get("versions"), format_version=ckpt.get("format_version"),
                   epoch=ckpt.get("epoch"), metrics=ckpt.get("metrics"))

    @property
    def keys(self) -> tuple[str, ...]:
        """The views the model reads, in its order (its attention's columns)."""
        return view_keys(self.model_config.pretrained_view_rows > 0)

    @property
    def rows(self) -> dict[str, int]:
        """Rows of each of the model's views (:func:`check_contents` made the model config and
        the feature config agree on them)."""
        shapes = self.feature_config.feature_shapes()
        return {k: int(shapes[k][0]) for k in self.keys}

    def segment_frames_for(self, n_frames: int) -> int:
        """Frames per segment the model classifies, of clips of ``n_frames`` frames."""
        from deepfusion.data.dataset import segment_frames

        return segment_frames(self.train_config.segment_seconds, self.feature_config, n_frames)

    @property
    def segment_frames(self) -> int:
        """Frames per segment, of clips of the feature config's length."""
        return self.segment_frames_for(self.feature_config.n_frames)

    @property
    def embedding_dim(self) -> int:
        """The width of the classifier's input (what embed writes)."""
        return int(self.model_state["classifier.weight"].shape[1])

    def build_model(self) -> torch.nn.Module:
        """The network or probe, its weights loaded, in eval mode."""
        return restore_model(self.model_config, self.model_state, self.path)


def read_checkpoint(path: Path) -> Checkpoint:
    """:func:`load_checkpoint` (the same checks, the same messages), unpacked into a
    :class:`Checkpoint`: the one reader of evaluate, export and the torch engine."""
    return Checkpoint.from_dict(load_checkpoint(path), path)


def restore_model(config: ModelConfig, state: dict[str, torch.Tensor], path: Any = None):
    """The model ``config`` describes with the weights ``state``, in eval mode (``path``: the
    file they came from, for the message of a state that does not fit)."""
    model = _untrained_model(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        where = path if path is not None else "checkpoint"
        raise CheckpointError(f"{where}: damaged or inconsistent checkpoint: its model state "
                              f"does not fit its settings ({library_text(exc, 160)})") from None
    return model.eval()


def model_from_checkpoint(ckpt: dict[str, Any], path: Any = None):
    """Rebuild the model of a loaded checkpoint dict (:meth:`Checkpoint.build_model`)."""
    return restore_model(model_config_of(ckpt), ckpt["model_state"], path)


def model_config_of(ckpt: dict[str, Any]) -> ModelConfig:
    """The model config (checkpoints written before a field existed were made without it)."""
    return ModelConfig.from_dict({**MODEL_DEFAULTS, **ckpt["model_config"]})


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
