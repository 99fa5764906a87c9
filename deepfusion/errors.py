"""The exception tree.

Every error a user can cause derives from :class:`DeepFusionError`; its message names the
file or value at fault and, where it helps, what to do. The CLI prints ``str(error)`` as one
line and exits non-zero; Python callers can catch the specific class.
"""

from __future__ import annotations


class DeepFusionError(Exception):
    """Base class of every error deepfusion raises on purpose."""

    exit_code = 1


class ParameterError(DeepFusionError, ValueError):
    """A configuration value or argument is out of its valid range."""

    exit_code = 2


class AudioError(DeepFusionError):
    """An audio file cannot be used (missing, undecodable, empty, too short).

    ``path`` and ``reason`` are kept apart so that batch reports can print a relative path.
    """

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class DatasetError(DeepFusionError):
    """A dataset folder, manifest or split file is missing, empty or inconsistent."""

    exit_code = 2


class FeaturesFileError(DeepFusionError):
    """A features file is missing, unreadable, unsafe or not in the expected format."""


class CheckpointError(DeepFusionError):
    """A checkpoint is missing, unreadable, unsafe or incompatible."""


class WeightsNotFoundError(DeepFusionError):
    """Pretrained weights were asked for but are not available offline."""


class OutputError(DeepFusionError):
    """An output file cannot be written (read-only folder, full disk, ...)."""


class ClusterError(DeepFusionError):
    """A compute cluster cannot be used (package missing, scheduler unreachable, no shared
    folder)."""
