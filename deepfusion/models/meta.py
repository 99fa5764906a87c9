"""What a saved model says of itself, checked once for checkpoints and ONNX files alike.

A checkpoint (:mod:`deepfusion.models.checkpoint`) and an exported ONNX model's ``deepfusion``
metadata (:mod:`deepfusion.inference.onnx_engine`) describe a model with the same fields: the class names
in logit order, the :class:`FeatureConfig`, the :class:`ModelConfig` and, derived from those,
the rows of each view; an ONNX model adds the rows and segment frames its graph takes, a
checkpoint the normalisation statistics. The functions here check those fields (types, sane
ranges, agreement) before anything is sized from them, so a forged checkpoint and a forged ONNX
file are refused with the same words for the same field. Each takes ``bad``, which turns a
message into the caller's exception (naming the file), and raises the first thing wrong.

This module imports neither torch nor anything that does: the onnx engine uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any, Callable, Mapping, Optional

from deepfusion.config import FeatureConfig, ModelConfig
from deepfusion.errors import ParameterError
from deepfusion.views import AUX_KEYS, MEL_KEYS, PRETRAINED_KEY

Bad = Callable[[str], Exception]

#: Ranges a model's settings must lie in before anything is sized from them: far wider than any
#: real model, so a value outside is a damaged or forged file, not a choice.
FEATURE_LIMITS = {"sample_rate": (1000, 384_000), "duration": (0.01, 3600.0),
                  "n_fft": (16, 2**16), "n_mels": (1, 1024), "n_mfcc": (1, 1024),
                  "n_chroma": (1, 120), "tempogram_win_length": (1, 8192),
                  "hpss_kernel": (1, 1023)}
MODEL_LIMITS = {"n_classes": (2, 100_000), "n_mels": (1, 1024), "embed_dim": (1, 8192),
                "aux_hidden": (1, 16_384)}
#: Samples of one decoded clip and values of one clip's views (each 1 GiB as float32).
MAX_SAMPLES = MAX_VALUES = 2**28
#: Fields a model config saved before they existed was made without.
MODEL_DEFAULTS = {"band_stats": False}


@dataclass(frozen=True)
class ModelDescription:
    """The checked common fields of a saved model."""

    class_names: list[str]            # in logit order
    feature_config: FeatureConfig
    model_config: ModelConfig
    rows: dict[str, int]              # rows of each of the model's views, in model order

    @property
    def keys(self) -> tuple[str, ...]:
        """The model's views, in the order it takes them."""
        return tuple(self.rows)


def cut(text: str, limit: int = 60) -> str:
    """``text`` on one line, cut to ``limit`` characters (a forged value can be huge)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` through :func:`cut`."""
    try:
        return cut(repr(value), limit)
    except ValueError:   # an int too long to print
        return f"<{type(value).__name__}>"


def _kind_ok(kind: str, value: Any) -> bool:
    """Whether ``value`` is of the dataclass field type ``kind`` (its annotation text)."""
    if kind.startswith("Optional[") and kind.endswith("]"):
        if value is None:
            return True
        kind = kind[len("Optional["):-1]
    whole = isinstance(value, Integral) and not isinstance(value, bool)
    if kind == "int":
        return whole
    if kind == "float":   # a whole number too long for a float is left to the range checks
        return whole or (isinstance(value, Real) and not isinstance(value, bool)
                         and math.isfinite(value))
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind.startswith("tuple[int"):
        # every tuple field is tuple[int, ...]: its length is checked against the rows it sizes
        return isinstance(value, (list, tuple)) and all(
            isinstance(v, Integral) and not isinstance(v, bool) for v in value)
    return True   # a type this check does not know: the dataclass's own checks decide


_WHAT = {"int": "a whole number", "float": "a finite number", "bool": "true or false",
         "str": "a string"}


def _what(kind: str) -> str:
    if kind.startswith("Optional["):
        return _what(kind[len("Optional["):-1]) + " or none"
    if kind.startswith("tuple[int"):
        return "a list of whole numbers"
    return _WHAT.get(kind, kind)


def check_config(name: str, cls, data: Any, bad: Bad,
                 defaults: Optional[Mapping[str, Any]] = None):
    """Rebuild the config dataclass ``cls`` from ``data`` (the field ``name`` of a saved model),
    every value of the right type first, so no dataclass check meets a string or a NaN.

    Raises
    ------
    whatever ``bad`` makes
        ``data`` not a mapping, a field unknown or of the wrong type, or the settings not valid.
    """
    if not isinstance(data, Mapping):
        raise bad(f"{name} is {type(data).__name__} {show(data)}, not a mapping of settings")
    kinds = {f.name: str(getattr(f.type, "__name__", f.type)) for f in fields(cls)}
    unknown = sorted(str(k) for k in data if k not in kinds)
    if unknown:
        raise bad(f"{name} has unknown field(s) {cut(', '.join(unknown), 120)}")
    for key, value in data.items():
        if not _kind_ok(kinds[key], value):
            raise bad(f"{name}.{key} {show(value)} is not {_what(kinds[key])}")
    try:
        return cls.from_dict({**(defaults or {}), **data})
    except (ParameterError, TypeError, ValueError) as exc:
        raise bad(f"{name}: {cut(str(exc), 200)}") from None


def _check_limits(name: str, config, limits: Mapping[str, tuple], bad: Bad) -> None:
    for key, (low, high) in limits.items():
        value = getattr(config, key)
        if not low <= value <= high:
            raise bad(f"{name}.{key} {show(value)} is outside [{low}, {high}]")


def check_description(saved: Mapping[str, Any], bad: Bad) -> ModelDescription:
    """Check the common fields of a saved model: ``class_names``, ``feature_config`` and
    ``model_config`` (types, sane ranges, and agreement: the rows of each view against the
    model's widths, the class names against its classifier).

    Parameters
    ----------
    saved : mapping
        A loaded checkpoint, or an ONNX model's metadata; the three keys must be present.
    bad : callable
        Turns a message into the exception to raise (naming the file).

    Returns
    -------
    ModelDescription
    """
    fc = check_config("feature_config", FeatureConfig, saved["feature_config"], bad)
    _check_limits("feature_config", fc, FEATURE_LIMITS, bad)
    if fc.n_samples > MAX_SAMPLES:
        raise bad(f"feature_config: clips of {fc.duration:g} s at {fc.sample_rate} Hz "
                  f"({fc.n_samples:,} samples) exceed {MAX_SAMPLES:,}")
    shapes = fc.feature_shapes()
    if sum(r * t for r, t in shapes.values()) > MAX_VALUES:
        raise bad(f"feature_config: one clip's features would hold over {MAX_VALUES:,} values")
    rows = {k: r for k, (r, _) in shapes.items()}

    mc = check_config("model_config", ModelConfig, saved["model_config"], bad, MODEL_DEFAULTS)
    _check_limits("model_config", mc, MODEL_LIMITS, bad)
    if len(mc.fusion_hidden) > 16 or any(not 1 <= h <= 65_536 for h in mc.fusion_hidden):
        raise bad(f"model_config.fusion_hidden {show(list(mc.fusion_hidden)[:20])} is not 1 to 16 "
                  "widths of 1 to 65536")
    if (mc.n_mels, *mc.aux_rows) != (rows[MEL_KEYS[0]], *(rows[k] for k in AUX_KEYS)):
        raise bad(f"model_config.n_mels, aux_rows: the model takes {mc.n_mels} mel bands and aux "
                  f"rows {list(mc.aux_rows)}, the feature config makes {rows[MEL_KEYS[0]]} "
                  f"and {[rows[k] for k in AUX_KEYS]}")
    if mc.pretrained_view_rows != rows.get(PRETRAINED_KEY, 0):
        raise bad(f"model_config.pretrained_view_rows: the model takes {mc.pretrained_view_rows} "
                  f"rows of the pretrained view, the feature config makes "
                  f"{rows.get(PRETRAINED_KEY, 0)}")

    names = check_class_names(saved["class_names"], bad)
    check_class_count(names, mc.n_classes, "a classifier of", bad)
    return ModelDescription(names, fc, mc, rows)


def check_class_names(names: Any, bad: Bad) -> list[str]:
    """``names`` as a list of distinct non-empty strings (at most :data:`MODEL_LIMITS`'s
    classes), or ``bad``'s exception naming what is wrong."""
    if not isinstance(names, (list, tuple)):
        raise bad(f"class_names is {type(names).__name__} {show(names)}, not a list of "
                  "distinct non-empty names")
    if len(names) > MODEL_LIMITS["n_classes"][1]:
        raise bad(f"class_names holds {len(names):,} names, over {MODEL_LIMITS['n_classes'][1]:,}")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise bad(f"class_names[{i}] {show(name)} is not a non-empty name (class_names is not "
                      "a list of distinct non-empty names)")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise bad(f"class_names holds {show(name)} twice (class_names is not a list of "
                      "distinct non-empty names)")
        seen.add(name)
    return list(names)


def check_class_count(names: list[str], width: int, what: str, bad: Bad) -> None:
    """As many class names as ``width`` (``what``: "a classifier of", "a graph whose logits
    output has")."""
    if len(names) != width:
        raise bad(f"class_names: {len(names)} class names for {what} {width} classes")


def check_rows(rows: Any, description: ModelDescription, bad: Bad) -> dict[str, int]:
    """``rows`` (view -> rows, as an ONNX model's metadata holds them) equal to the rows the
    feature config makes for the model's views."""
    want = description.rows
    if not isinstance(rows, Mapping) or set(rows) != set(want) or any(
            not _kind_ok("int", rows[k]) or rows[k] != r for k, r in want.items()):
        raise bad(f"rows {show(rows, 200)} are not the rows "
                  f"its feature_config makes ({show(want, 200)})")
    return {k: int(rows[k]) for k in want}


def check_segment_frames(seg: Any, description: ModelDescription, bad: Bad) -> int:
    """``seg`` a whole number of frames from 1 to a clip's frames."""
    n_frames = description.feature_config.n_frames
    if not _kind_ok("int", seg) or not 1 <= seg <= n_frames:
        raise bad(f"segment_frames {show(seg)} is not a whole number in [1, {n_frames}] (the "
                  "frames of a clip)")
    return int(seg)


def check_normalization(norm: Any, description: ModelDescription, bad: Bad) -> None:
    """``norm`` (view -> {"mean", "std"}) holding exactly the model's views, each statistic
    with a ``shape`` of ``(rows,)``; the caller checks the values (a checkpoint's are tensors)."""
    rows, keys = description.rows, description.keys
    if not isinstance(norm, Mapping) or set(norm) != set(keys):
        raise bad(f"normalization does not hold the model's views ({', '.join(keys)})")
    for key in keys:
        stats = norm[key]
        for stat in ("mean", "std"):
            value = stats.get(stat) if isinstance(stats, Mapping) else None
            if tuple(getattr(value, "shape", ())) != (rows[key],):
                raise bad(f"normalization {key} {stat} is not a vector of {rows[key]} values")


def check_checkpoint_path(path: Any) -> None:
    """What a checkpoint's path can be refused for without opening it (nor importing torch,
    which costs seconds): a folder, or no file there; the words of
    :func:`deepfusion.models.checkpoint.load_checkpoint`, which reads it.

    Raises
    ------
    CheckpointError
    """
    from pathlib import Path

    from deepfusion.errors import CheckpointError

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint; give its best.pth or last.pth")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; run deepfusion train, or give "
                              "--checkpoint")
