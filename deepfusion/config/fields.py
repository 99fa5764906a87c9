"""How a config field is named on the command line and refused in one line, and how a saved
config dict is read back (unknown fields refused)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from deepfusion.errors import ParameterError

#: Config fields whose command-line flag is not their name spelled with dashes.
FLAGS = {"sample_rate": "--sr"}


def flag_of(field: str) -> str:
    """The command-line flag of a config field: ``"sample_rate"`` -> ``"--sr"``,
    ``"n_mfcc"`` -> ``"--n-mfcc"`` (:data:`FLAGS`, else :func:`option_name`)."""
    return FLAGS.get(field) or option_name(field)


def bad(field: str, value: Any, rule: str) -> ParameterError:
    """``--flag VALUE: rule``, for Python and CLI users alike; the field kept on the error."""
    shown = format(value, "g") if isinstance(value, float) else str(value)
    return ParameterError(f"{flag_of(field)} {shown}: {rule}", field=field)


def from_dict_of(cls, data: dict[str, Any]):
    """Rebuild a config dataclass from a dict, refusing unknown keys with a clear message."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ParameterError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    return cls(**data)


def option_name(field_name: str) -> str:
    """The command-line spelling of a config field (``batch_size`` -> ``--batch-size``)."""
    return "--" + field_name.replace("_", "-")
