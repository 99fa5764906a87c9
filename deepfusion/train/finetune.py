"""Fine-tuning: a new collection's model started from a trained deepfusion model.

``train --init-from other/best.pth`` builds the network ``other`` describes (backbone, widths,
band statistics) for this collection's genres and starts it from ``other``'s weights: every
branch, the modality attention and the fusion layers. The classifier keeps the rows of the
genres both collections share (matched by name) and starts the others fresh, so genres may
differ in number, names and order. ``--freeze-branches`` trains only the attention, the fusion
layers and the classifier; the frozen branches' BatchNorm statistics stay those of ``other``.
"""

from __future__ import annotations

import types
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch

from deepfusion.config import FeatureConfig, ModelConfig
from deepfusion.errors import ParameterError
from deepfusion.models.checkpoint import Checkpoint, load_checkpoint
from deepfusion.runtime import ddp

#: Modules of :class:`~deepfusion.models.net.MultiModalNet` that ``--freeze-branches`` freezes.
BRANCHES = ("mel", "aux")


def load_source(path: Path, feature_config: FeatureConfig,
                loaded: Optional[dict[str, Any]] = None) -> Checkpoint:
    """The checkpoint to start from, checked against this run's features (``loaded``: the
    file's contents, read before the run replaced it). Read and checked by rank 0 of a
    distributed run (its errors stop every rank), unpacked by each process: ranks hand each
    other plain data.

    Raises
    ------
    CheckpointError
        Not a readable deepfusion checkpoint.
    ParameterError
        A linear probe, or features computed with other settings (named).
    """
    raw = loaded if loaded is not None else ddp.on_main(load_checkpoint, Path(path))
    source = Checkpoint.from_dict(raw, path)
    ddp.on_main(_check_source, source, path, feature_config)
    return source


def _check_source(source: Checkpoint, path: Path, feature_config: FeatureConfig) -> None:
    if source.model_config.kind != "net":
        raise ParameterError(f"{path}: a linear probe has no branches to start from; "
                             "--init-from takes a network's checkpoint")
    if source.feature_config != feature_config:
        diff = feature_config.differences_text(source.feature_config, there="for the model")
        raise ParameterError(f"{path}: trained on features extracted with other settings than "
                             f"this run's ({diff}); extract this collection with the model's "
                             "settings")


def model_config_from(source: Checkpoint, *, n_classes: int, backbone: Optional[str],
                      share_backbone: bool, model_options: Optional[dict[str, Any]],
                      echo) -> ModelConfig:
    """The source's network with this collection's number of genres. Options this call gave
    that the source contradicts are ignored, said in one line each."""
    config = source.model_config
    given = {"backbone": backbone, "share_backbone": share_backbone or None,
             **{k: v for k, v in (model_options or {}).items() if v}}
    for name, value in given.items():
        if value is not None and value != getattr(config, name):
            shown = "" if isinstance(value, bool) else f" {value}"
            echo(f"ignored with --init-from: --{name.replace('_', '-')}{shown} (the model's: "
                 f"{getattr(config, name)})")
    return replace(config, n_classes=n_classes)


def initialise(model: torch.nn.Module, source: Checkpoint, class_names: list[str],
               path: Any = "--init-from") -> str:
    """Load ``source``'s weights into ``model`` (built by :func:`model_config_from`); the
    classifier rows of shared genres are copied. Returns one line saying what was kept."""
    state = source.model_state
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing = sorted(k for k in own if not k.startswith("classifier.") and k not in body)
    if missing:   # check_contents made sure of the shapes; this is a model of another layout
        raise ParameterError(f"{path}: its network has another layout (no {missing[0]}); "
                             "--init-from needs a checkpoint of this deepfusion")
    model.load_state_dict({**own, **body})
    theirs = list(source.class_names)
    shared = [g for g in class_names if g in theirs]
    with torch.no_grad():
        for g in shared:
            i, j = class_names.index(g), theirs.index(g)
            model.classifier.weight[i].copy_(state["classifier.weight"][j])
            model.classifier.bias[i].copy_(state["classifier.bias"][j])
    return (f"started from {len(theirs)}-genre model ({len(shared)} of this collection's "
            f"{len(class_names)} genres shared: "
            + (", ".join(shared) if shared else "none") + ")")


def freeze_branches(model: torch.nn.Module) -> int:
    """Stop training the branches: no gradients, BatchNorm statistics kept (the branches stay
    in eval mode whenever the model is put in training mode). Returns the parameters frozen."""
    frozen = 0
    for name in BRANCHES:
        for p in getattr(model, name).parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    # a bound method, so that a deep copy (the EMA's) is bound to the copy
    model.train = types.MethodType(_train_frozen, model)
    return frozen


def _train_frozen(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    torch.nn.Module.train(self, mode)
    if mode:
        for name in BRANCHES:
            getattr(self, name).eval()
    return self
