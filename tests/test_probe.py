"""The linear probe: pooled statistics, the sklearn fit copied into torch, checkpoints, autocast."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from deepfusion.data.normalize import fit_normalization
from deepfusion.inference.clips import predict_clips
from deepfusion.io.featureset import FeatureSet
from deepfusion.models.probe import LinearProbe, clip_stats, fit_probe, pooled_stats
from deepfusion.testing import small_rows
from deepfusion.views import AUX_KEYS, FEATURE_KEYS

N_MELS, T = 8, 40


def _rows() -> dict[str, int]:
    return small_rows(N_MELS, mfcc=5, chroma=4, tempogram=6)


AUX_ROWS = tuple(_rows()[k] for k in AUX_KEYS)


def make_fs(labels, *, seed: int = 0, shift: float = 0.0, n_classes=None) -> FeatureSet:
    """Random views (rows of growing spread); with ``shift``, the clips of class c have the
    mean of mel row c (of the three mel views) raised by ``shift``."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    arrays = {}
    for k, r in _rows().items():
        a = rng.normal(size=(n, r, T)).astype(np.float32) * (1 + np.arange(r, dtype=np.float32))[:, None] + 3
        if k.startswith("mel") and shift:
            a[np.arange(n), labels, :] += shift
        arrays[k] = a
    n_classes = n_classes or int(labels.max()) + 1
    return FeatureSet(arrays, labels, [f"g{c}" for c in range(n_classes)],
                      [f"g{c}/{i}.wav" for i, c in enumerate(labels)], np.arange(n, dtype=np.int64))


def whole_clips(fs: FeatureSet, norm: dict, idx) -> dict[str, torch.Tensor]:
    """Normalised whole clips as SegmentDataset gives them, batched."""
    return {k: torch.from_numpy(np.stack([(fs.arrays[k][c] - norm[k]["mean"][:, None])
                                          / norm[k]["std"][:, None] for c in idx]))
            for k in FEATURE_KEYS}


def sklearn_reference(fs, norm, idx, C):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    s = clip_stats(fs, norm, idx)
    scaler = StandardScaler().fit(s)
    clf = LogisticRegression(C=C, max_iter=2000, random_state=0).fit(scaler.transform(s), fs.labels[idx])
    return scaler, clf


def test_pooled_stats_numpy_and_torch_agree():
    rng = np.random.default_rng(1)
    x = {k: rng.normal(2.0, 3.0, size=(3, r, 17)).astype(np.float32) for k, r in _rows().items()}
    a = pooled_stats(x)
    b = pooled_stats({k: torch.from_numpy(v) for k, v in x.items()})
    assert isinstance(a, np.ndarray) and isinstance(b, torch.Tensor)
    assert a.shape == b.shape == (3, 2 * sum(_rows().values()))
    np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-5)
    # layout: per view its means then its (population) standard deviations
    m = x["mel_spec_orig"]
    np.testing.assert_allclose(a[:, :N_MELS], m.mean(-1), rtol=1e-6)
    np.testing.assert_allclose(a[:, N_MELS:2 * N_MELS], m.std(-1), rtol=1e-5)
    last = x[FEATURE_KEYS[-1]]
    np.testing.assert_allclose(a[:, -last.shape[1]:], last.std(-1), rtol=1e-5)
    # bf16 input is reduced in float32
    c = pooled_stats({k: torch.from_numpy(v).bfloat16() for k, v in x.items()})
    assert c.dtype == torch.float32


def test_logits_equal_sklearn_decision_function():
    labels = np.repeat(np.arange(3), 8)
    fs = make_fs(labels, seed=2, shift=1.0)
    idx = np.arange(0, 24, 1)[np.arange(24) % 4 != 0]          # 18 training clips
    norm = fit_normalization(fs, idx)
    probe = fit_probe(fs, norm, idx, n_mels=N_MELS, aux_rows=AUX_ROWS, C=0.5)
    scaler, clf = sklearn_reference(fs, norm, idx, 0.5)
    every = np.arange(24)                                       # training and held-out clips
    with torch.no_grad():
        out = probe(whole_clips(fs, norm, every))
    expected = clf.decision_function(scaler.transform(clip_stats(fs, norm, every)))
    assert out["logits"].dtype == torch.float32 and out["logits"].shape == (24, 3)
    np.testing.assert_allclose(out["logits"].numpy(), expected, atol=1e-4, rtol=1e-4)
    # the path evaluate and predict take: whole clips through predict_clips
    np.testing.assert_allclose(predict_clips(probe, fs, norm, every, seg=fs.n_frames).logits,
                               expected, atol=1e-4, rtol=1e-4)
    n_views = len(FEATURE_KEYS)
    assert torch.allclose(out["attention"], torch.full((24, n_views), 1 / n_views))
    assert probe.classifier.out_features == 3
    from deepfusion.config import ModelConfig
    rebuilt = LinearProbe.from_config(ModelConfig(3, n_mels=N_MELS, aux_rows=AUX_ROWS))
    for p in (rebuilt, probe):
        assert (p.n_classes, p.n_mels, p.aux_rows) == (3, N_MELS, tuple(AUX_ROWS))
    assert probe.fit_info["converged"] and probe.fit_info["n_train"] == 18


def test_binary_case_matches_predict_proba():
    labels = np.repeat(np.arange(2), 10)
    fs = make_fs(labels, seed=3, shift=0.7)
    idx = np.arange(20)
    norm = fit_normalization(fs, idx)
    probe = fit_probe(fs, norm, idx, n_mels=N_MELS, aux_rows=AUX_ROWS, C=0.3)
    scaler, clf = sklearn_reference(fs, norm, idx, 0.3)
    z = scaler.transform(clip_stats(fs, norm, idx))
    with torch.no_grad():
        logits = probe(whole_clips(fs, norm, idx))["logits"]
    assert logits.shape == (20, 2)
    np.testing.assert_allclose((logits[:, 1] - logits[:, 0]).numpy(), clf.decision_function(z),
                               atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), clf.predict_proba(z), atol=1e-5)
    assert (logits.argmax(1).numpy() == clf.predict(z)).all()


def test_absent_class_is_never_predicted():
    labels = np.repeat(np.arange(3), 6)
    fs = make_fs(labels, seed=4, shift=2.0)
    idx = np.flatnonzero(labels != 1)                           # genre 1 has no training clip
    norm = fit_normalization(fs, idx)
    probe = fit_probe(fs, norm, idx, n_mels=N_MELS, aux_rows=AUX_ROWS)
    with torch.no_grad():
        logits = probe(whole_clips(fs, norm, np.arange(18)))["logits"]
    assert logits.shape == (18, 3) and torch.isfinite(logits).all()
    assert (logits.argmax(1) != 1).all()


def test_separable_toy_problem_is_learnt_and_generalises():
    labels = np.repeat(np.arange(4), 10)
    train = make_fs(labels, seed=5, shift=1.5)
    idx = np.arange(len(labels))
    norm = fit_normalization(train, idx)
    probe = fit_probe(train, norm, idx, n_mels=N_MELS, aux_rows=AUX_ROWS)
    assert probe.fit_info["train_accuracy"] == 1.0
    with torch.no_grad():
        assert (probe(whole_clips(train, norm, idx))["logits"].argmax(1).numpy() == labels).all()
        fresh = make_fs(labels, seed=6, shift=1.5)             # new clips, same construction
        guess = probe(whole_clips(fresh, norm, idx))["logits"].argmax(1).numpy()
    assert (guess == labels).mean() >= 0.95


def test_state_dict_round_trips_through_a_weights_only_checkpoint():
    labels = np.repeat(np.arange(3), 5)
    fs = make_fs(labels, seed=7, shift=1.0)
    idx = np.arange(15)
    norm = fit_normalization(fs, idx)
    probe = fit_probe(fs, norm, idx, n_mels=N_MELS, aux_rows=AUX_ROWS)
    buf = io.BytesIO()
    from deepfusion.config import ModelConfig
    config = ModelConfig(3, n_mels=N_MELS, aux_rows=AUX_ROWS, kind="probe").to_dict()
    torch.save({"model_state": probe.state_dict(), "model_config": config}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu", weights_only=True)
    assert set(ckpt["model_state"]) == {"stat_mean", "stat_scale", "classifier.weight", "classifier.bias"}
    fresh = LinearProbe.from_config(ckpt["model_config"])
    fresh.load_state_dict(ckpt["model_state"])
    fresh.eval()
    x = whole_clips(fs, norm, idx)
    with torch.no_grad():
        assert torch.equal(fresh(x)["logits"], probe(x)["logits"])


def test_forward_under_cpu_bf16_autocast():
    labels = np.repeat(np.arange(3), 6)
    fs = make_fs(labels, seed=8, shift=1.0)
    idx = np.arange(18)
    norm = fit_normalization(fs, idx)
    probe = fit_probe(fs, norm, idx, n_mels=N_MELS, aux_rows=AUX_ROWS)
    x = whole_clips(fs, norm, idx)
    with torch.no_grad():
        ref = probe(x)["logits"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = probe(x)
    assert out["logits"].dtype == torch.float32 and out["attention"].shape == (18, len(FEATURE_KEYS))
    torch.testing.assert_close(out["logits"], ref, atol=1e-3, rtol=1e-3)


def test_wrong_rows_are_refused():
    from deepfusion.errors import ParameterError

    fs = make_fs(np.repeat(np.arange(2), 3), seed=9)
    norm = fit_normalization(fs, np.arange(6))
    with pytest.raises(ParameterError, match="rows"):
        fit_probe(fs, norm, np.arange(6), n_mels=N_MELS + 1, aux_rows=AUX_ROWS)


def test_predict_clips_on_whole_clips_gives_the_probe_logits():
    labels = np.repeat(np.arange(3), 6)
    fs = make_fs(labels, seed=10, shift=1.0)
    idx = np.arange(18)
    norm = fit_normalization(fs, idx[:12])
    probe = fit_probe(fs, norm, idx[:12], n_mels=N_MELS, aux_rows=AUX_ROWS)
    pred = predict_clips(probe, fs, norm, idx, seg=fs.n_frames, batch_size=7, amp=True)
    with torch.no_grad():                               # the probe on whole clips, one batch
        expected = probe(whole_clips(fs, norm, idx))["logits"].numpy()
    np.testing.assert_allclose(pred.logits, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(pred.attention, 1 / len(FEATURE_KEYS), rtol=1e-6)
