"""ImageNet weights of the ResNet backbones: from a file, the torch cache, or a download.

:func:`resolve_pretrained` is what train calls: mode ``auto`` takes ``--weights-path``, else the
torch hub cache, else torchvision's download (hash checked, written atomically into the cache,
bounded in time however the network behaves) and carries on from scratch with one line when
none works; ``require`` stops with that line; ``never`` loads nothing. ``DEEPFUSION_WEIGHTS_URL``
replaces the download folder (mirrors, and the tests' local servers).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

import torch

from deepfusion import backbones
from deepfusion.errors import ParameterError, WeightsNotFoundError
from deepfusion.io.atomic import library_text, os_error_reason
from deepfusion.io.names import one_line

#: environment variable that replaces the directory of the weights URL (tests, mirrors)
WEIGHTS_URL_ENV = "DEEPFUSION_WEIGHTS_URL"
_RESOLVE_MODES = ("auto", "require", "never")
_TOTAL_FACTOR = 4            # wall-clock bound of a stalled or slow download: 4 * timeout ...
_MIN_RATE = 64 * 1024        # ... unless it still receives >= 64 KiB/s (over the last timeout s)
_MAX_FACTOR = 60             # and never more than 60 * timeout in all
_TMP_PREFIX = ".deepfusion-download-"
_STALE_TMP_SECONDS = 3600


def pretrained_mode(pretrained: object) -> str:
    """``True`` -> require, ``False`` -> never, ``None`` -> auto, or a mode name as it is."""
    mode = {True: "require", False: "never", None: "auto"}.get(pretrained, pretrained)
    if mode not in ("auto", "require", "never"):
        raise ParameterError(f"pretrained must be auto, require or never, got {pretrained!r}")
    return mode


def _weights_enum(backbone: str):
    import torchvision.models as tvm

    return getattr(tvm, backbones.backbone(backbone).weights).DEFAULT


def pretrained_weights_file(backbone: str) -> Path:
    """Where torchvision keeps the ImageNet weights of ``backbone`` (the torch hub cache)."""
    name = Path(urlparse(_weights_enum(backbone).url).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def pretrained_weights_url(backbone: str) -> str:
    """The download URL of ``backbone``'s ImageNet weights (see ``DEEPFUSION_WEIGHTS_URL``)."""
    url = _weights_enum(backbone).url
    base = os.environ.get(WEIGHTS_URL_ENV, "").strip()
    if base:
        url = base.rstrip("/") + "/" + Path(urlparse(url).path).name
    return url


class WeightsFile(dict):
    """A state dict loaded from a file, which it names (for the messages of a misfit)."""

    path: Optional[Path] = None


def _load_state_file(path: Path, backbone: str) -> WeightsFile:
    """``torch.load`` of a weights file, or a :class:`WeightsNotFoundError` naming it."""
    import pickle
    import warnings

    wanted = f"give the .pth torchvision downloads for {backbone}"
    if not path.is_file():
        what = "a folder, not a weights file" if path.is_dir() else "weights file not found"
        raise _unloadable(path, what, wanted)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: noise, not news
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable weights file is the user's to fix
        # torch's text advises an unsafe load: say what the file is instead
        refused = isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc)
        what = ("not a torchvision weights file (it holds more than tensors)" if refused
                else "not a torchvision weights file, or a damaged one (cut short?)")
        raise _unloadable(path, what, wanted) from None
    if not isinstance(state, dict):
        raise _unloadable(path, f"not a torchvision weights file (it holds a {_kind(state)}, "
                          "not named tensors)", wanted)
    loaded = WeightsFile(state)
    loaded.path = path
    return loaded


def _unloadable(path: Path, reason: str, advice: str) -> WeightsNotFoundError:
    """The error of a weights file that cannot be used; ``reason`` kept apart for other lines."""
    error = WeightsNotFoundError(f"{path}: {reason}; {advice}")
    error.reason = reason
    return error


def _kind(value: object) -> str:
    """What a loaded object is, in words (not a Python type name)."""
    if isinstance(value, torch.Tensor):
        return "single tensor"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, (int, float, str, bytes)) or value is None:
        return "single value"
    return "other object"


class _GaveUp(Exception):
    """The wall-clock bound of a download ran out."""


def _failure_reason(exc: BaseException, timeout: float) -> str:
    """A short, one-line reason for a failed download."""
    import socket
    from urllib.error import HTTPError, URLError

    if isinstance(exc, _GaveUp):
        return str(exc)
    if isinstance(exc, HTTPError):
        return f"HTTP {exc.code} {exc.reason}".strip()
    if isinstance(exc, URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
        if isinstance(exc, URLError):
            return one_line(exc.reason)
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, socket.gaierror):
        return f"host not found: {library_text(exc.strerror or exc)}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, RuntimeError) and "invalid hash value" in str(exc):
        return "hash mismatch: not the file torchvision publishes"
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return one_line(f"{where}{os_error_reason(exc)}")
    return library_text(exc) if str(exc) else "failed without a reason"


def _remove_stale_downloads(checkpoints: Path) -> None:
    """Folders left by downloads of killed runs (never taken as weights: other names)."""
    import shutil

    now = time.time()
    try:
        leftovers = [p for p in checkpoints.glob(_TMP_PREFIX + "*") if p.is_dir()]
    except OSError:
        return
    for folder in leftovers:
        try:
            newest = max([folder.stat().st_mtime] + [f.stat().st_mtime for f in folder.iterdir()])
        except OSError:
            continue
        if now - newest > _STALE_TMP_SECONDS:   # a running download writes all the time
            shutil.rmtree(folder, ignore_errors=True)


def _download(url: str, dest: Path, *, timeout: float, progress: bool) -> None:
    """Download ``url`` to ``dest`` atomically, sha256-checked against the name's hash prefix.

    ``torch.hub.download_url_to_file`` runs in a daemon thread on a private folder next to
    ``dest``; every socket operation is limited to ``timeout`` seconds and the whole download to
    ``4 * timeout`` seconds unless it still receives at least 64 KiB/s (at most ``60 * timeout``).
    Only a complete, hash-checked file is renamed to ``dest``; whatever else happens (failure,
    time-out, Ctrl-C) the private folder is removed. Raises the failure's exception.
    """
    import shutil
    import socket
    import tempfile
    import threading

    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_downloads(dest.parent)
    match = torch.hub.HASH_REGEX.search(dest.name)
    hash_prefix = match.group(1) if match and match.group(1) else None
    work = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=dest.parent))
    target = work / dest.name
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            torch.hub.download_url_to_file(url, str(target), hash_prefix, progress=progress)
        except BaseException as exc:  # noqa: BLE001 - reported by the waiting thread
            outcome["error"] = exc

    def received() -> int:
        try:
            return sum(f.stat().st_size for f in work.iterdir())
        except OSError:
            return 0

    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        thread = threading.Thread(target=run, name=f"download {dest.name}", daemon=True)
        start = time.monotonic()
        thread.start()
        samples: list[tuple[float, int]] = []
        while thread.is_alive():
            thread.join(0.1)
            now = time.monotonic()
            samples.append((now, received()))
            elapsed = now - start
            if elapsed < _TOTAL_FACTOR * timeout or not thread.is_alive():
                continue
            recent = [s for t, s in samples if t >= now - timeout]
            slow = samples[-1][1] - min(recent) < _MIN_RATE * timeout
            if slow or elapsed >= _MAX_FACTOR * timeout:
                raise _GaveUp(f"timed out after {elapsed:.0f} s")
            samples = [(t, s) for t, s in samples if t >= now - 2 * timeout]
        if "error" in outcome:
            raise outcome["error"]
        os.replace(target, dest)     # atomic: dest is complete or absent
    finally:
        socket.setdefaulttimeout(old_timeout)
        # an abandoned thread writes into a deleted file and fails at its rename: harmless
        shutil.rmtree(work, ignore_errors=True)


def resolve_pretrained(backbone: str, *, mode: str = "auto", weights_path: Optional[Path] = None,
                       timeout: float = 30.0, progress: bool = True,
                       echo: Callable[[str], None] = print) -> tuple[Optional[dict], str]:
    """The ImageNet weights of ``backbone``'s torchvision ResNet and where they came from.

    ``mode``: ``"auto"`` (get them if possible, else train from scratch), ``"require"`` (fail
    without them) or ``"never"``. Looks in this order:

    1. ``weights_path`` if given: a missing or unloadable file is a
       :class:`WeightsNotFoundError` naming it in every mode (the user pointed at it);
    2. the torch hub cache file (:func:`pretrained_weights_file`, under ``$TORCH_HOME``);
    3. a download of torchvision's URL (``weights.url`` of the weights enum) into that cache,
       with a progress bar (``progress``), the sha256 prefix in the file name checked, every
       socket operation limited to ``timeout`` seconds and the whole download bounded (see
       :func:`_download`). The file appears in the cache only when complete and checked.
       The environment variable ``DEEPFUSION_WEIGHTS_URL`` (e.g. ``http://127.0.0.1:8000/``)
       replaces the URL's directory, keeping its file name: a mirror, or a test server.

    When the download fails (offline, DNS, refused, time-out, HTTP error, hash mismatch):
    ``auto`` calls ``echo`` with one line and returns ``(None, "none (<reason>)")``;
    ``require`` raises :class:`WeightsNotFoundError` (one line: cache file, URL, reason).

    Returns ``(state_dict or None, source)``; ``source`` is ``"file <path>"``,
    ``"torch cache <path>"``, ``"downloaded <url>"``, ``"none (<reason>)"`` or ``"not used"``
    (mode ``never``, and in every mode a backbone without ImageNet weights, such as ``light``).
    """
    if mode not in _RESOLVE_MODES:
        raise ParameterError(f"pretrained mode must be one of {', '.join(_RESOLVE_MODES)}, got {mode!r}")
    if not timeout > 0:
        raise ParameterError(f"download timeout must be positive, got {timeout!r}")
    spec = backbones.BACKBONES.get(backbone)
    no_weights = spec is not None and spec.weights is None
    if no_weights or mode == "never":
        if weights_path is not None:
            why = (f"backbone {backbone} has no ImageNet weights" if no_weights
                   else "--no-pretrained")
            echo(f"warning: --weights-path: ignored ({why})")
        return None, "not used"
    if spec is None:
        raise ParameterError(f"no pretrained weights exist for backbone {backbone!r}")
    if weights_path is not None:
        path = Path(weights_path)
        return _load_state_file(path, backbone), f"file {path}"
    cached = pretrained_weights_file(backbone)
    if cached.is_file():
        try:
            return _load_state_file(cached, backbone), f"torch cache {cached}"
        except WeightsNotFoundError as exc:
            what = (f"{cached}: ImageNet weights for {backbone} in the torch cache that cannot "
                    f"be loaded: {getattr(exc, 'reason', exc)}")
            if mode == "require":
                raise WeightsNotFoundError(f"{what}; delete the file to download it again, or "
                                           "give --weights-path FILE, or --no-pretrained") from None
            echo(f"warning: {what}; training from scratch; delete the file to download it "
                 "again, or give --weights-path FILE, or --no-pretrained")
            return None, f"none (unreadable file in the torch cache: {cached})"
    url = pretrained_weights_url(backbone)
    try:
        _download(url, cached, timeout=timeout, progress=progress)
        state = _load_state_file(cached, backbone)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        reason = ("the downloaded file cannot be loaded" if isinstance(exc, WeightsNotFoundError)
                  else _failure_reason(exc, timeout))
        if mode == "require":
            raise WeightsNotFoundError(
                f"--pretrained: no ImageNet weights for {backbone} in the torch cache ({cached}), "
                f"and the download from {url} failed ({reason}); give --weights-path FILE, or "
                "--no-pretrained") from None
        echo(f"warning: ImageNet weights for {backbone} could not be downloaded ({reason}); "
             "training from scratch; give --weights-path FILE, or --no-pretrained to skip the "
             "download")
        return None, f"none ({reason})"
    return state, f"downloaded {url}"


def load_pretrained_state(backbone: str, weights_path: Optional[Path] = None) -> dict:
    """ImageNet weights of a torchvision ResNet, from ``weights_path`` or the local torch cache.

    The former loader, kept for callers of ``build_model(weights_path=...)``: like
    :func:`resolve_pretrained` with mode ``require`` but never downloads. Raises
    :class:`WeightsNotFoundError` naming the missing file.
    """
    spec = backbones.BACKBONES.get(backbone)
    if spec is None or spec.weights is None:
        raise WeightsNotFoundError(f"no pretrained weights exist for backbone {backbone!r}")
    if weights_path is not None:
        return _load_state_file(Path(weights_path), backbone)
    path = pretrained_weights_file(backbone)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{path}: ImageNet weights for {backbone} not found; put the file there, or give "
            "--weights-path FILE, or --no-pretrained")
    return _load_state_file(path, backbone)
