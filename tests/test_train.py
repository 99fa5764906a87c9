"""The network, splits, normalisation and the train stage through the real command."""

from __future__ import annotations

import csv
import pickle
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfusion.config import ModelConfig
from deepfusion.data.normalize import fit_normalization
from deepfusion.data.splits import check_split, make_split
from deepfusion.errors import DatasetError
from deepfusion.io.features_file import load_feature_set
from deepfusion.models.checkpoint import load_checkpoint, model_from_checkpoint, normalization_of
from deepfusion.models.net import MultiModalNet, count_parameters
from deepfusion.progress import epoch_seconds
from deepfusion.testing import cli_command, invoke, small_rows, subprocess_env
from deepfusion.views import FEATURE_KEYS

ROWS = small_rows(32, mfcc=20, chroma=12, tempogram=48)


def batch(b: int = 2, t: int = 24) -> dict[str, torch.Tensor]:
    return {k: torch.randn(b, r, t) for k, r in ROWS.items()}


@pytest.mark.parametrize("backbone", ["light", "resnet18",
                                      pytest.param("resnet34", marks=pytest.mark.slow),
                                      pytest.param("resnet50", marks=pytest.mark.slow)])
@pytest.mark.parametrize("share", [False, True])
def test_model_shapes_and_attention(backbone, share):
    config = ModelConfig(n_classes=5, n_mels=32, aux_rows=(20, 12, 48), backbone=backbone,
                         share_backbone=share)
    model = MultiModalNet(config).eval()
    with torch.inference_mode():
        out = model(batch(3))
    assert out["logits"].shape == (3, 5)
    assert out["attention"].shape == (3, 6)
    torch.testing.assert_close(out["attention"].sum(dim=1), torch.ones(3))
    assert (out["attention"] > 0).all()
    if share:
        assert model.mel["mel_spec_orig"] is model.mel["mel_spec_perc"]


def test_light_cnn_is_small_and_sharing_saves_parameters():
    light = MultiModalNet(ModelConfig(n_classes=4, backbone="light"))
    assert count_parameters(light.mel["mel_spec_orig"].body) < 1_000_000
    shared = MultiModalNet(ModelConfig(n_classes=4, backbone="resnet18", share_backbone=True))
    separate = MultiModalNet(ModelConfig(n_classes=4, backbone="resnet18"))
    assert count_parameters(shared) < count_parameters(separate)


def test_split_is_stratified_and_keeps_groups_together():
    labels = np.repeat(np.arange(4), 25)
    groups = np.arange(100)
    # duplicate groups and multi-clip tracks, some of them across genres
    for a, b in [(0, 1), (2, 3), (3, 4), (10, 60), (30, 31), (30, 32), (99, 50)]:
        groups[groups == groups[b]] = groups[a]
    for seed in range(5):
        split = make_split(labels, groups, val_size=0.2, test_size=0.2, seed=seed)
        check_split(split, groups)                         # raises if a group spans two splits
        for g in np.unique(groups):
            assert len(set(split[groups == g])) == 1
        for label in range(4):
            names, counts = np.unique(split[labels == label], return_counts=True)
            assert set(names) == {"train", "val", "test"}
            assert 3 <= dict(zip(names, counts))["test"] <= 7
    split = make_split(labels, groups, val_size=0.2, test_size=0.2, seed=0)
    assert (split == make_split(labels, groups, val_size=0.2, test_size=0.2, seed=0)).all()
    bad = split.copy()
    bad[0], bad[1] = "train", "test"
    with pytest.raises(DatasetError, match="spans train and test; put its clips in one split"):
        check_split(bad, groups)


def test_duplicates_and_tracks_in_features_file_share_a_group(tmp_path):
    items = []
    for i in range(6):
        feats = {k: np.full((r, 10), i, np.float32) for k, r in ROWS.items()}
        items.append({"features": feats, "label": "ab"[i % 2], "path": f"x/{i}.wav",
                      "duplicate_group": i if i != 4 else 0, "group": "t1" if i in (1, 3) else None})
    path = tmp_path / "f.pkl"
    path.write_bytes(pickle.dumps(items))
    fs = load_feature_set(path)
    assert fs.groups[0] == fs.groups[4] and fs.groups[1] == fs.groups[3]
    assert len(set(fs.groups.tolist())) == 4


def test_normalization_uses_training_clips_only(tiny_features):
    fs = load_feature_set(tiny_features)
    train_idx = np.arange(0, len(fs), 2)
    stats = fit_normalization(fs, train_idx)
    for k in FEATURE_KEYS:
        x = fs.arrays[k][train_idx].astype(np.float64)
        np.testing.assert_allclose(stats[k]["mean"], x.mean(axis=(0, 2)), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(stats[k]["std"], np.maximum(x.std(axis=(0, 2)), 1e-5), rtol=1e-3, atol=1e-4)
    fs.arrays["mfcc"][1] += 1000.0                            # a clip outside the training set
    assert np.allclose(fit_normalization(fs, train_idx)["mfcc"]["mean"], stats["mfcc"]["mean"])




def test_train_command_writes_checkpoints_logs_and_curves(tiny_features, tmp_path):
    out = tmp_path / "m"
    result = invoke("train", "--features", tiny_features, "--model-dir", out, "--backbone", "light",
                  "--no-pretrained", "--epochs", "2", "--batch-size", "8", "--lr", "1e-3",
                  "--val-size", "0.2", "--test-size", "0.2", "--quiet")
    assert result.exit_code == 0, result.output
    assert re.search(r"^best\.pth: epoch 2 \(validation clip accuracy [\d.]+\)", result.output, re.M)
    plan = re.search(r"^training light \(given\), [\d.]+ M parameters, on cpu, \w+: 2 epochs of 1 "
                     r"batch of 8 segments of 3 s, lr 0.001, no early stop; patience auto for "
                     r"this backbone; about \d+ s \([\d.]+ s a batch, timed before the first "
                     r"epoch\)$", result.output, re.M)
    assert plan and plan.start() < result.output.index("epoch   1"), result.output
    for name in ("best.pth", "last.pth", "training_history.csv", "training_history.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "training_history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"} <= set(rows[0])
    import matplotlib.image
    assert matplotlib.image.imread(out / "training_history.png").shape[0] > 100
    assert not list(out.glob(".*.tmp"))


def test_epoch_seconds_counts_validation_as_a_quarter_of_a_training_step():
    # 1 s per batch: 20 training batches and 80 validation segments of batch 8 (= 10 batches
    # at 0.25 of a training step's cost)
    assert epoch_seconds(1.0, 20, 80, 8) == pytest.approx(22.5)
    assert epoch_seconds(3.0, 1, 0, 8) == pytest.approx(3.0)


def test_checkpoint_is_self_contained(trained_model_dir, tiny_features):
    raw = torch.load(trained_model_dir / "best.pth", map_location="cpu", weights_only=True)
    for key in ("model_state", "model_config", "class_names", "feature_config", "normalization",
                "split", "train_config", "metrics", "versions", "format_version"):
        assert key in raw, key
    assert raw["class_names"] == sorted(raw["class_names"]) and len(raw["class_names"]) == 3
    split = raw["split"]
    assert not set(split["train"]) & set(split["val"]) and not set(split["val"]) & set(split["test"])
    model = model_from_checkpoint(load_checkpoint(trained_model_dir / "best.pth"))
    fs = load_feature_set(tiny_features, class_names=raw["class_names"])
    norm = normalization_of(raw)
    x = {k: torch.from_numpy((fs.arrays[k][:2] - norm[k]["mean"][:, None]) / norm[k]["std"][:, None])
         for k in fs.keys}
    with torch.inference_mode():
        out = model(x)
    assert out["logits"].shape == (2, len(raw["class_names"]))


def test_learns_the_synthetic_genres(trained_model_dir, tiny_features):
    from deepfusion.config import FeatureConfig
    from deepfusion.data.dataset import segment_frames
    from deepfusion.inference.clips import predict_clips

    raw = torch.load(trained_model_dir / "best.pth", map_location="cpu", weights_only=True)
    # 3 balanced genres: chance is 1/3 on the held-out clips (3 val, 3 test)
    assert raw["metrics"]["val"]["val_acc"] > 0.5
    assert raw["metrics"]["test"]["clip_acc"] > 0.5
    # all 18 clips as evaluate sees them: a random guess gets 13 right with probability
    # 8.5e-4, and 5 of the 6 held-out ones with 0.018
    ckpt = load_checkpoint(trained_model_dir / "best.pth")
    fs = load_feature_set(tiny_features, class_names=raw["class_names"])
    seg = segment_frames(raw["train_config"]["segment_seconds"],
                         FeatureConfig.from_dict(raw["feature_config"]), fs.n_frames)
    pred = predict_clips(model_from_checkpoint(ckpt), fs, normalization_of(ckpt),
                         np.arange(len(fs)), seg=seg)
    right = pred.predicted == fs.labels[pred.clips]
    held_out = np.isin(np.asarray(fs.paths)[pred.clips], raw["split"]["val"] + raw["split"]["test"])
    assert held_out.sum() == 6 and right[held_out].sum() >= 5, right
    assert right.sum() >= 13, right


@pytest.mark.slow
def test_seed_format_pickle_is_accepted(tiny_features, tmp_path):
    items = pickle.loads(Path(tiny_features).read_bytes())
    names = sorted({it["label"] for it in items})
    seed = [{"features": it["features"], "label": names.index(it["label"])} for it in items]
    path = tmp_path / "seed.pkl"
    path.write_bytes(pickle.dumps(seed))
    result = invoke("train", "--features", path, "--model-dir", tmp_path / "m", "--backbone", "light",
                  "--no-pretrained", "--epochs", "1", "--batch-size", "8", "--quiet")
    assert result.exit_code == 0, result.output
    raw = torch.load(tmp_path / "m" / "best.pth", weights_only=True)
    assert raw["class_names"] == ["0", "1", "2"] and raw["split"]["by"] == "index"


def _bad_files(tiny_features, tmp_path):
    items = pickle.loads(Path(tiny_features).read_bytes())
    def save(name, obj):
        p = tmp_path / name
        p.write_bytes(pickle.dumps(obj))
        return p
    missing = [dict(it, features={k: v for k, v in it["features"].items() if k != "chroma"}) for it in items]
    wrong = [dict(it) for it in items]
    wrong[3] = dict(wrong[3], features=dict(wrong[3]["features"], mfcc=np.zeros((13, 5), np.float32)))
    one_class = [dict(it, label="rock") for it in items]
    text = tmp_path / "text.pkl"
    text.write_text("not a pickle")
    return {"missing keys": (save("missing.pkl", missing), "missing feature(s) chroma"),
            "wrong shape": (save("wrong.pkl", wrong), f"clip 4 ({items[3]['path']}): mfcc has 13 rows"),
            "one class": (save("one.pkl", one_class), "only one genre (rock); need at least two"),
            "empty": (save("empty.pkl", []), "holds no clips"),
            "not a pickle": (text, "not a features file (not a pickle); give the --out of deepfusion extract")}


@pytest.mark.slow
def test_bad_features_files_get_one_clear_line(tiny_features, tmp_path):
    for case, (path, expected) in _bad_files(tiny_features, tmp_path).items():
        result = invoke("train", "--features", path, "--model-dir",
                                           tmp_path / "m", "--backbone", "light",
                                           "--no-pretrained", "--epochs", "1")
        assert result.exit_code != 0, case
        assert "Traceback" not in result.output, case
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], (case, lines)
        assert str(path) in lines[0], case


def test_insisting_on_missing_pretrained_weights_fails_before_training(tiny_features, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    result = invoke("train", "--features", tiny_features, "--model-dir",
                                       tmp_path / "m", "--backbone", "resnet18", "--epochs", "1",
                                       "--pretrained")
    assert result.exit_code != 0
    line = result.output.strip().splitlines()[-1]
    assert "resnet18" in line and "--no-pretrained" in line and "resnet18-" in line
    assert not (tmp_path / "m" / "last.pth").exists()


@pytest.mark.slow
def test_default_train_trains_from_scratch_when_weights_cannot_be_had(tiny_features, tmp_path,
                                                                      monkeypatch):
    # the mission's own command, nothing else: on a CPU the light backbone (auto); then the
    # reference design's resnet50 with pretrained auto, an empty torch cache and no network
    # (downloads go to a closed port on 127.0.0.1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "features.pkl").write_bytes(Path(tiny_features).read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    result = invoke("train", "--epochs", "1", "--batch-size", "8", "--quiet")
    assert result.exit_code == 0, result.output
    assert re.search(r"^training light \(auto for cpu\), ", result.output, re.M), result.output
    assert "ImageNet" not in result.output
    raw = torch.load(tmp_path / "models" / "best.pth", weights_only=True)
    assert raw["model_config"]["backbone"] == "light"
    result = invoke("train", "--epochs", "1", "--batch-size", "8", "--quiet", "--backbone",
                    "resnet50", "--model-dir", "r50")
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if "ImageNet weights" in ln]
    assert len(lines) == 1 and "training from scratch" in lines[0] and "resnet50" in lines[0]
    raw = torch.load(tmp_path / "r50" / "best.pth", weights_only=True)
    assert raw["pretrained_source"].startswith("none (") and raw["model_config"]["pretrained"] is False


def _history(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(path))]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tiny_features, tmp_path):
    args = ["train", "--features", tiny_features, "--backbone", "light",
            "--no-pretrained", "--epochs", "5", "--batch-size", "8", "--lr", "1e-3", "--quiet",
            "--val-size", "0.2", "--test-size", "0.2", "--seed", "3", "--save-every", "0"]
    env = subprocess_env()
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(cli_command(*args, "--model-dir", full), check=True, env=env,
                   capture_output=True)
    proc = subprocess.Popen(cli_command(*args, "--model-dir", killed), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "last.pth").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(killed / "last.pth", weights_only=True)["epoch"]
    assert done < 5, "the run finished before it could be killed"
    # the resumed leg runs in a fresh process too, as both legs do in use: the pytest process
    # carries thread and library state from earlier tests that can move the last digit
    result = subprocess.run(cli_command("train", "--features", tiny_features, "--model-dir", killed,
                                        "--resume", "--quiet"),
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"resuming after epoch {done}" in result.stdout
    assert _history(killed / "training_history.csv") == _history(full / "training_history.csv")
    a = torch.load(full / "best.pth", weights_only=True)["model_state"]
    b = torch.load(killed / "best.pth", weights_only=True)["model_state"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not list(killed.glob(".*.tmp"))


def test_resume_without_last_checkpoint_is_a_clear_error(tiny_features, tmp_path):
    result = invoke("train", "--features", tiny_features, "--model-dir",
                                       tmp_path / "none", "--resume")
    assert result.exit_code != 0 and "nothing to resume" in result.output


def test_feature_store_memory_maps_the_same_arrays(tiny_features, tmp_path):
    from deepfusion.io.store import open_store
    from deepfusion.testing import save_store

    fs = load_feature_set(tiny_features)
    save_store(fs, tmp_path / "store")
    mapped = open_store(tmp_path / "store")
    for k in FEATURE_KEYS:
        assert isinstance(mapped.arrays[k], np.memmap)
        np.testing.assert_array_equal(mapped.arrays[k], fs.arrays[k])
    assert mapped.class_names == fs.class_names and (mapped.groups == fs.groups).all()
    idx = np.arange(len(fs))
    a, b = fit_normalization(fs, idx), fit_normalization(mapped, idx)
    for k in FEATURE_KEYS:
        np.testing.assert_array_equal(a[k]["mean"], b[k]["mean"])
