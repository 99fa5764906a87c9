"""What a backbone is: one row of :data:`BACKBONES` per CNN a mel branch can be.

A row is plain data (no torch here): the width of the CNN's pooled output, the smallest mel
view it takes, what training needs of the batch, the torchvision ResNet and ImageNet weights
behind it (if any), the activation memory of a training step, and its "auto" training recipe.
:mod:`deepfusion.models.net` builds the network a row names, :mod:`deepfusion.models.weights`
fetches its weights, :mod:`deepfusion.runtime.memory` estimates its memory and
:mod:`deepfusion.train.recipe` fills the auto recipe from it. Adding a backbone: its row here,
and its constructor in ``models/net.py`` unless torchvision builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from deepfusion.errors import ParameterError


@dataclass(frozen=True)
class Backbone:
    """One backbone: how to build it, what it takes, what it costs, how it trains by default."""

    name: str
    #: features of the CNN's pooled output (the input of the branch's projection)
    width: int
    #: the smallest mel view (bands and frames) it takes
    min_mel_size: int
    #: how many times smaller, per axis, the input of its last BatchNorm is than the mel view:
    #: in training that BatchNorm needs more than one value per channel over the batch
    last_norm_stride: int
    #: bytes autograd keeps per input value (one mel band x one frame) of one mel branch in
    #: float32 training: the slope of the saved tensors' size with the input's, measured with
    #: ``torch.autograd.graph.saved_tensors_hooks``; ``benchmarks/gpu_check.sh`` prints the
    #: peak device memory of training beside train's estimate from it
    activation_bytes: int
    #: the auto recipe (the TrainConfig fields left None), chosen with
    #: ``benchmarks/generalization.py`` (see the README)
    epochs: int
    batch_size: int
    lr: float
    patience: int
    #: the torchvision.models ResNet constructor (MelCNN swaps its stem for one channel and
    #: drops its classifier); None: built by ``models/net.py`` itself
    torchvision: Optional[str] = None
    #: the torchvision weights enum of its ImageNet weights; None: it has none
    weights: Optional[str] = None


#: Every backbone by name, in the order the options list them. The light CNN halves its view
#: four times, its last BatchNorm before the fourth; a ResNet takes any size, but its last
#: BatchNorm sees the view 32 times smaller per axis.
BACKBONES = {b.name: b for b in (
    Backbone("resnet50", width=2048, min_mel_size=1, last_norm_stride=32, activation_bytes=1680,
             epochs=30, batch_size=16, lr=3e-4, patience=30,
             torchvision="resnet50", weights="ResNet50_Weights"),
    Backbone("resnet18", width=512, min_mel_size=1, last_norm_stride=32, activation_bytes=430,
             epochs=30, batch_size=16, lr=3e-4, patience=30,
             torchvision="resnet18", weights="ResNet18_Weights"),
    Backbone("resnet34", width=512, min_mel_size=1, last_norm_stride=32, activation_bytes=630,
             epochs=30, batch_size=16, lr=3e-4, patience=30,
             torchvision="resnet34", weights="ResNet34_Weights"),
    Backbone("light", width=128, min_mel_size=16, last_norm_stride=8, activation_bytes=340,
             epochs=40, batch_size=16, lr=1e-3, patience=40),
)}

#: The auto lr of every backbone that starts from its ImageNet weights (``weights``).
PRETRAINED_LR = 1e-4

#: The backbone train takes when none is given, per kind of device: the reference design's
#: ResNet-50 on a CUDA GPU, the light CNN elsewhere (a CPU, a Mac's GPU), where a ResNet-50 run
#: takes hours and gigabytes. The measurements behind the choice: docs/training.md, "The
#: default recipe per device".
DEFAULT_BACKBONES = {"cuda": "resnet50"}
#: ... and on any other kind of device
DEFAULT_BACKBONE = "light"


def backbone(name: str) -> Backbone:
    """The row of ``name``; a :class:`ParameterError` listing the choices for any other name."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise ParameterError(f"backbone must be one of {', '.join(BACKBONES)}, got {name!r}",
                             field="backbone") from None


def default_backbone(device_type: str) -> str:
    """The backbone of a run on a device of this kind (``cpu``, ``cuda``, ``mps``) when the
    call names none (see :data:`DEFAULT_BACKBONES`)."""
    return DEFAULT_BACKBONES.get(device_type, DEFAULT_BACKBONE)
