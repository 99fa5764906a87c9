"""Shared fixtures: a tiny synthetic dataset, its features file and a trained checkpoint.

Everything is generated in temporary folders by the project's own synthetic generator, so the
suite needs no data outside the repository. Helpers shared with the benchmarks (running the
command, comparing outputs) are in :mod:`deepfusion.testing`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deepfusion.testing import TINY_DATASET, TINY_FEATURES, closed_port


@pytest.fixture(autouse=True, scope="session")
def _no_weights_download(tmp_path_factory):
    """No test reaches the internet for ImageNet weights: downloads go to a closed port on
    127.0.0.1 and the torch cache is an empty folder (tests that need more set their own)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DEEPFUSION_WEIGHTS_URL", f"http://127.0.0.1:{closed_port()}/")
    mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
    # predict and embed run in this process without --cache-dir fill this, not ./data/cache
    mp.setenv("DEEPFUSION_CACHE", str(tmp_path_factory.mktemp("default-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_audio(tmp_path_factory) -> Path:
    """3 genres x 6 clips of 6 s, GTZAN layout."""
    from deepfusion.synth import synthesize_dataset

    root = tmp_path_factory.mktemp("audio")
    synthesize_dataset(root, **TINY_DATASET)
    return root


@pytest.fixture(scope="session")
def tiny_features(tiny_audio, tmp_path_factory) -> Path:
    """The features file of ``tiny_audio`` (extracted once per session)."""
    from deepfusion.extract import extract

    work = tmp_path_factory.mktemp("features")
    result = extract(tiny_audio, out=work / "features.pkl", cache_dir=work / "cache", jobs=1,
                     config=TINY_FEATURES, quiet=True)
    assert result.n_items == 18 and not result.errors
    return result.out


@pytest.fixture(scope="session")
def trained_model_dir(tiny_features, tmp_path_factory) -> Path:
    """A model directory after a short light-backbone training run (12 epochs, ~10 s)."""
    from deepfusion.config import TrainConfig
    from deepfusion.train.run import train

    model_dir = tmp_path_factory.mktemp("model")
    train(tiny_features, model_dir=model_dir, backbone="light", pretrained=False, quiet=True,
          config=TrainConfig(epochs=12, batch_size=8, lr=3e-3, val_size=0.2, test_size=0.2),
          echo=lambda s: None)
    return model_dir


@pytest.fixture
def version_1_views(monkeypatch):
    """The registry's keys as the feature code's version 1 had them (the seven views): the
    cache keys the tests pin are theirs; a view added to deepfusion.views since changes them
    (it joins the key by name), as it must."""
    from deepfusion import views
    from deepfusion.config import VERSION_1_VIEWS

    monkeypatch.setattr(views, "FEATURE_KEYS",
                        tuple(k for k in VERSION_1_VIEWS if k != views.PRETRAINED_KEY))
    monkeypatch.setattr(views, "ALL_KEYS", VERSION_1_VIEWS)
