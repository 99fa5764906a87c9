"""Branches, modality attention and the fused multi-modal network.

Inputs are the feature views of a batch of segments (normalised, see ``deepfusion.data.dataset``),
one branch per view, by the view's kind (:data:`deepfusion.views.VIEWS`)::

    mel views: mel_spec_orig, _harm, _perc       (B, n_mels, T)   -> a MelCNN branch each
    vector views: mfcc, chroma, tempogram        (B, rows, T)     -> an AuxiliaryFeatureMLP each
    musicnn (the pretrained view, if the model   (B, rows, P)     -> one more AuxiliaryFeatureMLP
             has it: ``pretrained_view_rows``)

Each branch maps its input to an embedding of ``embed_dim``; attention gives each of the six
(or seven) embeddings a weight per clip (softmax over modalities); the weighted embeddings are concatenated
and classified by fully-connected fusion layers. ``forward`` returns ``{'logits', 'attention',
'embedding'}``: the embedding is the classifier's input (what ``deepfusion embed`` writes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from deepfusion import backbones
from deepfusion.config import ModelConfig
from deepfusion.errors import ParameterError, WeightsNotFoundError
from deepfusion.io.names import one_line
from deepfusion.models.weights import load_pretrained_state
from deepfusion.views import BY_NAME, MEL, model_rows


def _light_cnn() -> nn.Module:
    """A small CNN for CPUs: four conv blocks, about 0.1 M parameters."""
    layers: list[nn.Module] = []
    channels = [1, 16, 32, 64, 128]
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


#: The constructors of the backbones torchvision does not build (the rows of
#: :data:`deepfusion.backbones.BACKBONES` without ``torchvision``), by name: each returns a
#: module (B, 1, n_mels, T) -> (B, width), ``width`` its row's.
CONSTRUCTORS = {"light": _light_cnn}


def check_input_size(backbone: str, *, n_mels: int, frames: int, clip_frames: int,
                     batch: int, frame_seconds: float) -> None:
    """Refuse, before any work, mel views the backbone cannot take.

    ``frames`` is the segment length (at most ``clip_frames``, a whole clip), ``batch`` the
    largest training batch, ``frame_seconds`` the hop in seconds (for the advice).

    Raises
    ------
    ParameterError
        Saying what to change: more mel bands, longer segments or clips, or a larger batch.
    """
    spec = backbones.backbone(backbone)
    need = spec.min_mel_size
    if n_mels < need:
        raise ParameterError(f"the features have {n_mels} mel bands; backbone {backbone} needs at "
                             f"least {need} (extract with --n-mels {need} or more)")
    if frames < need:
        if frames >= clip_frames:
            advice = f"extract with --duration {need * frame_seconds:.2f} or more"
        else:
            advice = f"use --segment-seconds {math.ceil(need * frame_seconds * 100) / 100:g} or more"
        raise ParameterError(f"segments of {frames} frames ({frames * frame_seconds:.3f} s) are "
                             f"too short for backbone {backbone}, which needs at least {need}; "
                             + advice)
    stride = spec.last_norm_stride
    if batch * math.ceil(n_mels / stride) * math.ceil(frames / stride) < 2:
        raise ParameterError(f"backbone {backbone} cannot train on batches of one {n_mels} x "
                             f"{frames} segment (its last BatchNorm would see one value); use "
                             "--batch-size 2 or more (and at least 2 training clips)")


class MelCNN(nn.Module):
    """A CNN over one mel view: (B, n_mels, T) -> (B, embed_dim).

    ``backbone`` names a row of :data:`deepfusion.backbones.BACKBONES`: a torchvision ResNet with
    a one-channel stem (pretrained RGB stem weights are summed over colour channels), or one of
    :data:`CONSTRUCTORS` (``light``). With ``band_stats`` (``n_mels`` > 0) the mean and
    standard deviation over time of every mel band join the CNN's pooled output before the
    projection: the long-term spectral shape, which global pooling of the CNN blurs.
    """

    def __init__(self, *, backbone: str, embed_dim: int, pretrained_state: Optional[dict] = None,
                 band_stats: int = 0):
        super().__init__()
        self.band_stats = band_stats
        spec = backbones.backbone(backbone)
        if spec.torchvision is None:
            self.body = CONSTRUCTORS[backbone]()
        else:
            import torchvision.models as tvm

            net = getattr(tvm, spec.torchvision)(weights=None)
            if pretrained_state is not None:
                net.load_state_dict(pretrained_state)
            stem = net.conv1.weight.detach().sum(dim=1, keepdim=True)   # RGB -> one channel
            net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
            net.conv1.weight.data.copy_(stem)
            net.fc = nn.Identity()
            self.body = net
        self.proj = nn.Sequential(nn.Linear(spec.width + 2 * band_stats, embed_dim),
                                  nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one channel: this tensor is contiguous in channels_last order too, so a
        # channels_last model needs no conversion of its input
        pooled = self.body(x.unsqueeze(1))                  # (B, width)
        if self.band_stats:
            std, mean = torch.std_mean(x.float(), dim=-1, correction=0)     # (B, n_mels) each
            pooled = torch.cat([pooled, mean.to(pooled.dtype), std.to(pooled.dtype)], dim=-1)
        return self.proj(pooled)                            # (B, embed_dim)


class AuxiliaryFeatureMLP(nn.Module):
    """Time-pooled statistics of a feature through a small MLP: (B, rows, T) -> (B, embed_dim).

    The statistics are the mean, standard deviation, minimum and maximum of every row over time.
    """

    def __init__(self, *, rows: int, hidden: int, embed_dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4 * rows, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, embed_dim), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std, mean = torch.std_mean(x, dim=-1, correction=0)          # (B, rows) each
        stats = torch.cat([mean, std, x.amax(dim=-1), x.amin(dim=-1)], dim=-1)  # (B, 4*rows)
        return self.net(stats)                                        # (B, embed_dim)


class ModalityAttention(nn.Module):
    """One score per modality embedding, softmax over modalities, embeddings scaled by weight."""

    def __init__(self, *, embed_dim: int, hidden: int = 128):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # emb: (B, M, D)
        weights = torch.softmax(self.score(emb).squeeze(-1).float(), dim=-1)   # (B, M)
        return emb * weights.unsqueeze(-1).to(emb.dtype), weights            # (B, M, D), (B, M)


class MultiModalNet(nn.Module):
    """A CNN branch per mel view and an MLP per other view (the three auxiliary ones, and the
    pretrained view's), fused through modality attention."""

    def __init__(self, config: ModelConfig, *, pretrained_state: Optional[dict] = None):
        super().__init__()
        self.config = config
        d = config.embed_dim
        def branch():
            return MelCNN(backbone=config.backbone, embed_dim=d, pretrained_state=pretrained_state,
                          band_stats=config.n_mels if config.band_stats else 0)
        rows = model_rows(config.n_mels, config.aux_rows, config.pretrained_view_rows)
        #: the views this model reads, in the order of its attention's columns
        self.keys = tuple(rows)
        mel_keys = [k for k in rows if BY_NAME[k].kind == MEL]
        shared = branch() if config.share_backbone else None
        self.mel = nn.ModuleDict({k: branch() if shared is None else shared for k in mel_keys})
        self.aux = nn.ModuleDict({
            k: AuxiliaryFeatureMLP(rows=r, hidden=config.aux_hidden, embed_dim=d,
                                   dropout=config.dropout)
            for k, r in rows.items() if k not in self.mel})
        self.attention = ModalityAttention(embed_dim=d)
        layers: list[nn.Module] = []
        width = d * len(self.keys)
        for h in config.fusion_hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(config.dropout)]
            width = h
        self.fusion = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, config.n_classes)

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        emb = [(self.mel[k] if k in self.mel else self.aux[k])(x[k]) for k in self.keys]
        emb = torch.stack(emb, dim=1)                       # (B, M, D), M = len(self.keys)
        weighted, attention = self.attention(emb)           # (B, M, D), (B, M)
        fused = self.fusion(weighted.flatten(1))            # (B, fusion_hidden[-1])
        return {"logits": self.classifier(fused),           # (B, n_classes)
                "attention": attention,                     # (B, M), rows sum to 1
                "embedding": fused}                         # (B, fusion_hidden[-1])


def build_model(config: ModelConfig, *, pretrained_state: Optional[dict] = None,
                weights_path: Optional[Path] = None) -> MultiModalNet:
    """Build the network, its ResNet branches started from ``pretrained_state`` if given.

    ``pretrained_state`` is what :func:`resolve_pretrained` returned (the caller resolved it);
    it is used as given, whatever ``config.pretrained`` says. Without it, ``config.pretrained``
    loads the ImageNet weights from ``weights_path`` or the torch cache, never downloading
    (the former behaviour; a missing file is a :class:`WeightsNotFoundError`). Weights that do
    not fit the backbone are a :class:`WeightsNotFoundError` too.
    """
    if pretrained_state is not None and weights_path is not None:
        raise ParameterError("build_model: give pretrained_state or weights_path, not both")
    has_weights = backbones.backbone(config.backbone).weights is not None
    if pretrained_state is not None and not has_weights:
        raise ParameterError(f"backbone {config.backbone} has no pretrained weights; "
                             "pretrained_state must be None")
    state = pretrained_state
    if state is None and config.pretrained and has_weights:
        state = load_pretrained_state(config.backbone, weights_path)
    if state is None:
        return MultiModalNet(config)
    misfit = _misfit(config.backbone, state)
    if misfit:
        path = getattr(state, "path", None)
        where = f"{path}: not" if path is not None else "the pretrained state is not"
        advice = ("a deepfusion checkpoint goes to --init-from" if "model_state" in state
                  else f"give the .pth torchvision downloads for {config.backbone}")
        raise WeightsNotFoundError(f"{where} torchvision's ImageNet weights for "
                                   f"{config.backbone} ({misfit}); {advice}")
    try:
        return MultiModalNet(config, pretrained_state=state)
    except (RuntimeError, TypeError) as exc:  # load_state_dict of a wrong file
        raise WeightsNotFoundError(f"the pretrained weights do not fit {config.backbone}: "
                                   f"{one_line(exc, 300)}") from None


def _misfit(backbone: str, state: dict) -> str:
    """What keeps ``state`` from being the ImageNet state dict of ``backbone``'s ResNet
    ("no conv1.weight and 101 more", "fc.weight of shape 10x512, not 1000x512"), or ""."""
    import torchvision.models as tvm

    with torch.device("meta"):   # the names and shapes only: nothing allocated
        resnet = getattr(tvm, backbones.backbone(backbone).torchvision)
        wanted = resnet(weights=None).state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return f"no {missing[0]}{more}"
    extra = [k for k in state if k not in wanted]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        return f"it also holds {extra[0]}{more}"
    def shape(t: torch.Tensor) -> str:
        return "x".join(map(str, t.shape)) or "1"

    for key, tensor in wanted.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            return f"{key} is not a tensor"
        if value.shape != tensor.shape:
            return f"{key} of shape {shape(value)}, not {shape(tensor)}"
    return ""


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (shared modules counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
