"""Training policy: the "auto" recipe per backbone and what a resumed run may change.

Plain settings live in :mod:`deepfusion.config`; the rules that fill and compare them live here.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Optional

from deepfusion import backbones
from deepfusion.config import (ARCHITECTURE_FIELDS, AUTO_FIELDS, ModelConfig, TrainConfig,
                               option_name)
from deepfusion.errors import ParameterError


def recipe_defaults(backbone: str, pretrained: bool) -> dict[str, Any]:
    """The "auto" values of :data:`AUTO_FIELDS` for ``backbone`` (pretrained or not): its row
    of :data:`deepfusion.backbones.BACKBONES`; from ImageNet weights, a lower lr."""
    spec = backbones.backbone(backbone)
    auto = {k: getattr(spec, k) for k in AUTO_FIELDS}
    if pretrained and spec.weights is not None:
        auto["lr"] = backbones.PRETRAINED_LR
    return auto


def resolve_recipe(config: TrainConfig, backbone: str, pretrained: bool) -> TrainConfig:
    """``config`` with its "auto" fields filled by :func:`recipe_defaults`."""
    auto = recipe_defaults(backbone, pretrained)
    return replace(config, **{k: v for k, v in auto.items() if getattr(config, k) is None})


def describe_auto() -> str:
    """One line per backbone of the "auto" recipe, for --help and the start-up line."""
    parts = []
    for name in backbones.BACKBONES:
        d = recipe_defaults(name, False)
        parts.append(f"{name} {d['epochs']} epochs, batch {d['batch_size']}, lr {d['lr']:g}")
    return "; ".join(parts) + f" (lr {backbones.PRETRAINED_LR:g} for ImageNet-pretrained ResNets)"


# ----------------------------------------------------------------------------------- resuming

#: Recipe fields a resumed run may change.
RESUME_CHANGEABLE = ("epochs", "patience")
#: What runs saved before a field existed did (their train_config lacks the key).
_LEGACY_RECIPE = {"model": "net", "select": "val_acc", "ema": 0.0, "mixup": 0.0,
                  "freq_mask": 0.0, "time_mask": 0.0, "tilt_db": 0.0}


def resume_recipe(stored: dict[str, Any], given: TrainConfig, *, epochs_done: int
                  ) -> tuple[TrainConfig, list[str]]:
    """The recipe a resumed run continues with, and one line per thing to say.

    The run keeps its recipe. ``epochs`` and ``patience`` given (not None) replace the stored
    ones: a larger ``epochs`` extends the run. Any other field given with a value other than
    its default and the run's own is named as ignored. (The :class:`RuntimeConfig` is not part
    of the recipe: a resumed run always takes the new call's.)

    Raises
    ------
    ParameterError
        ``epochs`` below the epochs already trained.
    """
    old = TrainConfig.from_dict({**_LEGACY_RECIPE, **stored})
    notes: list[str] = []
    changes: dict[str, Any] = {}
    if given.epochs is not None and given.epochs != old.epochs:
        if given.epochs < epochs_done:
            raise ParameterError(f"--epochs {given.epochs} with --resume: the run has already "
                                 f"trained {epochs_done} epochs; give --epochs "
                                 f"{epochs_done + 1} or more to extend it", field="epochs")
        changes["epochs"] = given.epochs
        notes.append(f"epochs: {old.epochs} -> {given.epochs}; the cosine learning-rate schedule "
                     f"is that of a {given.epochs}-epoch run from epoch {epochs_done + 1} on")
    if given.patience is not None and given.patience != old.patience:
        changes["patience"] = given.patience
        notes.append(f"patience: {old.patience} -> {given.patience}")
    default = TrainConfig()
    ignored = [f"{option_name(f.name)} {getattr(given, f.name)} (the run's: {getattr(old, f.name)})"
               for f in fields(TrainConfig) if f.name not in RESUME_CHANGEABLE
               and getattr(given, f.name) != getattr(default, f.name)
               and getattr(given, f.name) != getattr(old, f.name)]
    if ignored:
        notes.append("ignored with --resume, the run keeps its own settings: " + ", ".join(ignored))
    return replace(old, **changes), notes


def resume_model(mc: dict[str, Any], backbone: Optional[str],
                 model_options: Optional[dict[str, Any]]) -> tuple[str, bool, dict[str, Any], list[str]]:
    """The network a resumed run continues: its stored model config ``mc`` wins over what
    the command gave (each overruled option named in a note). Returns ``(backbone,
    share_backbone, model_options, notes)``."""
    notes: list[str] = []
    if backbone is not None and backbone != mc["backbone"]:
        notes.append(f"ignored with --resume: --backbone {backbone} (the run's: {mc['backbone']})")
    backbone, share_backbone = mc["backbone"], mc["share_backbone"]
    stored = {"band_stats": bool(mc.get("band_stats", False))}
    default_bs = ModelConfig.__dataclass_fields__["band_stats"].default
    given_bs = (model_options or {}).get("band_stats", default_bs)
    if given_bs != default_bs and given_bs != stored["band_stats"]:
        notes.append(f"ignored with --resume: --{'' if given_bs else 'no-'}band-stats "
                     f"(the run's: {'on' if stored['band_stats'] else 'off'})")
    # the run's own widths too (a fine-tuned run took them from its source)
    model_options = {**{k: mc[k] for k in ARCHITECTURE_FIELDS if k in mc}, **stored}
    return backbone, share_backbone, model_options, notes
