"""Training policy: the "auto" recipe per backbone and what a resumed run may change.

Plain settings live in :mod:`deepfusion.config`; the rules that fill and compare them live here.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Optional

from deepfusion.config import ARCHITECTURE_FIELDS, BACKBONES, ModelConfig, TrainConfig, option_name
from deepfusion.errors import ParameterError

#: Recipe defaults per backbone, chosen with ``benchmarks/generalization.py`` (see the README):
#: (epochs, batch_size, lr, patience). ResNets starting from ImageNet weights take a lower lr.
_RECIPES = {
    "light": (40, 16, 1e-3, 40),
    "resnet18": (30, 16, 3e-4, 30),
    "resnet34": (30, 16, 3e-4, 30),
    "resnet50": (30, 16, 3e-4, 30),
}
_PRETRAINED_LR = 1e-4

#: The backbone train takes when none is given, per kind of device: the reference design's
#: ResNet-50 on a CUDA GPU, the light CNN elsewhere (a CPU, a Mac's GPU), where a ResNet-50 run
#: takes hours and gigabytes. The measurements behind the choice: docs/training.md, "The
#: default recipe per device".
DEFAULT_BACKBONES = {"cuda": "resnet50"}


def default_backbone(device_type: str) -> str:
    """The backbone of a run on a device of this kind (``cpu``, ``cuda``, ``mps``) when the
    call names none (see :data:`DEFAULT_BACKBONES`)."""
    return DEFAULT_BACKBONES.get(device_type, "light")


def recipe_defaults(backbone: str, pretrained: bool) -> dict[str, Any]:
    """The "auto" values of :data:`AUTO_FIELDS` for ``backbone`` (pretrained or not)."""
    if backbone not in _RECIPES:
        raise ParameterError(f"backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
    epochs, batch_size, lr, patience = _RECIPES[backbone]
    if pretrained and backbone != "light":
        lr = _PRETRAINED_LR
    return {"epochs": epochs, "batch_size": batch_size, "lr": lr, "patience": patience}


def resolve_recipe(config: TrainConfig, backbone: str, pretrained: bool) -> TrainConfig:
    """``config`` with its "auto" fields filled by :func:`recipe_defaults`."""
    auto = recipe_defaults(backbone, pretrained)
    return replace(config, **{k: v for k, v in auto.items() if getattr(config, k) is None})


def describe_auto() -> str:
    """One line per backbone of the "auto" recipe, for --help and the start-up line."""
    parts = []
    for name in _RECIPES:
        d = recipe_defaults(name, False)
        parts.append(f"{name} {d['epochs']} epochs, batch {d['batch_size']}, lr {d['lr']:g}")
    return "; ".join(parts) + f" (lr {_PRETRAINED_LR:g} for ImageNet-pretrained ResNets)"


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
