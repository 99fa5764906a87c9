"""Issue 21, section 6 (part B): the lines a user meets about weights, checkpoints, features
files, split files, settings, clusters and exports: one line each, naming the file or the flag,
the reason and what to do. Through the real commands."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from deepfusion.testing import invoke, one_error_line

TRAIN = ("--epochs", "1", "--batch-size", "8", "--val-size", "0.2", "--test-size", "0.2", "--quiet")


def train_error_line(stderr: str) -> str:
    """The one ``Error:`` line of a refused train, beside the warnings train may say first
    (clips without groups)."""
    return one_error_line("\n".join(ln for ln in stderr.splitlines() if not ln.startswith("warning: ")))


# --------------------------------------------------------------------------- A8, A9: weights

def test_weights_path_holding_more_than_tensors_is_one_line(tiny_features, tmp_path):
    weights = tmp_path / "b.pkl"
    weights.write_bytes(pickle.dumps({"conv1.weight": Path("x")}, protocol=5))
    result = invoke("train", "--features", tiny_features, "--model-dir", tmp_path / "m",
                    "--backbone", "resnet18", "--weights-path", weights, *TRAIN)
    assert result.exit_code == 1, result.output
    line = train_error_line(result.stderr)      # torch's pickle warning is not printed
    assert line == (f"Error: {weights}: not a torchvision weights file (it holds more than "
                    "tensors); give the .pth torchvision downloads for resnet18")
    assert "weights_only" not in result.output and "UserWarning" not in result.output


def test_weights_path_that_is_a_checkpoint_names_the_file(trained_model_dir, tiny_features, tmp_path):
    best = trained_model_dir / "best.pth"
    result = invoke("train", "--features", tiny_features, "--model-dir", tmp_path / "m",
                    "--backbone", "resnet18", "--weights-path", best, *TRAIN)
    assert result.exit_code == 1, result.output
    line = train_error_line(result.stderr)
    assert line.startswith(f"Error: {best}: not torchvision's ImageNet weights for resnet18 "
                           "(no conv1.weight and ")
    assert line.endswith("more); a deepfusion checkpoint goes to --init-from")


@pytest.mark.slow
@pytest.mark.parametrize("flags, why", [
    (("--backbone", "light"), "backbone light has no ImageNet weights"),
])
def test_ignored_weights_path_is_said(tiny_features, tmp_path, flags, why):
    weights = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1)}, weights)
    result = invoke("train", "--features", tiny_features, "--model-dir", tmp_path / "m",
                    "--weights-path", weights, *flags, *TRAIN)
    assert result.exit_code == 0, result.output
    assert f"warning: --weights-path: ignored ({why})" in result.output


# ------------------------------------------------------------------ D: settings by their flags

@pytest.mark.parametrize("flags, line", [
    (("--n-mfcc", "200"), "--n-mfcc 200: at most --n-mels (128)"),
    (("--fmin", "20000"), "--fmin 20000: must be below --fmax (default: half of --sr, 11025 Hz)"),
    (("--hpss-kernel", "4"), "--hpss-kernel 4: must be odd (e.g. 31)"),
    (("--min-duration", "50"), "--min-duration 50: at most --duration (30)"),
    (("--sr", "0"), "--sr 0: must be a whole number above 0"),
])
def test_feature_settings_are_named_by_their_flags(tiny_audio, tmp_path, flags, line):
    result = invoke("extract", "--audio-dir", tiny_audio, "--out", tmp_path / "f.pkl",
                    "--cache-dir", tmp_path / "c", "--quiet", *flags)
    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr) == f"Error: {line}"


@pytest.mark.parametrize("flags, line", [
    (("--val-size", "0.5", "--test-size", "0.6"),
     "--val-size 0.5 and --test-size 0.6 leave no training clips; their sum must be below 1"),
    (("--freeze-branches",), "--freeze-branches needs --init-from CHECKPOINT (frozen untrained "
     "branches would learn nothing)"),
    (("--device", "foo"), "--device foo: not a device; give auto, cpu, cuda, cuda:N or mps"),
])
def test_recipe_settings_are_named_by_their_flags(tiny_features, tmp_path, flags, line):
    result = invoke("train", "--features", tiny_features, "--model-dir", tmp_path / "m",
                    "--backbone", "light", "--quiet", *flags)
    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr) == f"Error: {line}"


def test_python_callers_get_the_field_too():
    from deepfusion.config import FeatureConfig
    from deepfusion.errors import ParameterError

    with pytest.raises(ParameterError, match=r"^--n-mfcc 200: at most --n-mels \(128\)$") as info:
        FeatureConfig(n_mfcc=200)
    assert info.value.field == "n_mfcc"


# ------------------------------------------------------------- C: checkpoints and ONNX models

def test_checkpoint_lines_say_what_to_do(tiny_audio, tmp_path):
    clip = next(tiny_audio.rglob("*.wav"))
    missing = tmp_path / "models" / "best.pth"
    onnx = tmp_path / "q.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(100))
    cut = tmp_path / "cut.pth"
    torch.save({"model_state": {"w": torch.zeros(1000)}}, cut)
    cut.write_bytes(cut.read_bytes()[:300])
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(3)}, other)
    cases = {
        missing: "checkpoint not found; run deepfusion train, or give --checkpoint",
        onnx: "an ONNX model, not a checkpoint; give --engine onnx to predict or embed, or the "
              ".pth it was exported from",
        cut: "not a checkpoint written by deepfusion train, or a damaged one (cut short?); give "
             "a best.pth or last.pth",
        other: "not a deepfusion checkpoint (it holds no model weights and settings); give a "
               "best.pth or last.pth",
    }
    for path, words in cases.items():
        result = invoke("predict", clip, "--checkpoint", path, "--cache-dir", tmp_path / "c",
                        "--quiet")
        assert result.exit_code == 1, result.output
        assert one_error_line(result.stderr) == f"Error: {path}: {words}"


def test_another_format_version_is_named_without_python_words(trained_model_dir, tmp_path):
    ckpt = torch.load(trained_model_dir / "best.pth", weights_only=True)
    del ckpt["format_version"]
    old = tmp_path / "old.pth"
    torch.save(ckpt, old)
    result = invoke("evaluate", "--checkpoint", old, "--out-dir", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert one_error_line(result.stderr) == (
        f"Error: {old}: written by another deepfusion version (no format number; this one "
        "reads 1); train it again, or use the version that wrote it")


def test_onnx_engine_given_a_checkpoint_or_a_precision(trained_model_dir, tiny_audio, tmp_path):
    pytest.importorskip("onnxruntime")
    clip = next(tiny_audio.rglob("*.wav"))
    best = trained_model_dir / "best.pth"
    result = invoke("predict", clip, "--engine", "onnx", "--checkpoint", best,
                    "--cache-dir", tmp_path / "c", "--quiet")
    assert result.exit_code == 1, result.output
    assert one_error_line(result.stderr) == (
        f"Error: {best}: a PyTorch checkpoint, not an ONNX model; drop --engine onnx, or export "
        "it with deepfusion export")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 64)
    result = invoke("predict", clip, "--engine", "onnx", "--checkpoint", junk,
                    "--cache-dir", tmp_path / "c", "--quiet")
    assert result.exit_code == 1, result.output
    assert one_error_line(result.stderr) == (
        f"Error: {junk}: not an ONNX model, or a damaged one (protobuf parsing failed)")
    result = invoke("predict", clip, "--engine", "onnx", "--precision", "amp", "--checkpoint",
                    junk, "--quiet")
    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr) == (
        "Error: --precision amp: the onnx engine computes in float32 only; leave --precision "
        "out, or use --engine torch")


# ------------------------------------------------------------------ C: features and split files

def _train_line(features, tmp_path, *extra) -> tuple[int, str]:
    result = invoke("train", "--features", features, "--model-dir", tmp_path / "m",
                    "--backbone", "light", "--no-pretrained", *TRAIN, *extra)
    return result.exit_code, train_error_line(result.stderr)


@pytest.mark.slow
def test_features_files_that_are_missing_or_not_ours(tiny_audio, tiny_features, tmp_path):
    wav = next(tiny_audio.rglob("*.wav"))
    data = Path(tiny_features).read_bytes()
    cut = tmp_path / "trunc.pkl"
    cut.write_bytes(data[: len(data) // 2])
    mapping = tmp_path / "dict.pkl"
    mapping.write_bytes(pickle.dumps({"clips": []}))
    items = pickle.loads(data)
    items[3] = dict(items[3], label=1.5)
    floats = tmp_path / "float.pkl"
    floats.write_bytes(pickle.dumps(items))
    cases = {
        tmp_path / "nope.pkl": "features file not found; run deepfusion extract first, or give "
                               "--features",
        tiny_audio: "a folder, not a features file or feature store (no meta.json); give the "
                    "--out of deepfusion extract",
        wav: "not a features file (not a pickle); give the --out of deepfusion extract",
        cut: "damaged features file (cut short); run deepfusion extract again",
        mapping: "not a deepfusion features file (a mapping, where extract writes a list of clips)",
        floats: f"clip 4 ({items[3]['path']}): label 1.5 is neither a name nor a whole number",
    }
    for path, words in cases.items():
        code, line = _train_line(path, tmp_path)
        assert code == 1, (path, line)
        assert line == f"Error: {path}: {words}"


@pytest.mark.slow
def test_split_files_say_what_they_should_hold(tiny_features, tmp_path):
    items = pickle.loads(Path(tiny_features).read_bytes())
    elsewhere = tmp_path / "s2.csv"
    elsewhere.write_text("path,split\nnothere.wav,train\n")
    cases = {
        tmp_path / "nope.csv": (2, "split file not found; give a CSV with path,split columns, "
                                   "or a shipped split: gtzan-fault-filtered"),
        tmp_path: (2, "a folder, not a split file; give a CSV with path,split columns"),
        elsewhere: (2, f"none of its paths is a clip of {tiny_features} (it lists nothere.wav; "
                       f"{tiny_features} has paths like {items[0]['path']}, relative to the audio "
                       "folder)"),
    }
    for path, (code, words) in cases.items():
        got, line = _train_line(tiny_features, tmp_path, "--split-file", path)
        assert got == code, (path, line)
        assert line == f"Error: {path}: {words}"


def test_a_group_across_splits_names_two_clips(tmp_path):
    import numpy as np

    from deepfusion.data.splits import check_split
    from deepfusion.errors import DatasetError

    split = np.array(["train", "test", "train"], dtype=object)
    with pytest.raises(DatasetError, match=r"^s\.csv: x\.wav and y\.wav are one group \(identical "
                       r"audio, or one track, album or artist\) but in train and test; put them "
                       r"in one split$"):
        check_split(split, np.array(["a", "a", "b"], dtype=object), paths=["x.wav", "y.wav", "z.wav"],
                    split_file="s.csv")


def test_a_manifest_that_is_not_utf8_text(tiny_audio, tmp_path):
    manifest = tmp_path / "a.csv"
    manifest.write_bytes(b"\x80\x04path,label\n")
    result = invoke("extract", "--audio-dir", tiny_audio, "--manifest", manifest,
                    "--out", tmp_path / "f.pkl", "--cache-dir", tmp_path / "c", "--quiet")
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert line.startswith(f"Error: {manifest}: not a UTF-8 text") and "0x80" in line, line


# ----------------------------------------------------------------- G: cluster, torchrun, musicnn

def test_a_scheduler_from_the_environment_is_named_as_the_variable(tiny_audio, tmp_path, monkeypatch):
    base = ("extract", "--audio-dir", tiny_audio, "--out", tmp_path / "f.pkl", "--cache-dir",
            tmp_path / "cache", "--quiet")
    monkeypatch.setenv("DEEPFUSION_SCHEDULER", "local:0")
    result = invoke(*base)
    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr) == ("Error: DEEPFUSION_SCHEDULER=local:0: local:N needs "
                                             "a worker count N >= 1")
    result = invoke(*base, "--scheduler", "local:0")
    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr) == "Error: --scheduler local:0: local:N needs a worker count N >= 1"


def test_torchrun_variables_that_are_not_numbers(monkeypatch):
    from deepfusion.errors import DeepFusionError
    from deepfusion.runtime import ddp

    monkeypatch.setenv("RANK", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(DeepFusionError, match=r"^RANK, WORLD_SIZE and LOCAL_RANK must be whole "
                       r"numbers \(RANK='x'\); start deepfusion with torchrun, or unset them$"):
        ddp.launched()


def test_a_timeout_that_is_not_a_number(tmp_path):
    result = invoke("extract", "--audio-dir", tmp_path, "--timeout", "abc")
    assert result.exit_code == 2
    assert "'abc' is not a number of seconds" in result.stderr
    assert "float range" not in result.stderr


def test_evaluate_names_the_checkpoint_whose_features_moved(trained_model_dir, tmp_path):
    ckpt = torch.load(trained_model_dir / "best.pth", weights_only=True)
    moved = tmp_path / "c.pkl"
    ckpt["features_file"] = str(moved)
    best = tmp_path / "mc" / "best.pth"
    best.parent.mkdir()
    torch.save(ckpt, best)
    result = invoke("evaluate", "--checkpoint", best, "--out-dir", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert one_error_line(result.stderr) == (
        f"Error: {moved}: features file not found (the one {best} was trained on); give --features")


def test_fp16_on_the_cpu_is_refused_before_any_download(tiny_features, tmp_path):
    result = invoke("train", "--features", tiny_features, "--model-dir", tmp_path / "m",
                    "--backbone", "resnet18", "--device", "cpu", "--amp-dtype", "fp16", *TRAIN)
    assert result.exit_code == 2, result.output
    assert train_error_line(result.stderr) == ("Error: --amp-dtype fp16: the CPU has no fast fp16; "
                                               "give --amp-dtype bf16 or auto, or --no-amp")
    assert "ImageNet" not in result.output and "recipe" not in result.output
