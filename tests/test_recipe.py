"""The training recipe: augmentation, EMA and mixup, best.pth selection, resume that extends a
run, the linear probe and cross-validation, through the real commands where they exist."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from deepfusion.config import TrainConfig
from deepfusion.data.dataset import Augment, make_torch_dataset
from deepfusion.errors import DatasetError, ParameterError
from deepfusion.io.featureset import FeatureSet
from deepfusion.testing import invoke, one_error_line, small_rows
from deepfusion.train.crossval import grouped_folds
from deepfusion.train.recipe import resolve_recipe
from deepfusion.views import FEATURE_KEYS, MEL_KEYS

COMMON = ("--backbone", "light", "--no-pretrained", "--batch-size", "8", "--lr", "3e-3",
          "--val-size", "0.2", "--test-size", "0.2", "--quiet")


def _history(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


# ----------------------------------------------------------------------------- augmentation

def _toy_set(n: int = 4, t: int = 40) -> FeatureSet:
    rng = np.random.default_rng(0)
    rows = small_rows(16, mfcc=8, chroma=12, tempogram=10)
    arrays = {k: rng.normal(size=(n, r, t)).astype(np.float32) for k, r in rows.items()}
    return FeatureSet(arrays, np.arange(n) % 2, ["a", "b"], [f"{i}.wav" for i in range(n)],
                      np.arange(n))


def _unit_norm(fs: FeatureSet) -> dict:
    return {k: {"mean": np.zeros(a.shape[1], np.float32), "std": np.ones(a.shape[1], np.float32)}
            for k, a in fs.arrays.items()}


def test_tilt_adds_a_ramp_to_the_mel_views_and_its_dct_to_the_mfcc():
    from scipy.fft import dct

    fs = _toy_set()
    views = {k: fs.arrays[k][0] for k in FEATURE_KEYS}
    out = Augment(tilt_db=6.0).apply(views, np.random.default_rng(1))
    ramp = (out["mel_spec_orig"] - views["mel_spec_orig"])[:, 0]
    for k in MEL_KEYS:                                   # one ramp, every frame, every mel view
        np.testing.assert_allclose(out[k] - views[k], np.repeat(ramp[:, None], 40, 1), atol=1e-5)
    assert abs(ramp[-1] - ramp[0]) <= 6.0 + 1e-5 and abs(ramp[-1] - ramp[0]) > 0
    np.testing.assert_allclose(np.diff(ramp), np.diff(ramp)[0], atol=1e-5)      # linear
    np.testing.assert_allclose((out["mfcc"] - views["mfcc"])[:, 0],
                               dct(ramp, type=2, norm="ortho")[:8], atol=1e-4)
    for k in ("chroma", "tempogram"):
        assert out[k] is views[k]                        # untouched
    assert np.array_equal(views["mel_spec_orig"], fs.arrays["mel_spec_orig"][0])  # inputs intact


def test_masks_set_bands_and_frames_to_the_mean():
    x = {k: np.ones((16 if k in MEL_KEYS else 8, 50), np.float32) for k in FEATURE_KEYS}
    Augment(freq_mask=0.3, time_mask=0.2).mask(x, np.random.default_rng(3))
    masked_frames = [t for t in range(50) if (x["chroma"][:, t] == 0).all()]
    assert 0 < len(masked_frames) <= 2 * 10
    for k in FEATURE_KEYS:                               # time masks hit every view alike
        assert all((x[k][:, t] == 0).all() for t in masked_frames)
    band_zero = (x["mel_spec_orig"] == 0).all(axis=1)
    assert band_zero.sum() <= 2 * 4
    assert not (x["chroma"] == 0).all(axis=1).any()      # frequency masks only on mel views


def test_augmented_training_items_are_reproducible_and_evaluation_is_never_augmented():
    fs = _toy_set()
    norm = _unit_norm(fs)
    aug = Augment(tilt_db=6, freq_mask=0.2, time_mask=0.2)
    ds = make_torch_dataset(fs, norm, np.arange(4), seg=20, seed=5, augment=aug)
    a, b = ds[(1, 3)][0], ds[(1, 3)][0]
    for k in FEATURE_KEYS:
        assert torch.equal(a[k], b[k])                  # a function of (seed, epoch, item)
    assert any(not torch.equal(a[k], ds[(1, 4)][0][k]) for k in FEATURE_KEYS)
    plain = make_torch_dataset(fs, norm, np.arange(4), seg=20, seed=5)
    same_crop = plain[(1, 3)][0]
    assert not torch.equal(a["mel_spec_orig"], same_crop["mel_spec_orig"])
    fixed = make_torch_dataset(fs, norm, np.arange(4), seg=20, starts=np.zeros(4, np.int64),
                               augment=aug)
    for k in FEATURE_KEYS:                               # evaluation segments: no augmentation
        np.testing.assert_array_equal(fixed[2][0][k].numpy(), fs.arrays[k][2, :, :20])


# ----------------------------------------------------------------------------- recipe config

def test_auto_fields_resolve_per_backbone_and_bad_values_are_refused():
    light = resolve_recipe(TrainConfig(), "light", False)
    assert light.resolved and light.lr == 1e-3
    assert resolve_recipe(TrainConfig(), "resnet50", True).lr < resolve_recipe(TrainConfig(), "resnet50", False).lr
    assert resolve_recipe(TrainConfig(lr=0.5), "light", False).lr == 0.5     # given wins
    for bad, message in ((dict(select="best"), "--select best: give last, val_loss, val_acc"),
                         (dict(ema=1.0), "--ema 1: must be 0 or more and below 1"),
                         (dict(mixup=-1), "--mixup -1: must be 0 or more"),
                         (dict(time_mask=1.0), "--time-mask 1: must be 0 or more and below 1"),
                         (dict(model="svm"), "--model svm: give net or probe"),
                         (dict(probe_c=0), "--probe-c 0: must be above 0")):
        with pytest.raises(ParameterError, match=f"^{re.escape(message)}$"):
            TrainConfig(**bad)


def test_train_help_says_what_auto_means():
    result = invoke("train", "--help")
    assert result.exit_code == 0
    assert "auto" in result.output and "light 1e-3" in result.output.replace("\n", " ")


# ------------------------------------------------------------------------ training and resume

@pytest.mark.slow
def test_ema_mixup_and_augmentation_train_and_resume_exactly(tiny_features, tmp_path):
    """An interrupted run of the full recipe resumes to the same weights as an uninterrupted one."""
    from deepfusion.train.run import train

    config = TrainConfig(epochs=4, batch_size=8, lr=3e-3, val_size=0.2, test_size=0.2, seed=2,
                         ema=0.9, mixup=0.4, freq_mask=0.15, time_mask=0.1, tilt_db=6.0)
    kw = dict(backbone="light", pretrained="never", quiet=True)
    train(tiny_features, model_dir=tmp_path / "full", config=config, echo=lambda s: None, **kw)

    class Stop(Exception):
        pass

    def stop_after_two(line: str) -> None:
        if line.startswith("epoch   2"):
            raise Stop
    with pytest.raises(Stop):
        train(tiny_features, model_dir=tmp_path / "cut", config=config, echo=stop_after_two, **kw)
    said: list[str] = []
    train(tiny_features, model_dir=tmp_path / "cut", config=TrainConfig(), resume=True,
          echo=said.append, **kw)
    assert any(s.startswith("resuming after epoch 2") for s in said)
    a = torch.load(tmp_path / "full" / "best.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "best.pth", weights_only=True)
    for k in a["model_state"]:
        torch.testing.assert_close(a["model_state"][k], b["model_state"][k], rtol=0, atol=0)
    assert a["train_config"]["ema"] == 0.9 and a["epoch"] == 4       # select last: epoch 4


@pytest.mark.slow
def test_resume_with_more_epochs_extends_the_run(tiny_features, tmp_path):
    short, long_ = tmp_path / "short", tmp_path / "long"
    assert invoke("train", "--features", tiny_features, "--model-dir", short, "--epochs", "2",
                  *COMMON).exit_code == 0
    assert invoke("train", "--features", tiny_features, "--model-dir", long_, "--epochs", "4",
                  *COMMON).exit_code == 0
    result = invoke("train", "--features", tiny_features, "--model-dir", short, "--resume",
                    "--epochs", "4", "--quiet")
    assert result.exit_code == 0, result.output + result.stderr
    assert "epochs: 2 -> 4" in result.output and "resuming after epoch 2" in result.output
    rows = _history(short / "training_history.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    # from epoch 3 on, the schedule is that of the 4-epoch run
    full = _history(long_ / "training_history.csv")
    assert [float(r["lr"]) for r in rows[2:]] == pytest.approx([float(r["lr"]) for r in full[2:]])
    assert torch.load(short / "best.pth", weights_only=True)["train_config"]["epochs"] == 4
    # nothing more to do: said, not silently ignored
    again = invoke("train", "--features", tiny_features, "--model-dir", short, "--resume", "--quiet")
    assert again.exit_code == 0 and "give a larger --epochs" in again.output
    shorter = invoke("train", "--features", tiny_features, "--model-dir", short, "--resume",
                     "--epochs", "3")
    assert shorter.exit_code != 0 and "already trained 4 epochs" in shorter.stderr


@pytest.mark.slow
def test_resume_names_options_it_ignores_and_takes_the_new_device(tiny_features, tmp_path):
    out = tmp_path / "m"
    assert invoke("train", "--features", tiny_features, "--model-dir", out, "--epochs", "1",
                  *COMMON).exit_code == 0
    result = invoke("train", "--features", tiny_features, "--model-dir", out, "--resume",
                    "--lr", "0.5", "--mixup", "0.2", "--backbone", "resnet18", "--patience", "7",
                    "--device", "cpu", "--epochs", "2", "--quiet")
    assert result.exit_code == 0, result.stderr
    ignored = [ln for ln in result.output.splitlines() if ln.startswith("ignored with --resume")]
    assert any("--lr 0.5" in ln and "--mixup 0.2" in ln for ln in ignored), result.output
    assert any("--backbone resnet18" in ln for ln in ignored)
    assert "patience: 40 -> 7" in result.output
    raw = torch.load(out / "last.pth", weights_only=True)
    assert raw["train_config"]["lr"] == 3e-3 and raw["runtime_config"]["device"] == "cpu"
    assert "device" not in raw["train_config"]                # the recipe holds no runtime


@pytest.mark.slow
@pytest.mark.parametrize("stored", ["runtime_config", "legacy train_config"])
def test_resume_with_device_cpu_continues_a_run_stored_on_another_device(tiny_features, tmp_path,
                                                                         stored):
    """A run started on a GPU (its last.pth says cuda:1, amp on, 4 workers) continues on this
    CPU-only machine with --device cpu; runs saved before RuntimeConfig existed kept the
    runtime fields inside train_config and resume as well."""
    out = tmp_path / "m"
    assert invoke("train", "--features", tiny_features, "--model-dir", out, "--epochs", "1",
                  *COMMON).exit_code == 0
    raw = torch.load(out / "last.pth", weights_only=True)
    elsewhere = {"device": "cuda:1", "amp": True, "channels_last": True, "num_workers": 4}
    if stored == "runtime_config":
        raw["runtime_config"] = elsewhere
    else:
        del raw["runtime_config"]
        raw["train_config"].update(elsewhere)
    torch.save(raw, out / "last.pth")
    result = invoke("train", "--features", tiny_features, "--model-dir", out, "--resume",
                    "--device", "cpu", "--epochs", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert "resuming after epoch 1" in result.output and "on cpu" in result.output
    assert "ignored" not in result.output                      # runtime is never "ignored"
    resumed = torch.load(out / "last.pth", weights_only=True)
    assert resumed["epoch"] == 2
    assert resumed["runtime_config"] == {"device": "cpu", "amp": True, "amp_dtype": "auto",
                                         "channels_last": True, "num_workers": 0,
                                         "sync_bn": False, "deterministic": False,
                                         "save_every": 300.0}
    report = invoke("evaluate", "--checkpoint", out / "best.pth", "--device", "cpu",
                    "--out-dir", tmp_path / "report")
    assert report.exit_code == 0, report.output


@pytest.mark.slow
@pytest.mark.parametrize("select", ["val_loss", "val_acc"])
def test_best_checkpoint_follows_the_selection_rule(tiny_features, tmp_path, select):
    out = tmp_path / select
    result = invoke("train", "--features", tiny_features, "--model-dir", out, "--epochs", "4",
                    "--select", select, *COMMON)
    assert result.exit_code == 0, result.stderr
    rows = _history(out / "training_history.csv")
    key = (lambda r: -float(r["val_loss"])) if select == "val_loss" else (lambda r: float(r["val_acc"]))
    first_best = max(range(len(rows)), key=lambda i: (key(rows[i]), -i))
    assert torch.load(out / "best.pth", weights_only=True)["epoch"] == first_best + 1


# ------------------------------------------------------------------------------ linear probe

@pytest.mark.slow
def test_probe_trains_evaluates_and_predicts_through_the_commands(tiny_features, tiny_audio, tmp_path):
    out = tmp_path / "probe"
    result = invoke("train", "--features", tiny_features, "--model-dir", out, "--model", "probe",
                    "--val-size", "0.2", "--test-size", "0.2")
    assert result.exit_code == 0, result.stderr
    assert "linear probe" in result.output and "test: clip accuracy" in result.output
    raw = torch.load(out / "best.pth", weights_only=True)
    assert raw["model_config"]["kind"] == "probe" and raw["train_config"]["segment_seconds"] is None
    report = invoke("evaluate", "--checkpoint", out / "best.pth")
    assert report.exit_code == 0, report.stderr
    acc = float(re.search(r"clip accuracy\s+([\d.]+)", report.output).group(1))
    assert acc == pytest.approx(raw["metrics"]["test"]["clip_acc"], abs=5e-4)   # 3 decimals
    assert acc > 0.5                                     # 3 genres: chance is 1/3
    # on all 18 clips: a random guess reaches 13 with probability 8.5e-4
    every = invoke("evaluate", "--checkpoint", out / "best.pth", "--split", "all",
                   "--out-dir", tmp_path / "all")
    assert every.exit_code == 0, every.stderr
    acc = float(re.search(r"clip accuracy\s+([\d.]+)", every.output).group(1))
    assert round(acc * 18) >= 13, every.output
    clip = sorted(Path(tiny_audio).rglob("*.wav"))[0]
    pred = invoke("predict", clip, "--checkpoint", out / "best.pth")
    assert pred.exit_code == 0 and pred.output.startswith(str(clip))
    fitted = (out / "best.pth").read_bytes()
    resumed = invoke("train", "--features", tiny_features, "--model-dir", out, "--model", "probe",
                     "--resume")
    assert resumed.exit_code != 0
    line = one_error_line(resumed.stderr)         # a probe writes no last.pth to resume from
    assert f"{out}: nothing to resume (no last.pth there)" in line, line
    assert (out / "best.pth").read_bytes() == fitted


# -------------------------------------------------------------------------- cross-validation

def test_grouped_folds_keep_groups_whole_and_stratify():
    labels = np.repeat(np.arange(3), 20)
    groups = np.arange(60) // 2                          # 30 two-clip tracks
    fold = grouped_folds(labels, groups, 5, seed=1)
    assert set(fold.tolist()) == set(range(5))
    for g in np.unique(groups):
        assert len(set(fold[groups == g])) == 1
    for f in range(5):
        counts = np.bincount(labels[fold == f], minlength=3)
        assert counts.min() >= 2                          # every genre in every fold
    assert (grouped_folds(labels, groups, 5, seed=1) == fold).all()
    with pytest.raises(DatasetError, match="--folds 40 needs at least 40 groups of clips .*, it has 30; give --folds 30 or fewer"):
        grouped_folds(labels, groups, 40)
    one_group_genre = np.where(labels == 2, 999, groups)  # genre 2: a single artist
    with pytest.raises(DatasetError, match="--folds 3: fold . would hold every clip of genre 2; give fewer --folds"):
        grouped_folds(labels, one_group_genre, 3)


@pytest.mark.slow
def test_train_folds_writes_per_fold_figures_and_every_clip_once(tiny_features, tmp_path):
    out = tmp_path / "cv"
    result = invoke("train", "--features", tiny_features, "--model-dir", out, "--folds", "3",
                    "--epochs", "3", "--backbone", "light", "--no-pretrained", "--batch-size", "8",
                    "--lr", "3e-3", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert re.search(r"^clip accuracy: [\d.]+ \+- [\d.]+ over 3 folds", result.output, re.M)
    folds = pd.read_csv(out / "cross_validation.csv")
    assert list(folds.columns) == ["fold", "clips", "clip_accuracy", "balanced_accuracy",
                                   "macro_f1", "best_epoch"]
    assert folds["fold"].tolist() == [1, 2, 3] and folds["clips"].sum() == 18
    pred = pd.read_csv(out / "cross_validation_predictions.csv")
    assert len(pred) == 18 and pred["path"].is_unique
    assert {"path", "true_genre", "predicted_genre", "fold"} <= set(pred.columns)
    p_cols = [c for c in pred.columns if c.startswith("p_")]
    assert len(p_cols) == 3
    np.testing.assert_allclose(pred[p_cols].sum(axis=1), 1.0, atol=1e-4)
    for f in (1, 2, 3):
        assert (out / f"fold-{f}" / "best.pth").is_file()
        raw = torch.load(out / f"fold-{f}" / "best.pth", weights_only=True)
        tested = set(pred.loc[pred["fold"] == f, "path"])
        assert set(raw["split"]["test"]) == tested
        assert not tested & set(raw["split"]["train"]) and not tested & set(raw["split"]["val"])
    acc = (pred["true_genre"] == pred["predicted_genre"]).groupby(pred["fold"]).mean()
    np.testing.assert_allclose(acc.values, folds["clip_accuracy"].values, atol=1e-6)


# ------------------------------------------------------------------------------ band stats

@pytest.mark.slow
def test_band_stats_branches_train_and_old_checkpoints_still_load(tiny_features, trained_model_dir,
                                                                  tmp_path):
    from deepfusion.models.checkpoint import load_checkpoint, model_from_checkpoint

    out = tmp_path / "bs"
    result = invoke("train", "--features", tiny_features, "--model-dir", out, "--epochs", "1",
                    "--band-stats", *COMMON)
    assert result.exit_code == 0, result.stderr
    raw = torch.load(out / "best.pth", weights_only=True)
    assert raw["model_config"]["band_stats"] is True
    n_mels = raw["model_config"]["n_mels"]
    proj = raw["model_state"]["mel.mel_spec_orig.proj.0.weight"]
    assert proj.shape[1] == 128 + 2 * n_mels            # light CNN width + mean and std per band
    assert invoke("evaluate", "--checkpoint", out / "best.pth").exit_code == 0
    # a checkpoint written before the field existed
    old = load_checkpoint(trained_model_dir / "best.pth")
    old["model_config"] = {k: v for k, v in old["model_config"].items() if k != "band_stats"}
    model = model_from_checkpoint(old)
    assert model.mel["mel_spec_orig"].band_stats == 0
