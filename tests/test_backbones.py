"""The backbone table (deepfusion/backbones.py): every row holds every fact, and the facts are
those of the network models/net.py builds from it."""

from __future__ import annotations

import pytest
import torch

from deepfusion import backbones
from deepfusion.backbones import BACKBONES, DEFAULT_BACKBONE, DEFAULT_BACKBONES, PRETRAINED_LR
from deepfusion.config import AUTO_FIELDS, ModelConfig
from deepfusion.errors import ParameterError
from deepfusion.models.net import CONSTRUCTORS, MelCNN, build_model, check_input_size
from deepfusion.runtime.memory import estimate_training_bytes
from deepfusion.train.recipe import recipe_defaults

#: the large ResNets take seconds to build: the quick subset builds light and resnet18
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in ("resnet34", "resnet50") else n
         for n in BACKBONES]


def _views(config: ModelConfig, batch: int, frames: int) -> dict[str, torch.Tensor]:
    rows = dict(zip(("mfcc", "chroma", "tempogram"), config.aux_rows))
    mels = {k: torch.randn(batch, config.n_mels, frames)
            for k in ("mel_spec_orig", "mel_spec_harm", "mel_spec_perc")}
    return {**mels, **{k: torch.randn(batch, r, frames) for k, r in rows.items()}}


@pytest.mark.parametrize("name", NAMES)
def test_every_backbone_builds_and_trains_at_its_minimum_mel_size(name):
    spec = backbones.backbone(name)
    size = spec.min_mel_size
    torch.manual_seed(0)
    config = ModelConfig(n_classes=3, n_mels=size, aux_rows=(4, 3, 5), backbone=name,
                         share_backbone=True)
    model = build_model(config).train()
    out = model(_views(config, batch=2, frames=size))
    out["logits"].sum().backward()
    assert out["logits"].shape == (2, 3)
    branch = model.mel["mel_spec_orig"]
    assert branch.body(torch.randn(2, 1, size, size)).shape == (2, spec.width)
    if size > 1:    # and the minimum is the least it takes
        with pytest.raises(RuntimeError):
            branch.eval()(torch.randn(1, size - 1, size - 1))


@pytest.mark.parametrize("name", ["light", "resnet18"])
def test_the_batch_of_one_rule_is_where_the_last_batchnorm_fails(name):
    """check_input_size's smallest view for a batch of one trains; the view just below it
    (when it refuses one) fails in the network's last BatchNorm."""
    spec = backbones.backbone(name)
    net = MelCNN(backbone=name, embed_dim=8).train()

    def accepted(size: int) -> bool:
        try:
            check_input_size(name, n_mels=size, frames=size, clip_frames=size, batch=1,
                             frame_seconds=0.02)
        except ParameterError:
            return False
        return True

    size = next(s for s in range(spec.min_mel_size, 200) if accepted(s))
    net(torch.randn(1, size, size))
    if size > spec.min_mel_size:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            net(torch.randn(1, size - 1, size - 1))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_row_holds_every_fact(name):
    import torchvision.models as tvm

    spec = BACKBONES[name]
    assert spec.name == name
    assert isinstance(spec.activation_bytes, int) and spec.activation_bytes > 0
    assert estimate_training_bytes(name, n_mels=128, frames=129, batch_size=16) > 0
    scratch, pretrained = recipe_defaults(name, False), recipe_defaults(name, True)
    assert set(scratch) == set(AUTO_FIELDS)
    assert all(isinstance(v, (int, float)) and v > 0 for v in scratch.values()), scratch
    assert pretrained["lr"] == (PRETRAINED_LR if spec.weights else scratch["lr"])
    assert spec.width > 0 and spec.min_mel_size >= 1 and spec.last_norm_stride >= 1
    if spec.torchvision is None:
        assert name in CONSTRUCTORS and spec.weights is None
    else:
        assert callable(getattr(tvm, spec.torchvision))
    if spec.weights is not None:
        assert getattr(tvm, spec.weights).DEFAULT.url.endswith(".pth")


def test_the_defaults_per_device_are_rows():
    assert {DEFAULT_BACKBONE, *DEFAULT_BACKBONES.values()} <= set(BACKBONES)
    assert backbones.default_backbone("cpu") == DEFAULT_BACKBONE


def test_an_unknown_backbone_is_refused_in_one_line_listing_the_choices():
    line = "backbone must be one of resnet50, resnet18, resnet34, light, got 'vgg'"
    for call in (lambda: backbones.backbone("vgg"), lambda: ModelConfig(3, backbone="vgg"),
                 lambda: recipe_defaults("vgg", False),
                 lambda: estimate_training_bytes("vgg", n_mels=1, frames=1, batch_size=1)):
        with pytest.raises(ParameterError) as info:
            call()
        assert str(info.value) == line and info.value.field == "backbone"
    with pytest.raises(ParameterError, match=r"^backbone must be one of .*, got \['light'\]$"):
        backbones.backbone(["light"])
