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
