"""train --init-from and --freeze-branches through the real command."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from deepfusion.testing import TINY_FEATURES, invoke, one_error_line


@pytest.fixture(scope="module")
def other_features(tmp_path_factory) -> Path:
    """Another collection: rock (shared with the tiny set), reggae and ambient (new)."""
    from deepfusion.extract import extract
    from deepfusion.synth import synthesize_dataset

    root = tmp_path_factory.mktemp("other")
    synthesize_dataset(root / "audio", genres=5, clips_per_genre=5, duration=6.0, seed=1)
    for genre in ("techno", "waltz"):
        shutil.rmtree(root / "audio" / genre)
    result = extract(root / "audio", out=root / "features.pkl", cache_dir=root / "cache", jobs=1,
                     config=TINY_FEATURES, quiet=True)
    assert result.n_items == 15
    return result.out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model_state"]


@pytest.mark.slow
def test_init_from_another_genre_set_with_frozen_branches(trained_model_dir, other_features, tmp_path):
    source = trained_model_dir / "best.pth"
    out = tmp_path / "tuned"
    result = invoke("train", "--features", other_features, "--model-dir", out, "--init-from",
                    source, "--freeze-branches", "--epochs", "3", "--batch-size", "8",
                    "--val-size", "0.2", "--test-size", "0.2", "--backbone", "resnet18", "-q")
    assert result.exit_code == 0, result.output
    assert "ignored with --init-from: --backbone resnet18 (the model's: light)" in result.output
    assert "started from 3-genre model (1 of this collection's 3 genres shared: rock)" in result.output
    ckpt = torch.load(out / "best.pth", map_location="cpu", weights_only=True)
    assert ckpt["class_names"] == ["ambient", "reggae", "rock"]
    assert ckpt["train_config"]["init_from"] == str(source)
    assert ckpt["train_config"]["freeze_branches"] is True
    before, after = _state(source), ckpt["model_state"]
    branches = [k for k in after if k.startswith(("mel.", "aux."))]
    assert branches and all(torch.equal(before[k], after[k]) for k in branches), \
        "a frozen branch changed (weights or BatchNorm statistics)"
    trained = [k for k in after if k.startswith(("fusion.", "attention."))]
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    assert after["classifier.weight"].shape[0] == 3
    report = invoke("evaluate", "--checkpoint", out / "best.pth", "--out-dir", tmp_path / "eval")
    assert report.exit_code == 0, report.output


@pytest.mark.slow
def test_init_from_trains_everything_without_freezing(trained_model_dir, other_features, tmp_path):
    source = trained_model_dir / "best.pth"
    result = invoke("train", "--features", other_features, "--model-dir", tmp_path / "m",
                    "--init-from", source, "--epochs", "2", "--batch-size", "8", "-q")
    assert result.exit_code == 0, result.output
    before, after = _state(source), _state(tmp_path / "m" / "best.pth")
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("mel."))


def test_init_from_other_features_or_a_probe_is_refused(trained_model_dir, other_features, tmp_path):
    ckpt = torch.load(trained_model_dir / "best.pth", map_location="cpu", weights_only=True)
    ckpt["feature_config"]["fmax"] = 8000.0
    torch.save(ckpt, tmp_path / "fmax.pth")
    result = invoke("train", "--features", other_features, "--model-dir", tmp_path / "a",
                    "--init-from", tmp_path / "fmax.pth", "--epochs", "1")
    line = one_error_line(result.stderr)
    assert str(tmp_path / "fmax.pth") in line and "(--fmax auto here, 8000 for the model)" in line, line
    result = invoke("train", "--features", other_features, "--model-dir", tmp_path / "b",
                    "--freeze-branches", "--epochs", "1")
    assert "--freeze-branches needs --init-from" in one_error_line(result.stderr)
    # a linear probe of this very collection (its features agree): refused for being a probe
    from deepfusion.config import TrainConfig
    from deepfusion.train.run import train

    train(other_features, model_dir=tmp_path / "probe", quiet=True,
          config=TrainConfig(model="probe"), echo=lambda s: None)
    probe = tmp_path / "probe" / "best.pth"
    result = invoke("train", "--features", other_features, "--model-dir", tmp_path / "c",
                    "--init-from", probe, "--epochs", "1")
    line = one_error_line(result.stderr)
    assert f"{probe}: a linear probe has no branches to start from" in line, line
    assert not any((tmp_path / d / "best.pth").exists() for d in "abc")
