"""A newcomer's first hour: a mistake costs a second, not a start-up (issue 22)."""

from __future__ import annotations

import pickle
import subprocess

from deepfusion.testing import cli_command, one_error_line, subprocess_env


def test_a_features_file_that_is_no_features_file_is_refused_before_torch(tmp_path):
    """torch is made unimportable: the refusal must come before anything imports it."""
    blocker = tmp_path / "no-torch"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    number = tmp_path / "x.pkl"
    number.write_bytes(pickle.dumps(42))
    env = subprocess_env()
    env["PYTHONPATH"] = f"{blocker}:{env['PYTHONPATH']}"
    for extra in ((), ("--folds", "3")):
        run = subprocess.run(cli_command("train", "--features", number, "--model-dir",
                                         tmp_path / "m", *extra),
                             env=env, capture_output=True, text=True, timeout=120)
        line = one_error_line(run.stderr)
        assert run.returncode == 1 and f"{number}: not a deepfusion features file" in line, line
    missing = subprocess.run(cli_command("train", "--features", tmp_path / "nope.pkl"),
                             env=env, capture_output=True, text=True, timeout=120)
    assert "features file not found" in one_error_line(missing.stderr)


def test_the_used_by_commands_find_what_the_stage_before_wrote(trained_model_dir, tmp_path,
                                                               monkeypatch):
    """`deepfusion train --features features.pkl` after `deepfusion extract` (which writes
    data/features.pkl) and `deepfusion evaluate --checkpoint best.pth` after `deepfusion
    train` (models/best.pth): a bare name not in the current folder is taken from where the
    stage before writes by default, said in one line; anything else is left as given."""
    import shutil
    from pathlib import Path

    from deepfusion.console import found
    from deepfusion.testing import invoke

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    shutil.copy(trained_model_dir / "best.pth", tmp_path / "models" / "best.pth")
    assert found(Path("best.pth"), Path("models"), "checkpoint") == Path("models/best.pth")
    assert found(Path("other.pth"), Path("models"), "checkpoint") == Path("other.pth")
    assert found(Path("x/best.pth"), Path("models"), "checkpoint") == Path("x/best.pth")
    (tmp_path / "best.pth").write_bytes(b"")       # one here is the one meant
    assert found(Path("best.pth"), Path("models"), "checkpoint") == Path("best.pth")
    (tmp_path / "best.pth").unlink()
    result = invoke("evaluate", "--checkpoint", "best.pth", "--out-dir", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert ("best.pth: not in this folder; using models/best.pth, the checkpoint train writes "
            "by default") in result.stderr
    written = [line for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert written == [f"wrote {tmp_path / 'report' / name}" for name in (
        "evaluation.json", "classification_report.csv", "predictions.csv",
        "confusion_matrix.png", "attention.png")]


def test_train_takes_features_pkl_from_where_extract_writes_it(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "features.pkl").write_bytes(pickle.dumps(42))
    run = subprocess.run(cli_command("train", "--features", "features.pkl"), cwd=tmp_path,
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.splitlines()[0] == ("features.pkl: not in this folder; using "
                                          "data/features.pkl, the features file extract writes "
                                          "by default")
    assert "data/features.pkl: not a deepfusion features file" in run.stderr.splitlines()[-1]
