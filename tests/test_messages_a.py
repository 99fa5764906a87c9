"""Messages a user meets (issue 21, section 6, part A): each bug the review found, through the
command line: one line that names the file, says why, and what to do."""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import pytest

from deepfusion.testing import damage, invoke, one_error_line

LIGHT = ("--backbone", "light", "--no-pretrained", "--batch-size", "8", "--val-size", "0.2",
         "--test-size", "0.2", "--quiet")


def test_more_folds_than_clips_of_any_genre_is_one_line(tiny_features, tmp_path):
    """It was scikit-learn's ValueError as an internal error (18 clips, 6 per genre)."""
    result = invoke("train", "--features", tiny_features, "--model-dir", tmp_path / "m",
                    "--folds", "9", *LIGHT, "--epochs", "1")
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert line == (f"Error: {tiny_features}: --folds 9 needs 9 clips of at least one genre, the "
                    "largest (rock) has 6; give --folds 6 or fewer"), line


def test_evaluate_refuses_features_of_other_settings_by_their_flags(trained_model_dir, tmp_path):
    """A features file of another sample rate was a warning, then a shape error inside torch."""
    ckpt = trained_model_dir / "best.pth"
    import torch

    source = Path(torch.load(ckpt, weights_only=True)["features_file"])
    items = pickle.loads(source.read_bytes())
    for item in items:
        item["feature_config"] = {**item["feature_config"], "sample_rate": 16000}
    other = tmp_path / "sr16k.pkl"
    other.write_bytes(pickle.dumps(items))
    result = invoke("evaluate", "--checkpoint", ckpt, "--features", other,
                    "--out-dir", tmp_path / "r")
    assert result.exit_code == 1, result.output
    assert one_error_line(result.stderr) == (
        f"Error: {other}: extracted with other settings than {ckpt} (--sr 16000 here, 22050 for "
        "the model); extract it with the model's settings")


@pytest.mark.slow
def test_training_that_diverges_stops_before_a_checkpoint_of_nan(tiny_features, tmp_path,
                                                                 monkeypatch):
    """NaN weights were saved, and evaluate then blamed the checkpoint file."""
    import torch

    import deepfusion.train.run as train_module

    real = train_module.train_one_epoch

    def diverging(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(train_module, "train_one_epoch", diverging)
    result = invoke("train", "--features", tiny_features, "--model-dir", tmp_path / "m",
                    *LIGHT, "--epochs", "2")
    assert result.exit_code == 1, result.output
    problems = [ln for ln in result.stderr.splitlines() if not ln.startswith("warning: ")]
    line = one_error_line("\n".join(problems))
    assert line.startswith("Error: training diverged at epoch 1 (the weights became NaN or "
                           "infinite); give a lower --lr"), line
    assert not (tmp_path / "m" / "best.pth").exists()


def test_a_folder_named_like_audio_is_not_an_empty_input_and_paths_stay_as_typed(
        trained_model_dir, tmp_path, monkeypatch):
    """A sub-folder dir.wav said "no audio files"; files under a relative folder were printed
    with absolute paths."""
    songs = tmp_path / "songs"
    (songs / "dir.wav").mkdir(parents=True)
    (songs / "empty").mkdir()
    (songs / "a.wav").write_bytes(damage.encode(damage.clip(0, seconds=1.5), "WAV", "PCM_16"))
    (songs / "short.wav").write_bytes(damage.encode(damage.clip(1, seconds=0.2), "WAV", "PCM_16"))
    monkeypatch.chdir(tmp_path)
    result = invoke("predict", "songs", "songs/empty", "--checkpoint",
                    trained_model_dir / "best.pth", "--cache-dir", tmp_path / "cache",
                    "--jobs", "1", "--quiet")
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped ")]
    assert "skipped songs/dir.wav: is a folder, not an audio file" in skipped, skipped
    assert "skipped songs/short.wav: too short (0.20 s; this model needs 1 s)" in skipped, skipped
    assert any(line.startswith("skipped songs/empty: no audio files (") for line in skipped)
    assert result.stdout.startswith("songs/a.wav: "), result.stdout


def test_a_file_that_changes_while_read_says_run_the_same_command(trained_model_dir, tmp_path,
                                                                   monkeypatch):
    import deepfusion.jobs.windows as windows_module

    (tmp_path / "a.wav").write_bytes(damage.encode(damage.clip(0, seconds=1.5), "WAV", "PCM_16"))
    monkeypatch.setattr(windows_module, "stamp_or_none", lambda path: ("moved",))
    result = invoke("predict", tmp_path / "a.wav", "--checkpoint", trained_model_dir / "best.pth",
                    "--cache-dir", tmp_path / "cache", "--jobs", "1", "--quiet")
    assert result.exit_code == 1, result.output
    assert (f"skipped {tmp_path / 'a.wav'}: changed while it was read (a copy or download still "
            "in progress?); run the same command again when it is complete") in result.stderr
    assert ("Error: none of the 1 file could be classified (reasons above)"
            in result.stderr.splitlines())


def test_os_errors_say_their_reason_never_success(tmp_path, monkeypatch):
    """os.strerror(None or 0) printed "cannot read (Success)"."""
    import deepfusion.extract as extract_module

    audio = tmp_path / "audio" / "rock"
    audio.mkdir(parents=True)
    for name in ("gone.wav", "odd.wav", "fine.wav"):
        (audio / name).write_bytes(damage.encode(damage.clip(0, seconds=1.5), "WAV", "PCM_16"))
    real = extract_module.check_file

    def check(path):
        if path.name == "gone.wav":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        if path.name == "odd.wav":
            raise OSError("stale handle")       # no errno: strerror(0) says "Success"
        real(path)

    monkeypatch.setattr(extract_module, "check_file", check)
    result = invoke("extract", "--audio-dir", tmp_path / "audio", "--out", tmp_path / "f.pkl",
                    "--cache-dir", tmp_path / "cache", "--duration", "1.5", "--jobs", "1",
                    "--quiet")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert "skipped rock/gone.wav: file not found (removed during the run)" in lines, lines
    assert "skipped rock/odd.wav: cannot read (stale handle)" in lines, lines
    assert "Success" not in result.stderr
    assert any(line.startswith("2 files skipped; reasons in ") for line in lines), lines
    assert result.stdout.startswith("1 clip (1 computed, 0 from cache)"), result.stdout


@pytest.mark.parametrize("foreign", [1, 2])
def test_synth_names_one_foreign_file_as_it(tmp_path, foreign):
    out = tmp_path / "synth"
    for c in range(foreign):
        path = out / "techno" / f"techno.{c:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"my own recording")
    result = invoke("synth", "--out", out, "--genres", "1", "--clips-per-genre", "2",
                    "--duration", "1")
    assert result.exit_code == 1, result.output
    line = one_error_line(result.stderr)
    assert line.endswith(f"give --overwrite to replace {'it' if foreign == 1 else 'them'}, or "
                         "another --out"), line
    assert str(out / "techno" / "techno.00000.wav") in line


def test_out_of_device_memory_in_predict_is_one_line(trained_model_dir, tmp_path, monkeypatch):
    """Only train and evaluate turned it into one line; predict showed an internal error."""
    import deepfusion.inference.torch_engine as engine_module

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine_module, "predict_clips", out_of_memory)
    (tmp_path / "a.wav").write_bytes(damage.encode(damage.clip(0, seconds=1.5), "WAV", "PCM_16"))
    ckpt = trained_model_dir / "best.pth"
    result = invoke("predict", tmp_path / "a.wav", "--checkpoint", ckpt, "--cache-dir",
                    tmp_path / "cache", "--jobs", "1", "--quiet", "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert one_error_line(result.stderr) == (f"Error: {ckpt}: out of memory on cpu running this "
                                             "model; free some memory (other programs)")
