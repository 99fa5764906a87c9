"""Metrics against hand-computed answers, and the evaluate stage through the real command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deepfusion.config import FeatureConfig
from deepfusion.metrics import (accuracy_interval, bootstrap_interval, confusion_matrix, log_loss,
                                per_class_scores, softmax, summary_metrics, wilson_interval)
from deepfusion.testing import invoke

GENRES = ["rock", "techno", "waltz"]          # the fixture's classes, in logit order
REPORT_FILES = ("evaluation.json", "classification_report.csv", "predictions.csv",
                "confusion_matrix.png", "attention.png")




# ------------------------------------------------------------------------------------ metrics

# Four classes: class 2 has support but is never predicted, class 3 is predicted once but has
# no support.
TRUTH = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
GUESS = np.array([0, 0, 0, 1, 1, 1, 3, 0, 1])


def test_confusion_matrix_counts_true_by_predicted():
    cm = confusion_matrix(TRUTH, GUESS, 4)
    np.testing.assert_array_equal(cm, [[3, 1, 0, 0],
                                       [0, 2, 0, 1],
                                       [1, 1, 0, 0],
                                       [0, 0, 0, 0]])
    assert cm.dtype.kind == "i"


def test_per_class_scores_by_hand():
    s = per_class_scores(confusion_matrix(TRUTH, GUESS, 4))
    np.testing.assert_allclose(s["precision"], [3 / 4, 2 / 4, 0, 0])
    np.testing.assert_allclose(s["recall"], [3 / 4, 2 / 3, 0, 0])
    # F1 of class 1: 2 * (1/2) * (2/3) / (1/2 + 2/3) = 4/7
    np.testing.assert_allclose(s["f1"], [3 / 4, 4 / 7, 0, 0])
    np.testing.assert_array_equal(s["support"], [4, 3, 2, 0])
    assert np.isfinite(s["precision"]).all() and np.isfinite(s["f1"]).all()
    assert s["support"].dtype == np.int64


def test_per_class_scores_are_exactly_zero_where_undefined():
    """A class never predicted, or without support, scores 0, never what memory held before
    (numpy's divide leaves the skipped entries as they were: the output must start at 0)."""
    import warnings

    cm = confusion_matrix(TRUTH, GUESS, 4)
    for _ in range(20):
        junk = [np.full(4, 7.0) for _ in range(50)]     # freed blocks numpy may hand out again
        del junk
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            s = per_class_scores(cm)
        assert s["precision"].tolist()[2:] == [0.0, 0.0]
        assert s["recall"].tolist()[3] == 0.0 and s["f1"].tolist()[2:] == [0.0, 0.0]


def test_summary_metrics_by_hand():
    m = summary_metrics(TRUTH, GUESS, 4)
    assert m["accuracy"] == pytest.approx(5 / 9)
    # mean over the classes with support (0, 1, 2); class 3 has none and does not count
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 0) / 3)    # 17/36
    assert m["macro_f1"] == pytest.approx((3 / 4 + 4 / 7 + 0) / 3)             # 37/84


def test_summary_metrics_perfect_and_all_wrong():
    y = np.array([0, 1, 2, 2])
    assert summary_metrics(y, y, 3) == {"accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0}
    m = summary_metrics(y, (y + 1) % 3, 3)
    assert m == {"accuracy": 0.0, "balanced_accuracy": 0.0, "macro_f1": 0.0}


def test_bootstrap_interval_contains_estimate_narrows_and_is_seeded():
    few = np.r_[np.ones(14), np.zeros(6)]              # 0.7 on 20 clips
    many = np.r_[np.ones(350), np.zeros(150)]          # 0.7 on 500 clips
    lo20, hi20 = bootstrap_interval(few)
    lo500, hi500 = bootstrap_interval(many)
    assert 0 <= lo20 <= 0.7 <= hi20 <= 1
    assert lo500 <= 0.7 <= hi500
    assert hi500 - lo500 < (hi20 - lo20) / 2
    assert bootstrap_interval(few, seed=3) == bootstrap_interval(few, seed=3)
    assert bootstrap_interval(many, seed=0) == (lo500, hi500)
    assert bootstrap_interval(np.ones(10)) == (1.0, 1.0)
    assert all(np.isnan(bootstrap_interval(np.zeros(0))))
    assert bootstrap_interval([True]) == (1.0, 1.0)        # one clip: nothing to resample


# 12 clips of 6 tracks: right 8 times, tracks right or wrong together more often than not
CORRECT = np.array([1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 1, 0], float)
TRACKS = np.array([0, 0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 5])


def test_softmax_and_log_loss_by_hand():
    logits = np.array([[0.0, np.log(3.0)], [1000.0, 1000.0 + np.log(3.0)], [-5.0, -5.0]])
    p = softmax(logits)     # rows of any scale: each is shifted by its own maximum
    np.testing.assert_allclose(p, [[0.25, 0.75], [0.25, 0.75], [0.5, 0.5]], rtol=1e-12)
    assert log_loss(p, np.array([1, 0, 1])) == pytest.approx(-np.log([0.75, 0.25, 0.5]).mean())
    # a probability of 0 costs as much as 1e-12, not infinity
    assert log_loss(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([1, 0])) == pytest.approx(
        (-np.log(1e-12) - np.log(0.5)) / 2)


@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:invalid value encountered")
def test_summary_metrics_of_no_clips_and_of_single_clip_classes():
    empty = np.zeros(0, np.int64)
    m = summary_metrics(empty, empty, 3)
    assert np.isnan(m["accuracy"]) and np.isnan(m["balanced_accuracy"])
    # a class with one clip counts in the balanced accuracy and the macro F1
    m = summary_metrics(np.array([0, 0, 1]), np.array([0, 0, 0]), 2)
    assert m["balanced_accuracy"] == pytest.approx(0.5) and m["macro_f1"] == pytest.approx(0.4)


def test_wilson_interval_by_hand_and_at_its_edges():
    assert wilson_interval(3, 10) == pytest.approx((0.107791, 0.603222), abs=1e-6)
    assert wilson_interval(3, 10, level=0.5) == pytest.approx((0.212715, 0.404691), abs=1e-6)
    assert wilson_interval(1, 1) == pytest.approx((0.206549, 1.0), abs=1e-6)
    assert all(np.isnan(wilson_interval(0, 0)))
    # within [0, 1] where rounding would step out of it (9 of 9; 0 of 21)
    assert wilson_interval(9, 9)[1] == 1.0 and wilson_interval(0, 21)[0] == 0.0


def test_accuracy_interval_by_hand_with_and_without_groups():
    lo, hi, how = accuracy_interval(CORRECT)
    assert (lo, hi) == pytest.approx(wilson_interval(8, 12)) and how == "Wilson, 12 clips"
    assert accuracy_interval(CORRECT, level=0.5)[:2] == pytest.approx(wilson_interval(8, 12, level=0.5))
    assert accuracy_interval(CORRECT, np.arange(12)) == (lo, hi, how)   # groups of one: clips
    lo, hi, how = accuracy_interval(CORRECT, TRACKS)
    assert how == "Wilson over 6 groups and a bootstrap of whole groups"
    # the low end is Wilson's over 6 observations of 8/12, the high end the bootstrap's
    assert lo == pytest.approx(wilson_interval(4, 6)[0]) and lo < wilson_interval(4, 6)[1] < hi
    assert (lo, hi) == pytest.approx((0.299993, 0.928571), abs=1e-6)
    assert accuracy_interval(CORRECT, TRACKS, n_boot=2000, seed=0) == (lo, hi, how)
    assert accuracy_interval(CORRECT, TRACKS, seed=1)[1] != hi            # seeded
    assert accuracy_interval(CORRECT, TRACKS, level=0.5)[:2] == pytest.approx((0.529222, 0.780618),
                                                                              abs=1e-6)
    assert accuracy_interval(CORRECT.astype(bool), TRACKS.astype(str)) == (lo, hi, how)
    assert accuracy_interval(list(CORRECT.astype(int)), TRACKS) == (lo, hi, how)
    lo1, hi1, _ = accuracy_interval([1.0])
    assert (lo1, hi1) == pytest.approx(wilson_interval(1, 1))
    assert accuracy_interval([])[2] == "no clips" and all(np.isnan(accuracy_interval([])[:2]))


# ------------------------------------------------------------------------ the evaluate stage

@pytest.fixture(scope="module")
def default_run(trained_model_dir, tmp_path_factory):
    """``deepfusion evaluate --checkpoint best.pth --out-dir ...``, run once for this module."""
    out = tmp_path_factory.mktemp("evaluation")
    before = listing(trained_model_dir)
    result = invoke("evaluate", "--checkpoint", trained_model_dir / "best.pth", "--out-dir", out)
    assert listing(trained_model_dir) == before, "evaluate --out-dir wrote beside the checkpoint"
    return result, out


def listing(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def check_pngs(folder: Path) -> None:
    import matplotlib.image

    for name in ("confusion_matrix.png", "attention.png"):
        img = matplotlib.image.imread(folder / name)
        assert img.ndim == 3 and min(img.shape[:2]) > 100, name
        assert img[..., :3].std() > 0.05, f"{name} looks blank"


def check_predictions(folder: Path, n: int, known_only: bool = True) -> pd.DataFrame:
    table = pd.read_csv(folder / "predictions.csv")
    assert list(table.columns) == (["path", "true_genre", "predicted_genre"]
                                   + [f"p_{g}" for g in GENRES])
    assert len(table) == n
    probs = table[[f"p_{g}" for g in GENRES]].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(np.array(GENRES)[probs.argmax(axis=1)], table["predicted_genre"])
    if known_only:
        assert set(table["true_genre"]) <= set(GENRES)
    return table


def test_evaluate_with_only_the_checkpoint(default_run, trained_model_dir, tiny_features):
    from deepfusion.io.cache import file_digest
    from deepfusion.models.checkpoint import load_checkpoint

    result, out = default_run
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "Traceback" not in result.output
    ckpt = load_checkpoint(trained_model_dir / "best.pth")
    test_paths = ckpt["split"]["test"]
    n = len(test_paths)
    assert f"split test: {n} clips" in text
    for label in ("clip accuracy", "95% CI", "balanced accuracy", "macro-F1",
                  "segment accuracy"):
        assert label in text, label
    lines = text.splitlines()
    for g in GENRES:
        assert sum(ln.split()[:1] == [g] for ln in lines) == 1, g
    for name in REPORT_FILES:
        assert (out / name).is_file(), name

    report = json.loads((out / "evaluation.json").read_text())
    for key in ("metrics", "accuracy_ci95", "per_class", "checkpoint_sha256", "features_sha256",
                "split", "clips"):
        assert key in report, key
    assert report["split"] == "test" and report["n_clips"] == n
    assert sorted(report["clips"]) == sorted(test_paths)
    assert report["checkpoint_sha256"] == file_digest(trained_model_dir / "best.pth")
    assert report["features_sha256"] == file_digest(tiny_features) == ckpt["features_sha256"]
    acc = report["metrics"]["accuracy"]
    lo, hi = report["accuracy_ci95"]
    assert 0 <= lo <= acc <= hi <= 1
    assert f"clip accuracy      {acc:.3f}" in text
    assert [row["genre"] for row in report["per_class"]] == GENRES
    assert sum(row["support"] for row in report["per_class"]) == n
    assert np.array(report["confusion_matrix"]).sum() == n
    assert report["metrics"]["n_segments"] >= n

    per_class = pd.read_csv(out / "classification_report.csv")
    assert list(per_class.columns) == ["genre", "precision", "recall", "f1", "support"]
    assert list(per_class["genre"]) == GENRES
    table = check_predictions(out, n)
    assert sorted(table["path"]) == sorted(test_paths)
    assert acc == pytest.approx((table["true_genre"] == table["predicted_genre"]).mean())
    check_pngs(out)


def test_evaluate_writes_beside_the_checkpoint_by_default(trained_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(trained_model_dir, copy)
    result = invoke("evaluate", "--checkpoint", copy / "best.pth")
    assert result.exit_code == 0, result.output
    for name in REPORT_FILES:
        assert (copy / name).is_file(), name
    assert str(copy) in result.stdout.splitlines()[-1]
    check_pngs(copy)


@pytest.mark.slow
@pytest.mark.parametrize("split", ["all", "val"])
def test_evaluate_other_splits(split, trained_model_dir, tmp_path):
    from deepfusion.models.checkpoint import load_checkpoint

    result = invoke("evaluate", "--checkpoint", trained_model_dir / "best.pth", "--split", split,
                 "--out-dir", tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "evaluation.json").read_text())
    saved = load_checkpoint(trained_model_dir / "best.pth")["split"]
    expected = (saved["train"] + saved["val"] + saved["test"]) if split == "all" else saved["val"]
    assert report["split"] == split
    assert sorted(report["clips"]) == sorted(expected)
    assert report["n_clips"] == len(expected) == (18 if split == "all" else len(saved["val"]))
    assert f"split {split}: {len(expected)} clips" in result.stdout
    check_predictions(tmp_path, len(expected))


# ---------------------------------------------------- another collection, with unknown genres

@pytest.fixture(scope="module")
def foreign_features(tiny_audio, tmp_path_factory):
    """Two features files: two known-genre clips plus two clips of 'polka' (unknown), and
    the two 'polka' clips alone."""
    import soundfile as sf

    from deepfusion.extract import extract
    from deepfusion.synth import render_clip

    work = tmp_path_factory.mktemp("foreign")
    mixed, alone = work / "mixed", work / "alone"
    for root in (mixed, alone):
        (root / "polka").mkdir(parents=True)
        for i in range(2):
            y = render_clip("reggae", seed=100 + i, duration=6.0)
            sf.write(root / "polka" / f"polka.{i:05d}.wav", y, 22050, subtype="PCM_16")
    for rel in ("rock/rock.00000.wav", "waltz/waltz.00001.wav"):
        (mixed / rel).parent.mkdir(exist_ok=True)
        shutil.copy(tiny_audio / rel, mixed / rel)
    config = FeatureConfig(duration=6.0)
    files = {}
    for name, root in (("mixed", mixed), ("alone", alone)):
        res = extract(root, out=work / f"{name}.pkl", cache_dir=work / "cache", jobs=1,
                      config=config, quiet=True)
        assert not res.errors
        files[name] = res.out
    return files


def test_evaluate_skips_genres_the_model_does_not_know(foreign_features, trained_model_dir, tmp_path):
    result = invoke("evaluate", "--checkpoint", trained_model_dir / "best.pth",
                 "--features", foreign_features["mixed"], "--split", "all", "--out-dir", tmp_path)
    assert result.exit_code == 0, result.output
    mentions = [ln for ln in result.output.splitlines() if "polka" in ln]
    assert len(mentions) == 1 and "polka (2)" in mentions[0], result.output
    assert "split all: 2 clips" in result.stdout
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["n_clips"] == 2
    assert report["skipped_unknown_labels"] == {"polka": 2}
    assert sorted(report["clips"]) == ["rock/rock.00000.wav", "waltz/waltz.00001.wav"]
    assert sum(row["support"] for row in report["per_class"]) == 2
    table = check_predictions(tmp_path, 2)
    assert sorted(table["true_genre"]) == ["rock", "waltz"]
    check_pngs(tmp_path)


def test_evaluate_on_unknown_genres_only_fails_clearly(foreign_features, trained_model_dir, tmp_path):
    result = invoke("evaluate", "--checkpoint", trained_model_dir / "best.pth",
                 "--features", foreign_features["alone"], "--split", "all", "--out-dir", tmp_path)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("warning: 2 clips left out, of genres "), result.output
    assert lines[0].endswith("does not know: polka (2)"), result.output
    errors = lines[1:]
    assert len(errors) == 1 and errors[0].startswith("Error:"), result.output
    assert "genre the model knows" in errors[0]
    assert errors[0].endswith("; the model knows rock, techno, waltz"), errors[0]
    assert not (tmp_path / "evaluation.json").exists()


# ------------------------------------------------------------------------------ bad checkpoints

def test_bad_checkpoints_give_one_error_line(tmp_path):
    import torch

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(3)}, other)
    cases = {tmp_path / "missing.pth": "not found", text: "checkpoint",
             noise: "not a checkpoint written by deepfusion train, or a damaged one",
             other: "not a deepfusion checkpoint"}
    for path, words in cases.items():
        result = invoke("evaluate", "--checkpoint", path, "--out-dir", tmp_path / "out")
        assert result.exit_code != 0, path
        assert "Traceback" not in result.output and "internal error" not in result.output, path
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
        assert str(path) in lines[0] and words in lines[0], lines[0]


def test_random_bytes_are_called_unreadable_not_unsafe(tmp_path):
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    result = invoke("evaluate", "--checkpoint", noise, "--out-dir", tmp_path / "out")
    assert result.exit_code != 0
    assert "not a checkpoint written by deepfusion train, or a damaged one" in result.stderr, result.stderr
    assert "refused" not in result.stderr
