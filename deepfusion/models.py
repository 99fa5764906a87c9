"""Branches, modality attention and the fused multi-modal network.

Inputs are the six feature views of a batch of segments (normalised, see ``deepfusion.data``)::

    mel_spec_orig, mel_spec_harm, mel_spec_perc  (B, n_mels, T)   -> three MelCNN branches
    mfcc, chroma, tempogram                      (B, rows, T)     -> three AuxiliaryFeatureMLPs

Each branch maps its input to an embedding of ``embed_dim``; attention gives each of the six
embeddings a weight per clip (softmax over modalities); the weighted embeddings are concatenated
and classified by fully-connected fusion layers. ``forward`` returns ``{'logits', 'attention'}``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

import torch
from torch import nn

from .config import AUX_KEYS, FEATURE_KEYS, MEL_KEYS, ModelConfig
from .errors import ParameterError, WeightsNotFoundError

_RESNETS = {"resnet18": ("resnet18", "ResNet18_Weights", 512),
            "resnet34": ("resnet34", "ResNet34_Weights", 512),
            "resnet50": ("resnet50", "ResNet50_Weights", 2048)}


def _light_cnn() -> tuple[nn.Module, int]:
    """A small CNN for CPUs: four conv blocks, about 0.1 M parameters."""
    layers: list[nn.Module] = []
    channels = [1, 16, 32, 64, 128]
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), channels[-1]


# --------------------------------------------------------------------------- pretrained weights

#: environment variable that replaces the directory of the weights URL (tests, mirrors)
WEIGHTS_URL_ENV = "DEEPFUSION_WEIGHTS_URL"
_RESOLVE_MODES = ("auto", "require", "never")
_TOTAL_FACTOR = 4            # wall-clock bound of a stalled or slow download: 4 * timeout ...
_MIN_RATE = 64 * 1024        # ... unless it still receives >= 64 KiB/s (over the last timeout s)
_MAX_FACTOR = 60             # and never more than 60 * timeout in all
_TMP_PREFIX = ".deepfusion-download-"
_STALE_TMP_SECONDS = 3600


def _weights_enum(backbone: str):
    import torchvision.models as tvm

    return getattr(tvm, _RESNETS[backbone][1]).DEFAULT


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


def _one_line(text: object, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _load_state_file(path: Path) -> dict:
    """``torch.load`` of a weights file, or a :class:`WeightsNotFoundError` naming it."""
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: no such weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable weights file is the user's to fix
        raise WeightsNotFoundError(f"{path}: cannot load weights ({_one_line(exc)})") from None
    if not isinstance(state, dict):
        raise WeightsNotFoundError(f"{path}: not a state dict (a {type(state).__name__})")
    return state


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
            return _one_line(exc.reason)
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, socket.gaierror):
        return f"host not found ({_one_line(exc.strerror or exc)})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, RuntimeError) and "invalid hash value" in str(exc):
        return "hash mismatch: " + _one_line(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return _one_line(f"{where}{exc.strerror}")
    return _one_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


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
    (mode ``never``, and backbone ``light`` in every mode: it has no pretrained weights).
    """
    if mode not in _RESOLVE_MODES:
        raise ParameterError(f"pretrained mode must be one of {', '.join(_RESOLVE_MODES)}, got {mode!r}")
    if not timeout > 0:
        raise ParameterError(f"download timeout must be positive, got {timeout!r}")
    if backbone == "light" or mode == "never":
        return None, "not used"
    if backbone not in _RESNETS:
        raise ParameterError(f"no pretrained weights exist for backbone {backbone!r}")
    if weights_path is not None:
        path = Path(weights_path)
        return _load_state_file(path), f"file {path}"
    cached = pretrained_weights_file(backbone)
    if cached.is_file():
        try:
            return _load_state_file(cached), f"torch cache {cached}"
        except WeightsNotFoundError as exc:
            if mode == "require":
                raise WeightsNotFoundError(f"{exc}; delete it to download it again, pass "
                                           "--weights-path FILE, or train with --no-pretrained") from None
            reason = f"unreadable file in the torch cache: {cached}"
            echo(f"ImageNet weights for {backbone} in the torch cache cannot be loaded ({exc}); "
                 "training from scratch (delete the file to download it again, --weights-path "
                 "FILE to give them, --no-pretrained to skip this)")
            return None, f"none ({reason})"
    url = pretrained_weights_url(backbone)
    try:
        _download(url, cached, timeout=timeout, progress=progress)
        state = _load_state_file(cached)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        reason = str(exc) if isinstance(exc, WeightsNotFoundError) else _failure_reason(exc, timeout)
        if mode == "require":
            raise WeightsNotFoundError(
                f"{cached}: ImageNet weights for {backbone} not in the torch cache and could not "
                f"be downloaded from {url} ({reason}); pass --weights-path FILE or train with "
                "--no-pretrained") from None
        echo(f"ImageNet weights for {backbone} could not be downloaded ({reason}); training from "
             "scratch (--weights-path FILE to give them, --no-pretrained to skip this)")
        return None, f"none ({reason})"
    return state, f"downloaded {url}"


def load_pretrained_state(backbone: str, weights_path: Optional[Path] = None) -> dict:
    """ImageNet weights of a torchvision ResNet, from ``weights_path`` or the local torch cache.

    The former loader, kept for callers of ``build_model(weights_path=...)``: like
    :func:`resolve_pretrained` with mode ``require`` but never downloads. Raises
    :class:`WeightsNotFoundError` naming the missing file.
    """
    if backbone not in _RESNETS:
        raise WeightsNotFoundError(f"no pretrained weights exist for backbone {backbone!r}")
    if weights_path is not None:
        return _load_state_file(Path(weights_path))
    path = pretrained_weights_file(backbone)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{path}: ImageNet weights for {backbone} not found (offline); put the file there, "
            "pass --weights-path, or train with --no-pretrained")
    return _load_state_file(path)


class MelCNN(nn.Module):
    """A CNN over one mel view: (B, n_mels, T) -> (B, embed_dim).

    ``backbone`` is a torchvision ResNet with a one-channel stem (pretrained RGB stem weights are
    summed over colour channels) or ``light``. With ``band_stats`` (``n_mels`` > 0) the mean and
    standard deviation over time of every mel band join the CNN's pooled output before the
    projection: the long-term spectral shape, which global pooling of the CNN blurs.
    """

    def __init__(self, *, backbone: str, embed_dim: int, pretrained_state: Optional[dict] = None,
                 band_stats: int = 0):
        super().__init__()
        self.band_stats = band_stats
        if backbone == "light":
            self.body, width = _light_cnn()
        else:
            import torchvision.models as tvm

            name, _, width = _RESNETS[backbone]
            net = getattr(tvm, name)(weights=None)
            if pretrained_state is not None:
                net.load_state_dict(pretrained_state)
            stem = net.conv1.weight.detach().sum(dim=1, keepdim=True)   # RGB -> one channel
            net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
            net.conv1.weight.data.copy_(stem)
            net.fc = nn.Identity()
            self.body = net
        self.proj = nn.Sequential(nn.Linear(width + 2 * band_stats, embed_dim), nn.ReLU(inplace=True))

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
    """Three mel CNN branches + three auxiliary MLPs, fused through modality attention."""

    def __init__(self, config: ModelConfig, *, pretrained_state: Optional[dict] = None):
        super().__init__()
        self.config = config
        d = config.embed_dim
        def branch():
            return MelCNN(backbone=config.backbone, embed_dim=d, pretrained_state=pretrained_state,
                          band_stats=config.n_mels if config.band_stats else 0)
        if config.share_backbone:
            shared = branch()
            self.mel = nn.ModuleDict({k: shared for k in MEL_KEYS})
        else:
            self.mel = nn.ModuleDict({k: branch() for k in MEL_KEYS})
        self.aux = nn.ModuleDict({
            k: AuxiliaryFeatureMLP(rows=r, hidden=config.aux_hidden, embed_dim=d,
                                   dropout=config.dropout)
            for k, r in zip(AUX_KEYS, config.aux_rows)})
        self.attention = ModalityAttention(embed_dim=d)
        layers: list[nn.Module] = []
        width = d * len(FEATURE_KEYS)
        for h in config.fusion_hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(config.dropout)]
            width = h
        self.fusion = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, config.n_classes)

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        emb = [self.mel[k](x[k]) for k in MEL_KEYS] + [self.aux[k](x[k]) for k in AUX_KEYS]
        emb = torch.stack(emb, dim=1)                       # (B, 6, D)
        weighted, attention = self.attention(emb)           # (B, 6, D), (B, 6)
        fused = self.fusion(weighted.flatten(1))            # (B, fusion_hidden[-1])
        return {"logits": self.classifier(fused),           # (B, n_classes)
                "attention": attention}                     # (B, 6), rows sum to 1


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
    if pretrained_state is not None and config.backbone == "light":
        raise ParameterError("backbone light has no pretrained weights; pretrained_state must be None")
    state = pretrained_state
    if state is None and config.pretrained and config.backbone != "light":
        state = load_pretrained_state(config.backbone, weights_path)
    if state is None:
        return MultiModalNet(config)
    try:
        return MultiModalNet(config, pretrained_state=state)
    except (RuntimeError, TypeError) as exc:  # load_state_dict of a wrong file
        raise WeightsNotFoundError(f"the pretrained weights do not fit {config.backbone}: "
                                   f"{_one_line(exc, 300)}") from None


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (shared modules counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
