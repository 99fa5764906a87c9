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
    """A configuration value or argument is out of its valid range.

    ``field`` names the config field at fault where there is one (``"n_mfcc"``), for callers
    that map it to their own names; the message speaks of it by its command-line flag.
    """

    exit_code = 2

    def __init__(self, *args: object, field: str | None = None):
        super().__init__(*args)
        self.field = field


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
    """A compute cluster cannot be used (package missing, scheduler unreachable or silent, no
    worker, no shared folder): refused before any work."""


#: Exit status of a run stopped partway by a fault outside it (a worker process that died, a
#: Dask scheduler lost): what finished is cached, so the same command continues. sysexits.h's
#: EX_TEMPFAIL ("try again later"), beside 70 (EX_SOFTWARE) for an internal error.
EXIT_RETRY = 75


class ClusterLostError(ClusterError):
    """The connection to the Dask scheduler broke mid-run (the scheduler stopped, the network
    failed): the run stops; what finished is in the cache, so running the same command again
    (with the scheduler back) continues."""

    exit_code = EXIT_RETRY


class WorkerCrashError(DeepFusionError):
    """A worker process died (a crash in a decoding library, the out-of-memory killer, a
    preempted cluster worker): the run stops; what finished is in the cache, so running the
    same command again continues."""

    exit_code = EXIT_RETRY


#: What a worker's fatal signal usually means, for the one line.
_SIGNALS = {
    "SIGKILL": "killed with SIGKILL, most often by the out-of-memory killer",
    "SIGSEGV": "crashed with SIGSEGV, a fault in native code such as an audio decoder",
    "SIGBUS": "crashed with SIGBUS, a fault in native code or a file truncated while mapped",
    "SIGILL": "crashed with SIGILL, native code built for another CPU",
    "SIGFPE": "crashed with SIGFPE, a fault in native code",
    "SIGABRT": "aborted with SIGABRT, a failed check in native code",
    "SIGTERM": "stopped with SIGTERM, by another program or a job limit",
}


def death_cause(text: str) -> str:
    """How a worker process died, in words, from the text joblib (loky) or a process pool
    gives, e.g. ``"... The exit codes of the workers are {SIGSEGV(-11)}"``; "" if it names no
    signal or status."""
    import re

    causes = []
    for name, code in re.findall(r"\b([A-Z]+)\((-?\d+)\)", text):
        if name.startswith("SIG"):
            causes.append(_SIGNALS.get(name, f"killed with {name}"))
        elif code.lstrip("-").isdigit() and int(code) > 0:
            causes.append(f"exited with status {code}")
    if not causes:       # a signal named some other way ("terminated by SIGKILL")
        causes = [_SIGNALS.get(name, f"killed with {name}")
                  for name in re.findall(r"\bSIG[A-Z]+\b", text)]
    return "; ".join(dict.fromkeys(causes))


def worker_crash(exc: BaseException, what: str) -> WorkerCrashError:
    """The one line for joblib's TerminatedWorkerError (or a broken process pool).

    ``what`` says what the workers were doing ("extracting"). The line gives how the worker
    died (the signal, in words), that finished files are kept, and what to do.
    """
    cause = death_cause(str(exc))
    advice = ("fewer --jobs leave each worker more memory" if "memory" in cause or not cause
              else "a damaged file is likely crashing its decoder: it is one of the files the "
                   "runs never finish")
    return WorkerCrashError(
        f"a worker process died while {what}" + (f" ({cause})" if cause else "")
        + f"; the files finished so far are cached: run the same command again to continue "
        f"(if it recurs, {advice})")
