"""ModelConfig: the network (backbone, widths, the views' rows)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from deepfusion import backbones
from deepfusion.config.features import FeatureConfig
from deepfusion.config.fields import from_dict_of
from deepfusion.errors import ParameterError
from deepfusion.views import AUX_KEYS

#: What ``train`` fits: the multi-modal network, or the linear probe baseline.
MODEL_KINDS = ("net", "probe")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a :class:`~deepfusion.models.net.MultiModalNet`.

    ``aux_rows`` gives the number of rows of each vector view (:data:`AUX_KEYS`: MFCC,
    chroma, tempogram), ``n_mels`` the height of the mel views; both come from the features
    (:func:`deepfusion.views.model_rows`).
    """

    n_classes: int
    n_mels: int = 128
    #: "net" (the multi-modal network) or "probe" (the linear probe baseline)
    kind: str = "net"
    aux_rows: tuple[int, ...] = tuple(FeatureConfig().feature_shapes()[k][0] for k in AUX_KEYS)
    backbone: str = "resnet50"
    share_backbone: bool = False
    pretrained: bool = False
    embed_dim: int = 256
    aux_hidden: int = 128
    fusion_hidden: tuple[int, ...] = (512, 256)
    dropout: float = 0.3
    #: each mel branch also sees the mean and standard deviation over time of every band
    band_stats: bool = False
    #: rows of the pretrained view (0: the model has no branch for it)
    pretrained_view_rows: int = 0

    def __post_init__(self) -> None:
        backbones.backbone(self.backbone)   # one of deepfusion.backbones.BACKBONES
        if self.kind not in MODEL_KINDS:
            raise ParameterError(f"model kind must be one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")
        if self.n_classes < 2:
            raise ParameterError(f"need at least 2 classes, got {self.n_classes}")
        if not 0 <= self.dropout < 1:
            raise ParameterError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.pretrained_view_rows, int) or isinstance(self.pretrained_view_rows, bool) \
                or self.pretrained_view_rows < 0:
            raise ParameterError(f"pretrained_view_rows must be an integer >= 0, got "
                                 f"{self.pretrained_view_rows!r}")
        # tuples survive asdict -> torch.save -> load as lists; normalise them back
        object.__setattr__(self, "aux_rows", tuple(int(r) for r in self.aux_rows))
        object.__setattr__(self, "fusion_hidden", tuple(int(h) for h in self.fusion_hidden))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return from_dict_of(cls, data)


#: ModelConfig fields beyond the backbone that shape a network's weights (or its dropout) and
#: that no command-line option sets except --band-stats: a resumed or fine-tuned run takes
#: them from its checkpoint.
ARCHITECTURE_FIELDS = ("band_stats", "embed_dim", "aux_hidden", "fusion_hidden", "dropout")
