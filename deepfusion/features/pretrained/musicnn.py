"""musicnn (Pons & Serra 2019) in PyTorch: the network, its weights and its exact input.

Two models are shipped, ``MSD_musicnn`` (Million Song Dataset tags) and ``MTT_musicnn``
(MagnaTagATune tags), converted once from the TensorFlow checkpoints of the ``musicnn`` 0.1.0
wheel (ISC licence, see ``weights/NOTICE``) by ``benchmarks/musicnn_convert.py``;
``benchmarks/musicnn_tf_check.py`` checks the port against the original graph.

The pipeline is the original's, step for step::

    y16 = resample_16k(y, sr)          # (n,) float32 at 16 kHz
    mel = log_mel(y16)                 # (frames, 96)
    x = patches(mel)                   # (n_patches, 187, 96): 3-s patches, no overlap
    out = load_musicnn("MSD_musicnn")(torch.from_numpy(x))   # dict, see Musicnn.forward

The input steps live in :mod:`deepfusion.features.pretrained.musicnn_input` (no torch) and are
re-exported here.
"""

from __future__ import annotations

import functools
import hashlib
import io
from importlib import resources

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from deepfusion.errors import ParameterError, WeightsNotFoundError
from deepfusion.features.pretrained.musicnn_input import (HOP, N_FFT, N_MELS,  # noqa: F401
                                                          PATCH_FRAMES, SAMPLE_RATE, log_mel,
                                                          patches, resample_16k)
from deepfusion.io.atomic import os_error_reason

MODELS = ("MSD_musicnn", "MTT_musicnn")
#: batch-normalisation epsilon of tf.compat.v1.layers.batch_normalization
BN_EPS = 1e-3

#: The 50 tags of each model in output order (musicnn/configuration.py).
TAGS: dict[str, tuple[str, ...]] = {
    "MSD_musicnn": (
        "rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s",
        "alternative rock", "jazz", "beautiful", "metal", "chillout", "male vocalists",
        "classic rock", "soul", "indie rock", "Mellow", "electronica", "80s", "folk", "90s",
        "chill", "instrumental", "punk", "oldies", "blues", "hard rock", "ambient", "acoustic",
        "experimental", "female vocalist", "guitar", "Hip-Hop", "70s", "party", "country",
        "easy listening", "sexy", "catchy", "funk", "electro", "heavy metal", "Progressive rock",
        "60s", "rnb", "indie pop", "sad", "House", "happy"),
    "MTT_musicnn": (
        "guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast",
        "piano", "ambient", "beat", "violin", "vocal", "synth", "female", "indian", "opera",
        "male", "singing", "vocals", "no vocals", "harpsichord", "loud", "quiet", "flute",
        "woman", "male vocal", "no vocal", "pop", "soft", "sitar", "solo", "man", "classic",
        "choir", "voice", "new age", "dance", "male voice", "female vocal", "beats", "harp",
        "cello", "no voice", "weird", "country", "metal", "female voice", "choral"),
}

#: SHA-256 of the shipped weights/<name>.npz (benchmarks/musicnn_convert.py checks these).
WEIGHTS_SHA256 = {
    "MSD_musicnn": "a4042613da4d3ae3b165b4dd584823dc5d4108574f2c3a1518e4680e137994a7",
    "MTT_musicnn": "003356da90f1af633a04c35fd6f6640483879644128871ab61aee91bf9b77780",
}
_HINT = "reinstall deepfusion (pip install --force-reinstall deepfusion)"


# ------------------------------------------------------------------------------ network

def _frontend_kernels(n_mels: int, timbral_filters: int, temporal_filters: int
                      ) -> tuple[tuple[int, int, int], ...]:
    """(time, mel, filters) of the five front-end convolutions, in the original's order:
    two timbral (7 frames x 40% / 70% of the mel bands) and three temporal (128/64/32 x 1)."""
    return ((7, int(0.4 * n_mels), timbral_filters), (7, int(0.7 * n_mels), timbral_filters),
            (128, 1, temporal_filters), (64, 1, temporal_filters), (32, 1, temporal_filters))


def _tf_variables(n_mels: int = N_MELS, n_classes: int = 50, timbral_filters: int = 204,
                  temporal_filters: int = 51, midend_filters: int = 64,
                  backend_units: int = 200) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The checkpoint's inference variables (TensorFlow names and layouts) in a fixed order:
    the order the original graph creates its layers."""
    def bn(i: int, n: int) -> list:
        name = "batch_normalization" + (f"_{i}" if i else "")
        return [(f"{name}/{p}", (n,)) for p in ("gamma", "beta", "moving_mean",
                                                "moving_variance")]

    def layer(kind: str, i: int, kernel: tuple[int, ...]) -> list:
        name = kind + (f"_{i}" if i else "")
        return [(f"{name}/kernel", kernel), (f"{name}/bias", (kernel[-1],))]

    out = bn(0, 1)
    kernels = _frontend_kernels(n_mels, timbral_filters, temporal_filters)
    for i, (t, m, c) in enumerate(kernels):
        out += layer("conv2d", i, (t, m, 1, c)) + bn(i + 1, c)
    width = sum(c for _, _, c in kernels)
    for j in range(3):
        cin = width if j == 0 else midend_filters
        out += layer("conv2d", 5 + j, (7, cin, 1, midend_filters)) + bn(6 + j, midend_filters)
    pooled = 2 * (width + 3 * midend_filters)
    out += bn(9, pooled) + layer("dense", 0, (pooled, backend_units)) + bn(10, backend_units)
    out += layer("dense", 1, (backend_units, n_classes))
    return tuple(out)


#: The 64 variables each weights file holds: TensorFlow name -> shape, in file order.
VARIABLES: tuple[tuple[str, tuple[int, ...]], ...] = _tf_variables()


class FrontendBranch(nn.Module):
    """One front-end filter shape: conv -> ReLU -> BN -> max over the mel axis.

    Time is zero-padded as TensorFlow's 'SAME' does (one frame less before than after for an
    even kernel); the mel axis is 'valid'. The timbral blocks' explicit (3, 3) padding is the
    same thing for their 7-frame kernels.
    """

    def __init__(self, time: int, mel: int, filters: int, eps: float = BN_EPS):
        super().__init__()
        self.pad = ((time - 1) // 2, time - 1 - (time - 1) // 2)
        self.conv = nn.Conv2d(1, filters, (time, mel))
        self.bn = nn.BatchNorm2d(filters, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, M) batch-normalised input -> (B, filters, T)."""
        x = F.pad(x, (0, 0, *self.pad))         # (B, 1, T + time - 1, M)
        x = self.bn(F.relu(self.conv(x)))       # (B, C, T, M - mel + 1)
        return x.amax(dim=3)                    # (B, C, T)


class MidendBlock(nn.Module):
    """A mid-end layer: a 7-frame convolution over all input features (zero-padded by 3 on
    each side in time) -> ReLU -> BN."""

    def __init__(self, cin: int, cout: int, eps: float = BN_EPS):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, 7, padding=3)
        self.bn = nn.BatchNorm1d(cout, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, T) -> (B, cout, T)."""
        return self.bn(F.relu(self.conv(x)))


class Musicnn(nn.Module):
    """musicnn: a musically motivated front end, a dense mid end, a pooled dense back end.

    Built from plain ints (the defaults are the shipped models'); the layers follow
    ``musicnn/models.py``'s ``build_musicnn`` one for one. Every block is
    conv/dense -> ReLU -> BatchNorm (eps 1e-3, inference statistics).

    Parameters
    ----------
    n_mels : int
        Mel bands of the input (96).
    n_classes : int
        Tags (50).
    timbral_filters, temporal_filters : int
        Filters of each of the 2 timbral and 3 temporal front-end convolutions (204, 51).
    midend_filters : int
        Filters of each of the 3 mid-end convolutions (64).
    backend_units : int
        Units of the penultimate dense layer (200).
    """

    def __init__(self, *, n_mels: int = N_MELS, n_classes: int = 50,
                 timbral_filters: int = 204, temporal_filters: int = 51,
                 midend_filters: int = 64, backend_units: int = 200):
        super().__init__()
        self.dims = dict(n_mels=n_mels, n_classes=n_classes, timbral_filters=timbral_filters,
                         temporal_filters=temporal_filters, midend_filters=midend_filters,
                         backend_units=backend_units)
        kernels = _frontend_kernels(n_mels, timbral_filters, temporal_filters)
        self.n_timbral = 2 * timbral_filters
        self.frontend_width = sum(c for _, _, c in kernels)                     # 561
        self.midend_width = self.frontend_width + 3 * midend_filters            # 753
        self.input_bn = nn.BatchNorm2d(1, eps=BN_EPS)
        self.frontend = nn.ModuleList(FrontendBranch(t, m, c, BN_EPS) for t, m, c in kernels)
        self.midend = nn.ModuleList(
            MidendBlock(self.frontend_width if j == 0 else midend_filters, midend_filters,
                        BN_EPS) for j in range(3))
        self.pool_bn = nn.BatchNorm1d(2 * self.midend_width, eps=BN_EPS)
        self.dense = nn.Linear(2 * self.midend_width, backend_units)
        self.dense_bn = nn.BatchNorm1d(backend_units, eps=BN_EPS)
        self.out = nn.Linear(backend_units, n_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tag a batch of log-mel patches.

        Parameters
        ----------
        x : Tensor [shape=(B, T, n_mels)], float32
            :func:`patches` of :func:`log_mel` (T = 187; any T >= 1 runs, as in the
            original, but the models were trained on 187).

        Returns
        -------
        dict of Tensor, time-major like the original extractor's features:
            ``logits`` (B, 50); ``taggram`` (B, 50) = sigmoid(logits);
            ``penultimate`` (B, 200), the batch-normalised penultimate dense layer;
            ``frontend`` (B, T, 561) = [``timbral`` (B, T, 408) | ``temporal`` (B, T, 153)];
            ``cnn1``, ``cnn2``, ``cnn3`` (B, T, 64), the mid-end layers (2 and 3 with
            their residual sums); ``midend`` (B, T, 753) = [frontend | cnn1 | cnn2 | cnn3];
            ``max_pool``, ``mean_pool`` (B, 753), ``midend`` pooled over time.
        """
        if x.ndim != 3 or x.shape[-1] != self.dims["n_mels"]:
            raise ParameterError(f"Musicnn expects (batch, frames, {self.dims['n_mels']}) "
                                 f"log-mel patches, got shape {tuple(x.shape)}")
        h = self.input_bn(x[:, None])                                   # (B, 1, T, 96)
        front = torch.cat([b(h) for b in self.frontend], dim=1)         # (B, 561, T)
        c1 = self.midend[0](front)                                      # (B, 64, T)
        c2 = self.midend[1](c1) + c1                                    # (B, 64, T)
        c3 = self.midend[2](c2) + c2                                    # (B, 64, T)
        mid = torch.cat([front, c1, c2, c3], dim=1)                     # (B, 753, T)
        max_pool = mid.amax(dim=2)                                      # (B, 753)
        mean_pool = mid.mean(dim=2)                                     # (B, 753)
        # TF stacks them as (753, 2) before flattening: inputs alternate max, mean
        pooled = torch.stack([max_pool, mean_pool], dim=2).flatten(1)   # (B, 1506)
        penultimate = self.dense_bn(F.relu(self.dense(self.pool_bn(pooled))))  # (B, 200)
        logits = self.out(penultimate)                                  # (B, 50)
        front_t = front.transpose(1, 2)                                 # (B, T, 561)
        return {"logits": logits,
                "taggram": torch.sigmoid(logits),
                "penultimate": penultimate,
                "frontend": front_t,
                "timbral": front_t[..., :self.n_timbral],               # (B, T, 408)
                "temporal": front_t[..., self.n_timbral:],              # (B, T, 153)
                "cnn1": c1.transpose(1, 2),                             # (B, T, 64)
                "cnn2": c2.transpose(1, 2),
                "cnn3": c3.transpose(1, 2),
                "midend": mid.transpose(1, 2),                          # (B, T, 753)
                "max_pool": max_pool,
                "mean_pool": mean_pool}

    def load_tf_variables(self, arrays: dict[str, np.ndarray]) -> None:
        """Copy the checkpoint's variables (TensorFlow names and layouts, as in the
        weights files) into this module."""
        sd = self.state_dict()

        def put(key: str, value: np.ndarray) -> None:
            t = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
            if tuple(t.shape) != tuple(sd[key].shape):
                raise ParameterError(f"musicnn variable for {key}: shape {tuple(t.shape)}, "
                                     f"expected {tuple(sd[key].shape)}")
            sd[key].copy_(t)

        def bn(module: str, i: int) -> None:
            name = "batch_normalization" + (f"_{i}" if i else "")
            for ours, theirs in (("weight", "gamma"), ("bias", "beta"),
                                 ("running_mean", "moving_mean"),
                                 ("running_var", "moving_variance")):
                put(f"{module}.{ours}", arrays[f"{name}/{theirs}"])

        def conv(i: int) -> str:
            return "conv2d" + (f"_{i}" if i else "")

        bn("input_bn", 0)
        for i in range(5):      # [time, mel, 1, out] -> [out, 1, time, mel]
            put(f"frontend.{i}.conv.weight", arrays[f"{conv(i)}/kernel"].transpose(3, 2, 0, 1))
            put(f"frontend.{i}.conv.bias", arrays[f"{conv(i)}/bias"])
            bn(f"frontend.{i}.bn", i + 1)
        for j in range(3):      # [7, in, 1, out] -> [out, in, 7]
            put(f"midend.{j}.conv.weight", arrays[f"{conv(5 + j)}/kernel"][:, :, 0, :]
                .transpose(2, 1, 0))
            put(f"midend.{j}.conv.bias", arrays[f"{conv(5 + j)}/bias"])
            bn(f"midend.{j}.bn", 6 + j)
        bn("pool_bn", 9)
        put("dense.weight", arrays["dense/kernel"].T)                    # [in, out] -> [out, in]
        put("dense.bias", arrays["dense/bias"])
        bn("dense_bn", 10)
        put("out.weight", arrays["dense_1/kernel"].T)
        put("out.bias", arrays["dense_1/bias"])


# ------------------------------------------------------------------------------ weights

def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ParameterError(f"unknown musicnn model {name!r}; choose one of {', '.join(MODELS)}")


def weights_file(name: str):
    """Where the shipped weights of model ``name`` are: package data
    ``deepfusion/features/pretrained/weights/<name>.npz`` (a :class:`importlib.resources.abc.Traversable`,
    a :class:`pathlib.Path` for an ordinary install)."""
    _check_name(name)
    return resources.files(__package__).joinpath("weights", f"{name}.npz")


def read_weights(name: str, file=None) -> dict[str, np.ndarray]:
    """The 64 inference variables of model ``name``, hash-checked.

    Parameters
    ----------
    name : str
        One of :data:`MODELS`.
    file : path-like or Traversable, optional
        The .npz to read (default: :func:`weights_file`).

    Returns
    -------
    dict of str -> np.ndarray (float32), TensorFlow names and layouts (:data:`VARIABLES`).

    Raises
    ------
    WeightsNotFoundError
        The file is missing, unreadable or not the expected bytes (SHA-256).
    """
    _check_name(name)
    if file is None:
        file = weights_file(name)
    elif not hasattr(file, "read_bytes"):
        from pathlib import Path

        file = Path(file)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise WeightsNotFoundError(f"{file}: musicnn weights cannot be read "
                                   f"({os_error_reason(exc)}); {_HINT}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256[name]:
        raise WeightsNotFoundError(f"{file}: damaged musicnn weights (sha256 {digest[:12]}..., "
                                   f"expected {WEIGHTS_SHA256[name][:12]}...); {_HINT}")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k, _ in VARIABLES}


@functools.lru_cache(maxsize=None)
def _load(name: str):
    net = Musicnn()
    net.load_tf_variables(read_weights(name))
    net.name = name
    net.tags = TAGS[name]
    net.eval()
    net.requires_grad_(False)
    return net


def load_musicnn(name: str = "MSD_musicnn"):
    """The pretrained musicnn ``name``, frozen, loaded once per process.

    Parameters
    ----------
    name : str
        ``MSD_musicnn`` or ``MTT_musicnn``.

    Returns
    -------
    Musicnn in eval mode with ``requires_grad`` False, on the CPU, with ``.name`` and
    ``.tags`` (its 50 tags in logit order). The same object is returned on every call:
    moving it to a device moves it for every caller.

    Raises
    ------
    ParameterError
        ``name`` is not one of :data:`MODELS`.
    WeightsNotFoundError
        Its weights file is missing or damaged.
    """
    _check_name(name)
    return _load(name)


load_musicnn.cache_clear = _load.cache_clear
