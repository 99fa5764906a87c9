"""Adaptation to the collection being classified (deepfusion.inference.adapt): what each mode changes,
that evaluate and predict adapt alike, and when ``auto`` applies."""

from __future__ import annotations

import csv
import pickle

import numpy as np
import pytest

from deepfusion.config import ADAPT_MIN_CLIPS
from deepfusion.data.normalize import fit_normalization
from deepfusion.errors import ParameterError
from deepfusion.inference import adapt as adapt_module
from deepfusion.inference.adapt import Adapter, adapt, resolve_mode
from deepfusion.io.features_file import load_features
from deepfusion.models.checkpoint import load_checkpoint, model_from_checkpoint, normalization_of
from deepfusion.testing import invoke, load_own_pickle


def test_auto_applies_to_new_collections_of_enough_clips():
    assert resolve_mode("auto", n_clips=ADAPT_MIN_CLIPS, new_collection=True) == "full"
    assert resolve_mode("auto", n_clips=ADAPT_MIN_CLIPS - 1, new_collection=True) == "none"
    assert resolve_mode("auto", n_clips=10_000, new_collection=False) == "none"
    assert resolve_mode("inputs", n_clips=1, new_collection=False) == "inputs"
    with pytest.raises(ParameterError, match=r"^--adapt always: give auto, none, inputs or full$"):
        resolve_mode("always", n_clips=1, new_collection=True)


@pytest.fixture(scope="module")
def shifted(tiny_features, tmp_path_factory):
    """Another production of the same clips' features: every view shifted and scaled per row
    (what another recording chain does), the labels kept."""
    items = load_own_pickle(tiny_features)
    rng = np.random.default_rng(0)
    for it in items:
        for k, a in it["features"].items():
            gen = np.random.default_rng(abs(hash(k)) % 2**32)
            scale = gen.uniform(0.5, 2.0, size=(a.shape[0], 1)).astype(np.float32)
            shift = gen.normal(0, 3, size=(a.shape[0], 1)).astype(np.float32)
            it["features"][k] = a * scale + shift
        it["path"] = "shifted/" + it["path"]
    rng.shuffle(items)
    path = tmp_path_factory.mktemp("shifted") / "shifted.pkl"
    path.write_bytes(pickle.dumps(items))
    return path


def test_inputs_is_the_collections_own_normalisation(trained_model_dir, shifted):
    ckpt = load_checkpoint(trained_model_dir / "best.pth")
    model, norm = model_from_checkpoint(ckpt), normalization_of(ckpt)
    fs = load_features(shifted, class_names=list(ckpt["class_names"]))
    clips = np.arange(len(fs))
    same_model, own = adapt(model, fs, norm, clips, mode="inputs", seg=fs.n_frames)
    assert same_model is model
    want = fit_normalization(fs, clips)
    for k in norm:
        np.testing.assert_array_equal(own[k]["mean"], want[k]["mean"])
        np.testing.assert_array_equal(own[k]["std"], want[k]["std"])
    assert adapt(model, fs, norm, clips, mode="none", seg=5) == (model, norm)


@pytest.mark.slow
def test_full_reestimates_batchnorm_on_a_copy(trained_model_dir, shifted):
    import torch

    ckpt = load_checkpoint(trained_model_dir / "best.pth")
    model, norm = model_from_checkpoint(ckpt), normalization_of(ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fs = load_features(shifted, class_names=list(ckpt["class_names"]))
    adapted, _ = adapt(model, fs, norm, np.arange(len(fs)), mode="full", seg=64)
    for k, v in model.state_dict().items():          # the checkpoint's model is untouched
        assert torch.equal(v, before[k]), k
    changed = [k for k, v in adapted.state_dict().items()
               if k.endswith("running_mean") and not torch.equal(v, before[k])]
    assert changed and not adapted.training
    # weights are the trained ones: only the statistics move
    for k, v in adapted.state_dict().items():
        if k.endswith("weight") or k.endswith("bias"):
            assert torch.equal(v, before[k]), k


@pytest.mark.slow
def test_full_on_the_probe_standardises_its_statistics_by_the_collection(tiny_features, shifted,
                                                                         tmp_path):
    from deepfusion.config import TrainConfig
    from deepfusion.models.probe import clip_stats
    from deepfusion.train.run import train

    train(tiny_features, model_dir=tmp_path / "p", quiet=True, config=TrainConfig(model="probe"),
          echo=lambda s: None)
    ckpt = load_checkpoint(tmp_path / "p" / "best.pth")
    probe, norm = model_from_checkpoint(ckpt), normalization_of(ckpt)
    fs = load_features(shifted, class_names=list(ckpt["class_names"]))
    clips = np.arange(len(fs))
    adapted, own = adapt(probe, fs, norm, clips, mode="full", seg=fs.n_frames)
    stats = clip_stats(fs, own, clips, probe.keys)
    np.testing.assert_allclose(adapted.stat_mean.numpy(), stats.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adapted.stat_scale.numpy(), np.maximum(stats.std(axis=0), 1e-8),
                               rtol=1e-4, atol=1e-6)
    # batches fed one by one give the same statistics as the whole collection at once
    adapter = Adapter(probe, own, seg=fs.n_frames)
    for part in np.array_split(clips, 4):
        adapter.add(fs, part)
    np.testing.assert_allclose(adapter.model().stat_mean.numpy(), adapted.stat_mean.numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_adaptation_recovers_a_shifted_collection(tiny_features, shifted, tmp_path):
    """The probe on a collection whose every row moved: without adaptation it is lost, with
    it the shift is undone (the shift is per row, exactly what the statistics remove)."""
    from deepfusion.config import TrainConfig
    from deepfusion.evaluate import evaluate
    from deepfusion.train.run import train

    train(tiny_features, model_dir=tmp_path / "p", quiet=True,
          config=TrainConfig(model="probe", val_size=0.2, test_size=0.0), echo=lambda s: None)
    scores = {}
    for mode in ("none", "inputs", "full"):
        report = evaluate(tmp_path / "p" / "best.pth", features=shifted, split="all",
                          out_dir=tmp_path / mode, adapt=mode, n_boot=10, echo=lambda s: None)
        scores[mode] = report.metrics["accuracy"]
        assert report.info["adapt"] == mode
    assert scores["inputs"] > scores["none"] and scores["full"] >= 0.9


@pytest.mark.slow
def test_auto_in_evaluate(trained_model_dir, shifted, tmp_path, monkeypatch):
    from deepfusion.evaluate import evaluate

    lines: list[str] = []
    report = evaluate(trained_model_dir / "best.pth", split="test", out_dir=tmp_path / "own",
                      n_boot=10, echo=lines.append)
    assert report.info["adapt"] == "none"          # its own collection: never adapted
    report = evaluate(trained_model_dir / "best.pth", features=shifted, split="all",
                      out_dir=tmp_path / "small", n_boot=10, echo=lines.append)
    assert report.info["adapt"] == "none"          # 18 clips: under the minimum
    monkeypatch.setattr(adapt_module, "ADAPT_MIN_CLIPS", 10)
    report = evaluate(trained_model_dir / "best.pth", features=shifted, split="all",
                      out_dir=tmp_path / "new", n_boot=10, echo=lines.append)
    assert report.info["adapt"] == "full"
    assert any(line.startswith("adapting to shifted.pkl (full)") for line in lines)


@pytest.mark.slow
def test_predict_adapts_as_evaluate_does(trained_model_dir, tiny_audio, tmp_path):
    """predict --adapt full over a folder gives evaluate --adapt full's probabilities for the
    same clips: one adaptation, two stages."""
    from deepfusion.evaluate import evaluate
    from deepfusion.extract import extract
    from deepfusion.testing import TINY_FEATURES

    feats = extract(tiny_audio, out=tmp_path / "f.pkl", cache_dir=tmp_path / "cache", jobs=1,
                    config=TINY_FEATURES, quiet=True).out
    ckpt = trained_model_dir / "best.pth"
    evaluate(ckpt, features=feats, split="all", out_dir=tmp_path / "ev", adapt="full", n_boot=10,
             echo=lambda s: None)
    with open(tmp_path / "ev" / "predictions.csv") as fh:
        want = {row["path"]: row for row in csv.DictReader(fh)}
    result = invoke("predict", tiny_audio, "--checkpoint", ckpt, "--cache-dir", tmp_path / "cache",
                    "--adapt", "full", "--quiet", "--jobs", "1", "--out", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    with open(tmp_path / "p.csv") as fh:
        got = {row["path"]: row for row in csv.DictReader(fh)}
    assert len(got) == len(want) == 18
    for path, row in got.items():
        rel = str(__import__("pathlib").Path(path).relative_to(tiny_audio))
        for genre in ("rock", "techno", "waltz"):
            if f"p_{genre}" in want[rel]:
                # the same adaptation; statistics summed in another order (float rounding)
                assert abs(float(row[genre]) - float(want[rel][f"p_{genre}"])) < 1e-4, (rel, genre)


def test_onnx_engine_cannot_adapt(trained_model_dir, tmp_path):
    result = invoke("predict", tmp_path, "--engine", "onnx", "--checkpoint", tmp_path / "m.onnx",
                    "--adapt", "inputs")
    assert result.exit_code != 0
    assert "onnx engine's normalisation is inside its graph" in result.output
