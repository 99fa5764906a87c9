"""The seventh, pretrained view (musicnn) through every stage: its shape and time axis, the
features file and the store, the network's branch and the probe, ONNX export, and `tag`."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from deepfusion.config import FeatureConfig, ModelConfig
from deepfusion.errors import FeaturesFileError, ParameterError
from deepfusion.features.pretrained.view import (PARTS, VIEW_ROWS, all_patches, chosen_patches,
                                                 n_patches, part_rows, patch_span, pretrained_view)
from deepfusion.io.features_file import load_features
from deepfusion.testing import TINY_FEATURES, invoke, load_own_pickle, save_store
from deepfusion.views import FEATURE_KEYS, PRETRAINED_KEY


def test_patches_per_clip_follow_musicnn():
    assert all_patches(30 * 22050, 22050) == 10        # 30 s: 1876 frames at hop 256, 187 each
    assert all_patches(6 * 22050, 22050) == 2
    assert all_patches(22050, 22050) == 1              # shorter than a patch: padded to one
    assert list(chosen_patches(10, 4)) == [0, 4, 8]    # one in four, centred
    assert list(chosen_patches(11, 4)) == [1, 5, 9]
    assert list(chosen_patches(10, 1)) == list(range(10))
    assert n_patches(30 * 22050, 22050, 4) == 3 and n_patches(6 * 22050, 22050, 4) == 1
    assert FeatureConfig().feature_shapes()[PRETRAINED_KEY] == (VIEW_ROWS, 3)
    assert FeatureConfig(pretrained_stride=1).feature_shapes()[PRETRAINED_KEY] == (VIEW_ROWS, 10)
    assert VIEW_ROWS == sum(n for _, n in PARTS) == 250
    assert part_rows("taggram") == slice(200, 250)


@pytest.mark.parametrize("start,length,frames,patches,want", [
    (0, 1292, 1292, 10, (0, 10)),       # the whole clip: every patch
    (0, 129, 1292, 10, (0, 1)),         # a 3-s segment: one patch, the one it starts in
    (1200, 92, 1292, 10, (9, 1)),       # the last frames: the last patch
    (650, 129, 1292, 10, (5, 1)),
    (0, 5, 1292, 10, (0, 1)),           # never fewer than one
])
def test_patch_span(start, length, frames, patches, want):
    assert patch_span(start, length, frames, patches) == want


def test_count_depends_on_length_only_so_segments_stack():
    counts = {patch_span(s, 258, 1292, 10)[1] for s in range(0, 1292 - 258 + 1, 7)}
    assert counts == {2}


def test_the_view_of_a_clip(tiny_audio):
    from deepfusion.audio import decode

    clip = sorted(tiny_audio.rglob("*.wav"))[0]
    y = decode(clip, sr=22050, duration=6.0).y
    view = pretrained_view(y, 22050)
    assert view.shape == (VIEW_ROWS, 2) and view.dtype == np.float32
    # a stride keeps the chosen patches of the full view (a batch of another size through
    # the dense layers: float32 rounding apart)
    np.testing.assert_allclose(pretrained_view(y, 22050, stride=2), view[:, :1], atol=1e-5)
    tags = view[part_rows("taggram")]
    assert ((tags >= 0) & (tags <= 1)).all()            # likelihoods
    assert np.isfinite(view).all()
    # pure: the same clip gives the same view
    assert np.array_equal(view, pretrained_view(y, 22050))


def test_fingerprint_without_the_view_is_the_six_view_namespace(version_1_views):
    """Caches written before the view existed stay valid for --pretrained-view none."""
    assert FeatureConfig(pretrained_view=None).fingerprint() == "09bc1cf4567ee34b"
    assert FeatureConfig(pretrained_view=None, pretrained_stride=1).fingerprint() == "09bc1cf4567ee34b"
    assert FeatureConfig(pretrained_stride=1).fingerprint() != FeatureConfig().fingerprint()
    assert FeatureConfig().fingerprint() != FeatureConfig(pretrained_view=None).fingerprint()
    old = {k: v for k, v in FeatureConfig().to_dict().items() if k != "pretrained_view"}
    assert FeatureConfig.from_dict(old).pretrained_view is None     # saved before it existed


def test_unknown_view_is_refused():
    with pytest.raises(ParameterError, match="--pretrained-view VGG: not a pretrained view") as err:
        FeatureConfig(pretrained_view="VGG")
    assert err.value.field == "pretrained_view"


def test_features_file_holds_the_view(tiny_features):
    fs = load_features(tiny_features)
    assert fs.keys == (*FEATURE_KEYS, PRETRAINED_KEY) and fs.has_pretrained
    assert fs.arrays[PRETRAINED_KEY].shape == (18, VIEW_ROWS, 1)      # 6 s: 2 patches, 1 in 4
    assert fs.n_frames == TINY_FEATURES.n_frames


def test_a_file_where_some_clips_lack_the_view_is_refused(tiny_features, tmp_path):
    items = load_own_pickle(tiny_features)
    del items[3]["features"][PRETRAINED_KEY]
    bad = tmp_path / "mixed.pkl"
    bad.write_bytes(pickle.dumps(items))
    with pytest.raises(FeaturesFileError, match=rf"clip 4 \({items[3]['path']}\): lacks the musicnn view"):
        load_features(bad)


def _six_view_file(tiny_features, tmp_path) -> Path:
    """The tiny features as an older deepfusion (or --pretrained-view none) wrote them."""
    items = load_own_pickle(tiny_features)
    for it in items:
        del it["features"][PRETRAINED_KEY]
        it["feature_config"] = {**it["feature_config"], "pretrained_view": None}
    six = tmp_path / "six.pkl"
    six.write_bytes(pickle.dumps(items))
    return six


def test_six_view_files_still_load(tiny_features, tmp_path):
    fs = load_features(_six_view_file(tiny_features, tmp_path))
    assert fs.keys == FEATURE_KEYS and not fs.has_pretrained


def test_store_round_trip_keeps_the_view(tiny_features, tmp_path):
    from deepfusion.io.store import open_store, read_meta

    fs = load_features(tiny_features)
    save_store(fs, tmp_path / "f.store")
    back = open_store(tmp_path / "f.store")
    assert back.keys == fs.keys
    assert read_meta(tmp_path / "f.store")["patches"] == 1
    for k in fs.keys:
        assert np.array_equal(back.arrays[k], fs.arrays[k]), k


@pytest.mark.slow
def test_train_without_the_view_says_so_once(tiny_features, tmp_path):
    from deepfusion.config import TrainConfig
    from deepfusion.train.run import train

    six = _six_view_file(tiny_features, tmp_path)
    lines: list[str] = []
    train(six, model_dir=tmp_path / "m", backbone="light", pretrained=False, quiet=True,
          config=TrainConfig(epochs=1, batch_size=8), echo=lines.append)
    said = [line for line in lines if "no pretrained view" in line]
    assert len(said) == 1 and said[0].startswith("warning: ") and "extract again to add it" in said[0]
    import torch

    ckpt = torch.load(tmp_path / "m" / "best.pth", weights_only=True)
    assert ckpt["model_config"]["pretrained_view_rows"] == 0
    assert set(ckpt["normalization"]) == set(FEATURE_KEYS)


def test_network_has_a_branch_for_the_view(trained_model_dir):
    import torch

    from deepfusion.models.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(trained_model_dir / "best.pth")
    assert ckpt["model_config"]["pretrained_view_rows"] == VIEW_ROWS
    model = model_from_checkpoint(ckpt)
    assert model.keys[-1] == PRETRAINED_KEY and PRETRAINED_KEY in model.aux
    shapes = FeatureConfig.from_dict(ckpt["feature_config"]).feature_shapes()
    x = {k: torch.randn(2, r, 50) for k, (r, _) in shapes.items() if k in FEATURE_KEYS}
    x[PRETRAINED_KEY] = torch.randn(2, VIEW_ROWS, 1)
    out = model(x)
    assert out["attention"].shape == (2, len(FEATURE_KEYS) + 1)
    torch.testing.assert_close(out["attention"].sum(1), torch.ones(2))


def test_a_checkpoint_whose_view_rows_disagree_is_refused(trained_model_dir, tmp_path):
    import torch

    from deepfusion.errors import CheckpointError
    from deepfusion.models.checkpoint import load_checkpoint

    ckpt = torch.load(trained_model_dir / "best.pth", weights_only=True)
    ckpt["feature_config"] = {**ckpt["feature_config"], "pretrained_view": None}
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="pretrained view"):
        load_checkpoint(tmp_path / "bad.pth")


@pytest.mark.slow
def test_probe_uses_the_view(tiny_features, tmp_path):
    from deepfusion.config import TrainConfig
    from deepfusion.models.probe import LinearProbe, n_pooled_stats
    from deepfusion.train.run import train

    train(tiny_features, model_dir=tmp_path / "p", quiet=True,
          config=TrainConfig(model="probe"), echo=lambda s: None)
    import torch

    ckpt = torch.load(tmp_path / "p" / "best.pth", weights_only=True)
    probe = LinearProbe.from_config(ckpt["model_config"])
    assert probe.keys[-1] == PRETRAINED_KEY
    default = ModelConfig(n_classes=2)          # the tiny features have the default settings
    assert probe.classifier.in_features == n_pooled_stats(128, default.aux_rows, VIEW_ROWS)
    # an old probe config (no pretrained_view_rows) is the six-view probe
    old = {k: v for k, v in ckpt["model_config"].items() if k != "pretrained_view_rows"}
    assert LinearProbe.from_config(old).keys == FEATURE_KEYS


@pytest.mark.slow
def test_export_takes_seven_inputs_and_matches_torch(trained_model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from deepfusion.export import export_onnx
    from deepfusion.inference.onnx_engine import OnnxEngine

    result = export_onnx(trained_model_dir / "best.pth", tmp_path / "m.onnx", echo=lambda s: None)
    assert result.max_prob_diff < 1e-4
    engine = OnnxEngine(tmp_path / "m.onnx")
    assert engine.keys == (*FEATURE_KEYS, PRETRAINED_KEY)
    assert result.metadata["inputs"][-1] == PRETRAINED_KEY


@pytest.mark.slow
def test_tag_command(tiny_audio, tmp_path):
    from deepfusion.features.pretrained.musicnn import TAGS

    clips = sorted(tiny_audio.rglob("*.wav"))[:2]
    cache = tmp_path / "cache"
    first = invoke("tag", *clips, "--json", "--cache-dir", cache, "--quiet", "--jobs", "1")
    assert first.exit_code == 0, first.output
    rows = [json.loads(line) for line in first.output.splitlines()]
    assert [r["path"] for r in rows] == [str(c) for c in clips]
    for r in rows:
        assert r["model"] == "MTT_musicnn" and list(r["tags"]) == list(TAGS["MTT_musicnn"])
        assert all(0 <= p <= 1 for p in r["tags"].values())
    # the likelihoods are the mean over the clip's patches of the view extract computes
    from deepfusion.audio import decode

    # a 6-s file: its own 2 patches (musicnn's tagger), not the 8 of the padding to 30 s
    view = pretrained_view(decode(clips[0], sr=22050, duration=None).y, 22050, "MTT_musicnn")
    assert view.shape[1] == 2
    want = view[part_rows("taggram")].mean(axis=1)
    got = np.array(list(rows[0]["tags"].values()))
    np.testing.assert_allclose(got, want, atol=2e-6)
    # second run: the cache answers (the entries are extract's: same namespace)
    entries = sorted(p for p in cache.rglob("*.npz"))
    again = invoke("tag", *clips, "--cache-dir", cache, "--quiet", "--top-k", "3")
    assert again.exit_code == 0
    assert sorted(p for p in cache.rglob("*.npz")) == entries
    line = again.output.splitlines()[0]
    top = sorted(rows[0]["tags"].items(), key=lambda kv: -kv[1])[:3]
    assert line == f"{clips[0]}: " + ", ".join(f"{t} {p:.3f}" for t, p in top)


def test_tag_reports_bad_files_in_one_line(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    result = invoke("tag", bad, "--cache-dir", tmp_path / "c", "--quiet", "--jobs", "1")
    assert result.exit_code == 1
    assert f"skipped {bad}:" in result.output and "Traceback" not in result.output


def test_tag_model_choice():
    result = invoke("tag", "x.wav", "--model", "VGG")
    assert result.exit_code == 2 and "MSD_musicnn" in result.output


def test_model_config_default_has_no_view():
    assert ModelConfig(n_classes=2).pretrained_view_rows == 0
    assert replace(ModelConfig(n_classes=2), pretrained_view_rows=VIEW_ROWS).pretrained_view_rows == VIEW_ROWS


ONNX_VIEW_SCRIPT = """
import sys
import numpy as np
from deepfusion.features.pretrained.view import pretrained_view
y = np.load(sys.argv[1])
np.save(sys.argv[2], pretrained_view(y, 22050))
assert "torch" not in sys.modules, "torch was imported"
"""


@pytest.mark.slow
def test_the_view_without_torch_runs_the_shipped_onnx_form(tmp_path):
    """predict --engine onnx on a machine without torch still computes the view (onnxruntime
    on weights/<model>.onnx), equal to the torch port's within float32 rounding."""
    import os
    import subprocess
    import sys

    pytest.importorskip("onnxruntime")
    from deepfusion.testing import subprocess_env

    y = (np.random.default_rng(3).standard_normal(22050 * 7) * 0.2).astype(np.float32)
    np.save(tmp_path / "y.npy", y)
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch is blocked here')\n")
    repo = Path(__file__).resolve().parents[1]
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(fake), str(repo)]))
    proc = subprocess.run([sys.executable, "-c", ONNX_VIEW_SCRIPT, str(tmp_path / "y.npy"),
                           str(tmp_path / "v.npy")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    got, want = np.load(tmp_path / "v.npy"), pretrained_view(y, 22050)
    assert got.shape == want.shape == (VIEW_ROWS, 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_settings_that_disagree_with_the_views_are_refused(tiny_features, tmp_path):
    """A file whose feature_config names no view but whose clips hold it (or the reverse)
    would train a model its own checkpoint then refuses: refused at load, in one line."""
    items = load_own_pickle(tiny_features)
    for it in items:
        it["feature_config"] = {**it["feature_config"], "pretrained_view": None}
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps(items))
    with pytest.raises(FeaturesFileError, match="says no pretrained view but its clips have"):
        load_features(bad)


def test_a_file_without_settings_guesses_them_from_its_views(tiny_features, tmp_path):
    """The original project's pickle (features and label only): no pretrained view."""
    from deepfusion.data.dataset import feature_config_of

    items = load_own_pickle(tiny_features)
    plain = [{"features": {k: v for k, v in it["features"].items() if k != PRETRAINED_KEY},
              "label": it["label"]} for it in items]
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(plain))
    assert feature_config_of(load_features(path)).pretrained_view is None
    assert feature_config_of(load_features(tiny_features)).pretrained_view == "MTT_musicnn"


def test_no_view_means_no_stride():
    assert FeatureConfig(pretrained_view=None, pretrained_stride=1) == FeatureConfig(pretrained_view=None)
    with pytest.raises(ParameterError, match="pretrained_view_rows"):
        ModelConfig(n_classes=2, pretrained_view_rows=-1)
