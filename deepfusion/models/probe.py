"""A linear probe baseline: logistic regression on time-pooled statistics of the views.

The probe sees exactly what the network sees (the hand-made views and, where the features have it,
the pretrained view, normalised per row by the
dataset, see :class:`deepfusion.data.dataset.SegmentDataset`) and reduces every view to the mean and
the standard deviation over time of each of its rows (:func:`pooled_stats`). These statistics
are standardised with the training clips' mean and scale and fed to one linear layer.

:func:`fit_probe` fits it with scikit-learn (``StandardScaler`` + ``LogisticRegression``,
lbfgs, multinomial for three classes or more) on the statistics of whole training clips and
copies the result into a :class:`LinearProbe`, a ``torch.nn.Module`` with the network's
interface (``forward(x) -> {'logits', 'attention'}``, ``model.classifier.out_features``) whose
``state_dict`` holds tensors only, so it fits the checkpoint format and ``predict_clips``.

The probe is fitted on whole clips; its statistics of shorter segments differ (the standard
deviation over 3 s is smaller than over 30 s), so evaluate it on whole clips (``seg`` =
``fs.n_frames``, ``segment_seconds=None``) for the numbers its fit was made for.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from torch import nn

from deepfusion.config import ModelConfig, TrainConfig
from deepfusion.errors import ParameterError
from deepfusion.views import AUX_KEYS, FEATURE_KEYS, model_rows

Array = Union[np.ndarray, torch.Tensor]

#: The regularisation the train stage uses by default (``TrainConfig.probe_c``): one value
#: for the command line, the Python API and this function. C 0.01 / 0.05 / 0.1 / 1 gave
#: 0.871 / 0.879 / 0.879 / 0.875 in grouped 5-fold CV of minigenres (README, Generalisation);
#: on two synthetic collections accuracy was flat for C 0.01-1 and log-loss lowest near 0.1.
DEFAULT_C = TrainConfig.probe_c

#: Bias given to a class absent from the training clips: it is never predicted and gets
#: probability 0 (a finite value, so that averaged logits stay finite).
_ABSENT_BIAS = -1e4


def n_pooled_stats(n_mels: int, aux_rows: Sequence[int], pretrained_view_rows: int = 0) -> int:
    """Length of :func:`pooled_stats`' output: twice the rows of all the views."""
    return 2 * sum(model_rows(n_mels, aux_rows, pretrained_view_rows).values())


def pooled_stats(x: dict[str, Array], keys: Sequence[str] = FEATURE_KEYS) -> Array:
    """Mean and standard deviation over time of every row of the views ``keys``.

    Parameters
    ----------
    x : dict of key -> array or tensor [shape=(B, rows, T)]
        The views of a batch (``T``: patches for the pretrained view).
    keys : sequence of str
        The views to use, in order (default the hand-made ones).

    Returns
    -------
    np.ndarray or torch.Tensor [shape=(B, 2 * sum(rows))]
        Per view, in ``keys`` order, the ``rows`` means then the ``rows``
        standard deviations (population, correction 0):
        ``[mean(mel_spec_orig), std(mel_spec_orig), mean(mel_spec_harm), ...]``.
        numpy inputs are reduced in float64 and give float64; tensors are reduced in float32
        (float64 stays float64) whatever their dtype or an enclosing autocast.
    """
    missing = [k for k in keys if k not in x]
    if missing:
        raise ParameterError(f"pooled_stats: missing view(s) {', '.join(missing)}")
    if all(isinstance(x[k], torch.Tensor) for k in keys):
        parts = []
        for k in keys:
            v = x[k]
            v = v if v.dtype == torch.float64 else v.float()
            std, mean = torch.std_mean(v, dim=-1, correction=0)      # (B, rows) each
            parts += [mean, std]
        return torch.cat(parts, dim=-1)
    parts = []
    for k in keys:
        v = x[k]
        if isinstance(v, torch.Tensor):
            raise ParameterError("pooled_stats: mixed numpy arrays and torch tensors")
        v = np.asarray(v)
        parts += [v.mean(axis=-1, dtype=np.float64), v.std(axis=-1, dtype=np.float64)]
    return np.concatenate(parts, axis=-1)


class LinearProbe(nn.Module):
    """Standardised pooled statistics (:func:`pooled_stats`) through one linear layer.

    Buffers ``stat_mean`` and ``stat_scale`` standardise the statistics (fitted on training
    clips by :func:`fit_probe`; 0 and 1 until then); ``classifier`` is the ``nn.Linear``.
    ``forward`` returns ``{'logits': (B, n_classes), 'attention': (B, M)}`` like
    :class:`~deepfusion.models.net.MultiModalNet`; the probe has no modality attention, so
    ``attention`` is uniform (1/M for each of its M views), only there for the common interface.

    The whole forward runs in float32 with autocast disabled (the statistics, the
    standardisation and the linear layer): it costs nothing and the logits are float32
    under ``torch.autocast`` too.
    """

    def __init__(self, n_classes: int, n_mels: int = 128,
                 aux_rows: Sequence[int] = ModelConfig.aux_rows, pretrained_view_rows: int = 0):
        super().__init__()
        aux_rows = tuple(int(r) for r in aux_rows)
        if int(n_classes) < 2:
            raise ParameterError(f"need at least 2 classes, got {n_classes}")
        if len(aux_rows) != len(AUX_KEYS) or int(n_mels) < 1 or min(aux_rows) < 1:
            raise ParameterError(f"need n_mels >= 1 and {len(AUX_KEYS)} positive aux_rows, "
                                 f"got {n_mels!r}, {aux_rows!r}")
        self.n_classes, self.n_mels, self.aux_rows = int(n_classes), int(n_mels), aux_rows
        self.pretrained_view_rows = int(pretrained_view_rows or 0)
        #: the views the probe reads, in order
        self.keys = tuple(model_rows(self.n_mels, self.aux_rows, self.pretrained_view_rows))
        n_stats = n_pooled_stats(self.n_mels, self.aux_rows, self.pretrained_view_rows)
        self.register_buffer("stat_mean", torch.zeros(n_stats))
        self.register_buffer("stat_scale", torch.ones(n_stats))
        self.classifier = nn.Linear(n_stats, self.n_classes)
        #: What :func:`fit_probe` recorded (C, iterations, training accuracy...); not saved.
        self.fit_info: dict = {}

    @classmethod
    def from_config(cls, config) -> "LinearProbe":
        """A probe from anything holding ``n_classes``, ``n_mels``, ``aux_rows`` and
        ``pretrained_view_rows`` (a dict, a :class:`~deepfusion.config.ModelConfig`, ...; a
        dict saved before the pretrained view existed lacks the last); other fields are
        ignored."""
        get = (lambda k: config.get(k, 0)) if isinstance(config, dict) else \
            (lambda k: getattr(config, k))
        return cls(get("n_classes"), get("n_mels"), get("aux_rows"), get("pretrained_view_rows"))

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device_type = self.stat_mean.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            stats = pooled_stats(x, self.keys).float()                # (B, n_stats)
            z = (stats - self.stat_mean) / self.stat_scale
            logits = self.classifier(z)                               # (B, n_classes)
        attention = torch.full((logits.shape[0], len(self.keys)), 1.0 / len(self.keys),
                               dtype=logits.dtype, device=logits.device)
        # its embedding is the classifier's input, as the network's is
        return {"logits": logits, "attention": attention, "embedding": z}


def clip_stats(fs, norm: dict, indices: np.ndarray, keys: Sequence[str] = FEATURE_KEYS) -> np.ndarray:
    """:func:`pooled_stats` of whole clips, normalised as :class:`SegmentDataset` does.

    One clip at a time (``(arr[c] - mean[:, None]) / std[:, None]``): no copy of the set.

    Returns
    -------
    np.ndarray [shape=(len(indices), n_stats)] float64
    """
    indices = np.asarray(indices, np.int64)
    rows = fs.rows()
    out = np.empty((len(indices), 2 * sum(rows[k] for k in keys)), np.float64)
    for j, c in enumerate(indices.tolist()):
        x = {}
        for k in keys:
            m, sd = norm[k]["mean"], norm[k]["std"]
            x[k] = ((fs.arrays[k][c] - m[:, None]) / sd[:, None])[None]
        out[j] = pooled_stats(x, keys)[0]
    return out


def fit_probe(fs, norm: dict, train_idx: np.ndarray, *, n_mels: int,
              aux_rows: Sequence[int], pretrained_view_rows: int = 0, C: float = DEFAULT_C,
              seed: int = 0, max_iter: int = 2000) -> LinearProbe:
    """Fit a :class:`LinearProbe` on the whole clips ``train_idx`` of ``fs``.

    Parameters
    ----------
    fs : FeatureSet
    norm : dict
        Per-row normalisation of the views (:func:`deepfusion.data.normalize.fit_normalization`).
    train_idx : array of int
        Training clips; clips of unknown genre (label < 0) are left out.
    n_mels, aux_rows, pretrained_view_rows : int, tuple of int, int
        The rows of the views, as in :class:`~deepfusion.config.ModelConfig`; checked
        against ``fs`` (``pretrained_view_rows`` 0: the probe leaves that view out).
    C : float
        Inverse L2 regularisation strength of the logistic regression (see :data:`DEFAULT_C`).
    seed : int
        ``random_state`` of the logistic regression.
    max_iter : int
        lbfgs iterations at most.

    Returns
    -------
    LinearProbe
        In eval mode, with ``len(fs.class_names)`` logits: ``probe(x)['logits']`` of a whole
        clip equals the fitted ``LogisticRegression.decision_function`` of its standardised
        statistics (for two classes, ``[-d/2, d/2]``, whose softmax is ``predict_proba``).
        A genre without training clips gets a large negative bias: never predicted.
        ``probe.fit_info`` records C, the iterations used and the training accuracy.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if not C > 0:
        raise ParameterError(f"C must be > 0, got {C!r}")
    rows = fs.rows()
    expected = model_rows(n_mels, aux_rows, pretrained_view_rows)
    wrong = [f"{k} has {rows.get(k, 0)} rows, expected {expected[k]}" for k in expected
             if rows.get(k, 0) != expected[k]]
    if wrong:
        raise ParameterError(f"features do not fit the probe: {'; '.join(wrong)}")
    idx = np.asarray(train_idx, np.int64)
    idx = idx[fs.labels[idx] >= 0]
    y = fs.labels[idx]
    present = np.unique(y)
    if len(present) < 2:
        raise ParameterError(f"the probe needs training clips of at least 2 genres, got {len(present)}")

    keys = tuple(expected)
    stats = clip_stats(fs, norm, idx, keys)
    scaler = StandardScaler().fit(stats)
    z = scaler.transform(stats)
    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed)
    clf.fit(z, y)

    n_classes = len(fs.class_names)
    n_stats = stats.shape[1]
    weight = np.zeros((n_classes, n_stats), np.float64)
    bias = np.full(n_classes, _ABSENT_BIAS, np.float64)
    classes = clf.classes_.astype(np.int64)
    if len(classes) == 2:   # one row w for class 1 vs 0: logits [-d/2, d/2] have softmax = proba
        w, b = clf.coef_[0], clf.intercept_[0]
        weight[classes[0]], bias[classes[0]] = -w / 2, -b / 2
        weight[classes[1]], bias[classes[1]] = w / 2, b / 2
    else:
        weight[classes], bias[classes] = clf.coef_, clf.intercept_

    probe = LinearProbe(n_classes, n_mels, aux_rows, pretrained_view_rows)
    with torch.no_grad():
        probe.stat_mean.copy_(torch.from_numpy(scaler.mean_))
        probe.stat_scale.copy_(torch.from_numpy(scaler.scale_))
        probe.classifier.weight.copy_(torch.from_numpy(weight))
        probe.classifier.bias.copy_(torch.from_numpy(bias))
    probe.fit_info = {"C": float(C), "seed": int(seed), "n_train": int(len(idx)),
                      "n_iter": int(np.max(clf.n_iter_)), "converged": bool(np.max(clf.n_iter_) < max_iter),
                      "train_accuracy": float((clf.predict(z) == y).mean())}
    return probe.eval()

