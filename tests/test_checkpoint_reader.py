"""One reader of checkpoints: evaluate, export and predict (the torch engine) read a checkpoint
through :func:`deepfusion.models.checkpoint.read_checkpoint`, which checks it
(:func:`~deepfusion.models.checkpoint.load_checkpoint`) and unpacks it once into a typed
:class:`~deepfusion.models.checkpoint.Checkpoint`. So a damaged field reads the same in all
three, with the same exit status, and each command unpacks the file exactly once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepfusion.errors import CheckpointError
from deepfusion.models.checkpoint import Checkpoint
from deepfusion.testing import invoke, one_error_line

# export asks for onnx and onnxruntime before it reads the checkpoint
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

#: A damage to a loaded checkpoint, and words of the line that names it.
DAMAGES = {
    "class_names": (lambda c: c["class_names"].append(c["class_names"][0]),
                    "class_names holds"),
    "train_config": (lambda c: c["train_config"].update(segment_seconds=-1.0),
                     "train_config: "),
    "model_state": (lambda c: c["model_state"].pop("classifier.bias"),
                    "model_state does not fit"),
}


def _commands(checkpoint: Path, audio: Path, out: Path) -> dict[str, list]:
    clip = audio / "rock" / "rock.00000.wav"
    return {"evaluate": ["evaluate", "--checkpoint", checkpoint, "--out-dir", out / "report"],
            "export": ["export", "--checkpoint", checkpoint, "--out", out / "model.onnx",
                       "--exporter", "torchscript"],
            "predict": ["predict", clip, "--checkpoint", checkpoint]}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_a_damaged_field_reads_the_same_in_every_command(name, trained_model_dir, tiny_audio,
                                                         tmp_path):
    damage, words = DAMAGES[name]
    ckpt = torch.load(trained_model_dir / "best.pth", map_location="cpu", weights_only=True)
    damage(ckpt)
    path = tmp_path / "damaged.pth"
    torch.save(ckpt, path)
    said = {}
    for command, args in _commands(path, tiny_audio, tmp_path).items():
        result = invoke(*args)
        assert result.exit_code == CheckpointError.exit_code, (command, result.output)
        said[command] = one_error_line(result.stderr)
    assert len(set(said.values())) == 1, said
    line = said["evaluate"]
    assert line.startswith(f"Error: {path}: damaged or inconsistent checkpoint: ") and words in line, line
    assert not (tmp_path / "report").exists() and not (tmp_path / "model.onnx").exists()


def test_each_command_unpacks_the_checkpoint_once(trained_model_dir, tiny_audio, tmp_path,
                                                  monkeypatch):
    unpacked: list[Path] = []
    unpack = Checkpoint.from_dict.__func__

    def spy(cls, ckpt, path=None):
        unpacked.append(Path(path).resolve())
        return unpack(cls, ckpt, path)

    monkeypatch.setattr(Checkpoint, "from_dict", classmethod(spy))
    best = trained_model_dir / "best.pth"
    for command, args in _commands(best, tiny_audio, tmp_path).items():
        unpacked.clear()
        result = invoke(*args)
        assert result.exit_code == 0, (command, result.output)
        assert unpacked == [best.resolve()], (command, unpacked)
