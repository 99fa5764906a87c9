"""The registry of feature views (deepfusion.views.VIEWS) against what its rows say: every row's
function makes the shape its rule gives, its torch function agrees with its numpy one within
its tolerance (exactly, on the torch path, where it has none), and what derives from the rows
(the key tuples, the shapes, the model's branches, the cache key) follows them."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from deepfusion import views
from deepfusion.config import FeatureConfig, ModelConfig
from deepfusion.features.numpy_views import Clip, compute_features
from deepfusion.features.registry import view_function
from deepfusion.features.torch_views import Batch, compute_features_torch
from deepfusion.views import VIEWS

SR = 22050
#: settings where every rows setting differs from the others and from its default, so a row
#: that names the wrong setting makes the wrong shape; every patch (1 for 3 s)
CONFIG = FeatureConfig(duration=3.0, n_mels=40, n_mfcc=13, n_chroma=24, tempogram_win_length=50,
                       pretrained_stride=1)
IDS = [v.name for v in VIEWS]


def _clips(n: int = 2) -> np.ndarray:
    """A chord over a beat and a little noise, and a quieter, higher copy: (n, samples)."""
    t = np.arange(CONFIG.n_samples) / SR
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        y = sum(0.2 * np.sin(2 * np.pi * f * (1 + i / 8) * t) for f in (220.0, 277.18, 329.63))
        y = y + 0.01 * rng.standard_normal(t.size)
        y[:: SR // 2] += 0.8 / (1 + i)
        out.append(y)
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def numpy_views() -> list[dict[str, np.ndarray]]:
    """Each row's numpy function on each clip, from one Clip per clip."""
    clips = [Clip(y, CONFIG) for y in _clips()]
    return [{v.name: view_function(v.numpy)(clip) for v in VIEWS} for clip in clips]


def test_the_rows_are_well_formed():
    names = [v.name for v in VIEWS]
    settings = {f.name for f in fields(FeatureConfig)}
    assert len(set(names)) == len(names)
    assert [v.kind for v in VIEWS].count(views.PRETRAINED) == 1
    for v in VIEWS:
        assert v.kind in views.KINDS, v.name
        assert v.rows in settings if isinstance(v.rows, str) else v.rows > 0, v.name
        assert v.tilt in (None, "bands", "dct"), v.name
        # the model gives every mel view n_mels rows (ModelConfig.n_mels), and a tilt in
        # "bands" is one value per mel band
        assert (v.kind == views.MEL) <= (v.rows == "n_mels"), v.name
        assert (v.tilt == "bands") <= (v.rows == "n_mels"), v.name
        for path in (v.numpy, v.torch):
            assert path is None or callable(view_function(path)), (v.name, path)
        assert v.torch is not None or v.tolerance == 0, v.name


@pytest.mark.parametrize("view", VIEWS, ids=IDS)
def test_each_function_makes_the_shape_its_row_says(view, numpy_views):
    want = CONFIG.feature_shapes()[view.name]
    assert want == (view.n_rows(CONFIG), CONFIG.n_patches if view.axis == views.PATCHES
                    else CONFIG.n_frames)
    for got in numpy_views:
        assert got[view.name].shape == want, view.name
        assert np.isfinite(got[view.name]).all(), view.name


@pytest.mark.parametrize("view", [v for v in VIEWS if v.torch], ids=[v.name for v in VIEWS if v.torch])
def test_each_torch_function_agrees_with_the_numpy_one(view, numpy_views):
    batch = Batch(torch.from_numpy(_clips()), CONFIG, torch.device("cpu"))
    got = view_function(view.torch)(batch)
    got = got.float().numpy() if isinstance(got, torch.Tensor) else got
    assert got.shape == (len(numpy_views), *CONFIG.feature_shapes()[view.name])
    for one, want in zip(got, numpy_views):
        diff = float(np.abs(one - want[view.name]).max())
        assert diff <= view.tolerance, f"{view.name}: {diff:.3g} > {view.tolerance}"


def test_a_row_without_a_torch_function_runs_its_numpy_one_on_the_torch_path(monkeypatch):
    """The torch backend falls back clip by clip, to the numpy backend's values exactly."""
    import dataclasses

    fallback = tuple(dataclasses.replace(v, torch=None, tolerance=0.0) if v.name == "chroma" else v
                     for v in VIEWS)
    monkeypatch.setattr(views, "VIEWS", fallback)
    monkeypatch.setattr(views, "BY_NAME", {v.name: v for v in fallback})
    config = FeatureConfig(duration=3.0, pretrained_view=None)
    ys = _clips()
    for y, got in zip(ys, compute_features_torch(ys, config, device="cpu")):
        want = compute_features(y, config)
        assert list(got) == list(want) and np.array_equal(got["chroma"], want["chroma"])


def test_what_derives_from_the_rows():
    hand_made = [v.name for v in VIEWS if v.kind != views.PRETRAINED]
    assert views.FEATURE_KEYS == tuple(hand_made)
    assert views.MEL_KEYS == tuple(v.name for v in VIEWS if v.kind == views.MEL)
    assert views.AUX_KEYS == tuple(v.name for v in VIEWS if v.kind == views.VECTOR)
    assert views.ALL_KEYS == (*hand_made, views.PRETRAINED_KEY)
    assert tuple(CONFIG.feature_shapes()) == CONFIG.keys == views.ALL_KEYS
    assert tuple(FeatureConfig(pretrained_view=None).feature_shapes()) == views.FEATURE_KEYS
    # the model's rows are the features' rows: a model of default settings reads default features
    rows = {k: r for k, (r, _) in FeatureConfig().feature_shapes().items()}
    mc = ModelConfig(n_classes=2, pretrained_view_rows=rows[views.PRETRAINED_KEY])
    assert views.model_rows(mc.n_mels, mc.aux_rows, mc.pretrained_view_rows) == rows


def test_the_network_has_a_branch_of_its_kind_per_view():
    from deepfusion.models.net import AuxiliaryFeatureMLP, MelCNN, MultiModalNet

    shapes = CONFIG.feature_shapes()
    rows = {k: r for k, (r, _) in shapes.items()}
    mc = ModelConfig(n_classes=3, n_mels=CONFIG.n_mels, backbone="light",
                     aux_rows=tuple(rows[k] for k in views.AUX_KEYS),
                     pretrained_view_rows=rows[views.PRETRAINED_KEY])
    net = MultiModalNet(mc).eval()
    assert net.keys == views.ALL_KEYS
    for v in VIEWS:
        branch = net.mel[v.name] if v.name in net.mel else net.aux[v.name]
        assert isinstance(branch, MelCNN if v.kind == views.MEL else AuxiliaryFeatureMLP), v.name
    x = {k: torch.randn(2, r, 16) for k, (r, _) in shapes.items()}
    assert net(x)["attention"].shape == (2, len(VIEWS))


def test_the_cache_keys_of_the_first_versions_views_keep_their_values(version_1_views):
    assert FeatureConfig().fingerprint() == "f0017200f8dce1a2"
    assert FeatureConfig(pretrained_view=None).fingerprint() == "09bc1cf4567ee34b"


def test_a_view_added_since_joins_the_cache_key_by_name(version_1_views, monkeypatch):
    before = FeatureConfig().fingerprint()
    monkeypatch.setattr(views, "FEATURE_KEYS", views.FEATURE_KEYS + ("toy",))
    monkeypatch.setattr(views, "ALL_KEYS", views.FEATURE_KEYS + (views.PRETRAINED_KEY,))
    assert FeatureConfig().keys[-2:] == ("toy", views.PRETRAINED_KEY)
    assert FeatureConfig().fingerprint() != before
    assert FeatureConfig().fingerprint() == FeatureConfig().fingerprint()
