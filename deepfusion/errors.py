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


class DeviceError(ParameterError):
    """A device asked for is not on this machine (no CUDA, no GPU of that index, no MPS), or a
    precision it does not compute natively."""


class DeviceMemoryError(DeepFusionError):
    """The device ran out of memory; the message names the device and the settings to lower."""


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


class ExportError(DeepFusionError):
    """A model cannot be exported to ONNX (exporter missing or failing), or the exported graph
    does not compute what the checkpoint's model computes."""


class OnnxModelError(DeepFusionError):
    """An ONNX model cannot be used: onnxruntime is missing, or the file is not a deepfusion
    ONNX model (unreadable, damaged, or without deepfusion's metadata)."""


class OutputError(DeepFusionError):
    """An output file cannot be written (read-only folder, full disk, ...)."""


class ClusterError(DeepFusionError):
    """A compute cluster cannot be used (package missing, scheduler unreachable, no shared
    folder)."""


class WorkerCrashError(DeepFusionError):
    """A worker process died (a crash in a decoding library, the out-of-memory killer): the
    run stops; what finished is in the cache, so running the same command again continues."""


def worker_crash(exc: BaseException, what: str) -> WorkerCrashError:
    """The one line for joblib's TerminatedWorkerError (or a broken process pool)."""
    import re

    codes = re.findall(r"SIG[A-Z]+|exit code[s]? \S+", str(exc))
    how = f" ({', '.join(dict.fromkeys(codes))})" if codes else ""
    return WorkerCrashError(
        f"a worker process died while {what}{how}; the files finished so far are cached: run "
        "the same command again to continue (if it recurs, --jobs 1 shows which file it was "
        "on; too little memory for --jobs workers can do this too)")
