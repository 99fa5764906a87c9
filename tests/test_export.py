"""ONNX export (deepfusion.export) and the torch-free onnxruntime engine (deepfusion.inference.onnx_engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import torch  # noqa: E402

from deepfusion.config import TrainConfig
from deepfusion.data.dataset import segment_frames  # noqa: E402
from deepfusion.errors import ExportError, OnnxModelError, OutputError, ParameterError  # noqa: E402
from deepfusion.export import export_onnx  # noqa: E402
from deepfusion.inference.clips import predict_clips  # noqa: E402
from deepfusion.inference.onnx_engine import METADATA_KEY, OnnxEngine  # noqa: E402
from deepfusion.io.cache import file_digest  # noqa: E402
from deepfusion.io.featureset import FeatureSet  # noqa: E402
from deepfusion.metrics import softmax  # noqa: E402
from deepfusion.models.checkpoint import (feature_config_of, load_checkpoint,  # noqa: E402
                                          model_from_checkpoint, normalization_of, save_checkpoint)
from deepfusion.views import FEATURE_KEYS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def windows(tiny_features) -> dict[str, np.ndarray]:
    """Six real clip windows (all views) (un-normalised views of 6-s synthetic clips, two per genre)."""
    from deepfusion.io.features_file import load_features

    fs = load_features(tiny_features)
    idx = np.array([0, 1, 6, 7, 12, 13])
    return {k: np.asarray(fs.arrays[k][idx], np.float32) for k in fs.keys}


def _train(tiny_features, model_dir: Path, **kwargs) -> Path:
    from deepfusion.train.run import train

    train(tiny_features, model_dir=model_dir, quiet=True, echo=lambda s: None, **kwargs)
    return model_dir / "best.pth"


@pytest.fixture(scope="module")
def checkpoints(trained_model_dir, tiny_features, tmp_path_factory) -> dict:
    """Checkpoints by name; the probe and resnet18 are trained when first asked for."""
    made = {"light": trained_model_dir / "best.pth"}

    def get(name: str) -> Path:
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            if name == "probe":
                made[name] = _train(tiny_features, folder, config=TrainConfig(
                    model="probe", val_size=0.2, test_size=0.2))
            else:   # resnet18 from scratch: tests never need ImageNet weights
                made[name] = _train(tiny_features, folder, backbone="resnet18", pretrained=False,
                                    config=TrainConfig(epochs=1, batch_size=8, lr=3e-3,
                                                       val_size=0.2, test_size=0.2))
        return made[name]
    return get


@pytest.fixture(scope="module")
def exported(checkpoints, windows, tmp_path_factory):
    """(checkpoint, onnx file, ExportResult) per model name, exported once."""
    done = {}

    def get(name: str):
        if name not in done:
            ckpt = checkpoints(name)
            out = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
            done[name] = ckpt, out, export_onnx(ckpt, out, check_windows=windows, echo=lambda s: None)
        return done[name]
    return get


def torch_outputs(checkpoint: Path, views: dict[str, np.ndarray]):
    """What the torch path (inference.predict_clips, fp32) gives for these windows."""
    ckpt = load_checkpoint(checkpoint)
    n = len(views[FEATURE_KEYS[0]])
    fs = FeatureSet(dict(views), np.full(n, -1, np.int64), list(ckpt["class_names"]), [""] * n,
                    np.arange(n))
    seg = segment_frames(TrainConfig.from_dict(ckpt["train_config"]).segment_seconds,
                         feature_config_of(ckpt), fs.n_frames)
    return predict_clips(model_from_checkpoint(ckpt), fs, normalization_of(ckpt), np.arange(n),
                         seg=seg, embeddings=True), seg


@pytest.mark.slow
@pytest.mark.parametrize("name", ["light", "probe", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_onnxruntime_agrees_with_torch(name, exported, windows):
    checkpoint, out, result = exported(name)
    assert out.is_file() and result.path == out and result.exporter in ("dynamo", "torchscript")
    assert result.windows == 6 and result.max_prob_diff <= 1e-4
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # no temp files left

    engine = OnnxEngine(out)
    ref, seg = torch_outputs(checkpoint, windows)
    got = engine.window_outputs(windows)
    # six windows; attention over the hand-made views and the pretrained one
    assert got["logits"].shape == ref.logits.shape
    assert got["attention"].shape == (6, len(FEATURE_KEYS) + 1)
    assert got["embedding"].shape == ref.embeddings.shape
    np.testing.assert_allclose(softmax(got["logits"]), ref.probabilities(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["attention"], ref.attention, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["embedding"], ref.embeddings, atol=1e-3, rtol=1e-4)
    assert (got["logits"].argmax(1) == ref.predicted).all()

    ckpt = load_checkpoint(checkpoint)
    assert engine.class_names == list(ckpt["class_names"])
    assert engine.feature_config == feature_config_of(ckpt)
    assert engine.segment_frames == seg
    meta = engine.metadata
    assert meta["checkpoint"] == {"file": "best.pth", "sha256": file_digest(checkpoint),
                                  "format_version": ckpt["format_version"]}
    assert meta["deepfusion_version"] and meta["exporter"] == result.exporter


@pytest.mark.slow
def test_segments_in_small_batches_give_the_same_windows(exported, windows):
    _, out, _ = exported("light")
    whole = OnnxEngine(out).window_outputs(windows)
    assert OnnxEngine(out).segment_frames < windows["mfcc"].shape[2]   # several segments a window
    small = OnnxEngine(out, batch_size=3).window_outputs(windows)       # batches straddle windows
    for key in whole:
        np.testing.assert_allclose(small[key], whole[key], atol=1e-6, rtol=1e-6)
    empty = OnnxEngine(out).window_outputs({k: v[:0] for k, v in windows.items()})
    assert empty["logits"].shape == (0, 3)


@pytest.mark.slow
def test_wrong_views_are_refused(exported, windows):
    engine = OnnxEngine(exported("light")[1])
    with pytest.raises(ParameterError, match="missing view"):
        engine.window_outputs({k: v for k, v in windows.items() if k != "chroma"})
    with pytest.raises(ParameterError, match="rows"):
        engine.window_outputs({**windows, "mfcc": windows["mfcc"][:, :5]})
    with pytest.raises(ParameterError, match="shorter than"):
        engine.window_outputs({k: v[:, :, :10] for k, v in windows.items()})


@pytest.mark.slow
def test_a_graph_that_differs_from_torch_is_not_written(checkpoints, windows, tmp_path, monkeypatch):
    """The exporter is handed a model whose classifier was shifted; the torch reference is the
    checkpoint's model: the check must catch the difference and write nothing."""
    import deepfusion.export as export

    real = export._torchscript

    def corrupted(wrapper, example, opset):
        bias = wrapper.model.classifier.bias
        saved = bias.detach().clone()
        with torch.no_grad():
            bias += torch.tensor([3.0, -3.0, 0.0])
        try:
            return real(wrapper, example, opset)
        finally:
            with torch.no_grad():
                bias.copy_(saved)

    monkeypatch.setitem(export._EXPORT, "torchscript", corrupted)
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportError) as info:
        export_onnx(checkpoints("light"), out, check_windows=windows, exporter="torchscript",
                    echo=lambda s: None)
    message = str(info.value)
    assert "\n" not in message and "max probability difference" in message
    assert message.endswith(f"{out} not written; give a larger --tolerance")
    assert list(tmp_path.iterdir()) == []

    # an earlier export at the same place stays as it was
    monkeypatch.setitem(export._EXPORT, "torchscript", real)
    export_onnx(checkpoints("light"), out, check_windows=windows, exporter="torchscript",
                echo=lambda s: None)
    before = out.read_bytes()
    monkeypatch.setitem(export._EXPORT, "torchscript", corrupted)
    with pytest.raises(ExportError):
        export_onnx(checkpoints("light"), out, check_windows=windows, exporter="torchscript",
                    echo=lambda s: None)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.slow
def test_exporter_fallback_and_failures(checkpoints, windows, tmp_path, monkeypatch):
    import deepfusion.export as export

    def broken(wrapper, example, opset):
        raise RuntimeError("this exporter cannot\nhandle the model")

    monkeypatch.setitem(export._EXPORT, "dynamo", broken)
    result = export_onnx(checkpoints("probe"), tmp_path / "a.onnx", check_windows=windows,
                         echo=lambda s: None)
    assert result.exporter == "torchscript"
    assert OnnxEngine(tmp_path / "a.onnx").metadata["exporter"] == "torchscript"

    monkeypatch.setitem(export._EXPORT, "torchscript", broken)
    with pytest.raises(ExportError) as info:
        export_onnx(checkpoints("probe"), tmp_path / "b.onnx", check_windows=windows)
    assert "\n" not in str(info.value) and "dynamo: this exporter" in str(info.value)
    assert "torchscript: this exporter" in str(info.value) and not (tmp_path / "b.onnx").exists()
    assert str(info.value).endswith("; give another --opset")

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ExportError, match=r"needs onnx.*deepfusion\[onnx-export\]"):
        export_onnx(checkpoints("probe"), tmp_path / "c.onnx")
    with pytest.raises(ParameterError, match="exporter"):
        export_onnx(checkpoints("probe"), tmp_path / "c.onnx", exporter="tflite")


@pytest.mark.slow
def test_check_falls_back_to_synthetic_clips(checkpoints, tmp_path):
    """Without windows and without the training features file, the check renders clips."""
    ckpt = load_checkpoint(checkpoints("probe"))
    moved = tmp_path / "best.pth"
    save_checkpoint(moved, {**ckpt, "features_file": str(tmp_path / "gone.pkl")})
    lines = []
    result = export_onnx(moved, tmp_path / "probe.onnx", exporter="torchscript", echo=lines.append)
    assert result.check_source == "two synthetic clips" and result.windows == 2
    assert result.max_prob_diff <= 1e-4 and len(lines) == 1 and "probability difference" in lines[0]
    # by default: the features file the checkpoint was trained on
    result = export_onnx(checkpoints("probe"), tmp_path / "probe2.onnx", exporter="torchscript",
                         echo=lambda s: None)
    assert result.check_source.startswith("the training features file") and result.windows == 8


def test_export_refuses_to_replace_its_checkpoint_or_other_files(checkpoints, tmp_path):
    ckpt = checkpoints("light")
    with pytest.raises(OutputError, match="checkpoint"):
        export_onnx(ckpt, ckpt, echo=lambda s: None)
    other = tmp_path / "notes.onnx"
    other.write_text("my notes")
    with pytest.raises(OutputError, match="not an ONNX model"):
        export_onnx(ckpt, other, echo=lambda s: None)
    assert other.read_text() == "my notes"


@pytest.mark.slow
def test_files_that_are_not_deepfusion_models(exported, tmp_path, monkeypatch):
    import onnx

    missing = tmp_path / "missing.onnx"
    with pytest.raises(OnnxModelError, match="not found"):
        OnnxEngine(missing)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model" * 100)
    with pytest.raises(OnnxModelError) as info:
        OnnxEngine(garbage)
    assert str(garbage) in str(info.value) and "\n" not in str(info.value)

    model = onnx.load(str(exported("probe")[1]))      # a valid ONNX model without our metadata
    del model.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save(model, str(plain))
    with pytest.raises(OnnxModelError, match=f"{plain}: not a deepfusion ONNX model"):
        OnnxEngine(plain)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps({"format": 99})
    onnx.save(model, str(plain))
    with pytest.raises(OnnxModelError, match="format"):
        OnnxEngine(plain)

    monkeypatch.setitem(sys.modules, "onnxruntime", None)    # not installed
    with pytest.raises(OnnxModelError, match=r"deepfusion\[onnx\]"):
        OnnxEngine(exported("probe")[1])


BLOCKED_TORCH = "raise ImportError('torch is blocked in this test')\n"

ENGINE_SCRIPT = """
import sys
import numpy as np
try:
    import torch
except ImportError:
    pass
else:
    sys.exit("torch imported")
from deepfusion.inference.onnx_engine import OnnxEngine
engine = OnnxEngine(sys.argv[1])
with np.load(sys.argv[2]) as f:
    views = dict(f)
out = engine.window_outputs(views)
assert "torch" not in sys.modules, "torch was imported"
np.savez(sys.argv[3], **out)
print(",".join(engine.class_names), engine.segment_frames)
"""


@pytest.mark.slow
def test_engine_runs_where_torch_cannot_be_imported(exported, windows, tmp_path):
    checkpoint, out, _ = exported("light")
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(BLOCKED_TORCH)
    np.savez(tmp_path / "views.npz", **windows)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(out), str(tmp_path / "views.npz"),
                           str(tmp_path / "out.npz")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    ref, seg = torch_outputs(checkpoint, windows)
    assert proc.stdout.split() == [",".join(load_checkpoint(checkpoint)["class_names"]), str(seg)]
    with np.load(tmp_path / "out.npz") as got:
        np.testing.assert_allclose(softmax(got["logits"]), ref.probabilities(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got["attention"], ref.attention, atol=1e-4, rtol=0)


# ------------------------------------------------------------- the commands: export, predict --engine onnx

@pytest.mark.slow
def test_export_then_predict_with_the_onnx_engine_where_torch_cannot_load(checkpoints, tiny_audio,
                                                                          tmp_path):
    """``deepfusion export`` then ``predict --engine onnx`` (and ``embed``) in a process where
    importing torch fails: the same top-1 and probabilities within 1e-4 of the torch engine,
    features computed by the engine's own workers through the cache."""
    from deepfusion.testing import cli_command, invoke, subprocess_env

    checkpoint = checkpoints("light")
    model = tmp_path / "model.onnx"
    done = invoke("export", "--checkpoint", checkpoint, "--out", model)
    assert done.exit_code == 0, done.output
    assert "max probability difference" in done.output and model.is_file()
    files = [tiny_audio / g / f"{g}.0000{i}.wav" for g in ("rock", "techno", "waltz") for i in (1, 4)]
    ref = invoke("predict", *files, "--checkpoint", checkpoint, "--json", "--cache-dir",
                 tmp_path / "c1", "--top-k", "3")
    assert ref.exit_code == 0, ref.output
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(BLOCKED_TORCH)
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(fake), str(REPO)]))
    proc = subprocess.run(cli_command("predict", *files, "--checkpoint", model, "--engine", "onnx",
                                      "--json", "--cache-dir", tmp_path / "c2", "--jobs", "2"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    want = [json.loads(ln) for ln in ref.stdout.splitlines()]
    got = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert [o["path"] for o in got] == [str(f) for f in files]
    for a, b in zip(want, got):
        assert a["top"][0]["genre"] == b["top"][0]["genre"]
        pa = {t["genre"]: t["probability"] for t in a["top"]}
        pb = {t["genre"]: t["probability"] for t in b["top"]}
        assert pa.keys() == pb.keys() and all(abs(pa[g] - pb[g]) < 1e-4 for g in pa)
    # the onnx model's outputs are kept under its own id (embed below reads them)
    kept = [p for p in (tmp_path / "c2").glob("features-*/outputs/*") if p.is_dir()]
    assert len(kept) == 1 and "-onnx-" in kept[0].name, kept
    assert len(list(kept[0].rglob("*.npz"))) == len(files)
    proc = subprocess.run(cli_command("embed", *files, "--checkpoint", model, "--engine", "onnx",
                                      "--out", tmp_path / "e.npz", "--cache-dir", tmp_path / "c2"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "e.npz") as npz:
        assert list(npz["genres"]) == [o["top"][0]["genre"] for o in want]
        assert npz["embeddings"].shape == (len(files), 256)


def test_predict_onnx_with_a_checkpoint_is_one_line(checkpoints, tiny_audio):
    from deepfusion.testing import invoke, one_error_line

    clip = tiny_audio / "rock" / "rock.00000.wav"
    result = invoke("predict", clip, "--checkpoint", checkpoints("light"), "--engine", "onnx")
    assert result.exit_code != 0
    assert str(checkpoints("light")) in one_error_line(result.stderr)
