"""Shared fixtures: a tiny synthetic dataset, its features file and a trained checkpoint.

Everything is generated in temporary folders by the project's own synthetic generator, so the
suite needs no data outside the repository.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from deepfusion.config import FeatureConfig

TINY = dict(genres=3, clips_per_genre=6, duration=6.0, seed=0)
TINY_FEATURES = FeatureConfig(duration=6.0)


def cli_runner() -> CliRunner:
    """A CliRunner that keeps stderr apart from stdout."""
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2 mixes stderr into stdout by default
    except TypeError:
        return CliRunner()


def invoke(*args):
    """The command in-process (so that monkeypatches apply); stderr kept apart."""
    from deepfusion.cli import main

    return cli_runner().invoke(main, [str(a) for a in args])


def one_error_line(stderr: str) -> str:
    """The single ``Error: ...`` line a refused input or an impossible output must produce."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert "internal error" not in lines[0], stderr      # a bug, not a refused input
    return lines[0]


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (connections are refused at once)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True, scope="session")
def _no_weights_download(tmp_path_factory):
    """No test reaches the internet for ImageNet weights: downloads go to a closed port on
    127.0.0.1 and the torch cache is an empty folder (tests that need more set their own)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DEEPFUSION_WEIGHTS_URL", f"http://127.0.0.1:{closed_port()}/")
    mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_audio(tmp_path_factory) -> Path:
    """3 genres x 6 clips of 6 s, GTZAN layout."""
    from deepfusion.synth import synthesize_dataset

    root = tmp_path_factory.mktemp("audio")
    synthesize_dataset(root, **TINY)
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
    from deepfusion.train import train

    model_dir = tmp_path_factory.mktemp("model")
    train(tiny_features, model_dir=model_dir, backbone="light", pretrained=False, quiet=True,
          config=TrainConfig(epochs=12, batch_size=8, lr=3e-3, val_size=0.2, test_size=0.2),
          echo=lambda s: None)
    return model_dir
