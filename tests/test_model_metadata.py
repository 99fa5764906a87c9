"""Models that lie about themselves: an ONNX model's ``deepfusion`` metadata and a checkpoint
checked with one schema (:mod:`deepfusion.models.meta`), through every command that loads them.

Each forgery must end the command with the error's own exit code (never 70, an internal error)
and one line naming the file and the field; the same forgery of a checkpoint and of an ONNX
model reads the same after the file's name.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import torch  # noqa: E402

from deepfusion.errors import CheckpointError, OnnxModelError  # noqa: E402
from deepfusion.inference.onnx_engine import METADATA_KEY, OnnxEngine  # noqa: E402
from deepfusion.testing import invoke, one_error_line  # noqa: E402

ONNX_BAD = "damaged or inconsistent ONNX model: "
CKPT_BAD = "damaged or inconsistent checkpoint: "

# the tests through ONNX models and checkpoints are slow (each needs the module's ONNX export,
# about 10 s); those of the checks themselves (deepfusion.models.meta, at the end) are not


@pytest.fixture(scope="module")
def exported(trained_model_dir, tmp_path_factory) -> Path:
    """The light checkpoint of conftest exported once (checked on its training features)."""
    from deepfusion.export import export_onnx

    out = tmp_path_factory.mktemp("meta-onnx") / "model.onnx"
    export_onnx(trained_model_dir / "best.pth", out, echo=lambda s: None)
    return out


@pytest.fixture(scope="module")
def clip(tiny_audio) -> Path:
    return tiny_audio / "rock" / "rock.00000.wav"


def _metadata(path: Path) -> dict:
    model = onnx.load(str(path))
    return json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))


def forge_onnx(source: Path, out: Path, change) -> Path:
    """``source`` with its metadata changed: ``change(meta)`` edits the dict in place, or
    returns the raw text to store instead."""
    model = onnx.load(str(source))
    entry = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    meta = json.loads(entry.value)
    raw = change(meta)
    entry.value = raw if isinstance(raw, str) else json.dumps(meta)
    onnx.save(model, str(out))
    return out


def _set(*keys, value):
    """A change setting ``meta[k1][k2]...`` to ``value`` (a callable: of the old value)."""
    def change(meta):
        target = meta
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value(target[keys[-1]]) if callable(value) else value
    return change


def _drop(key):
    def change(meta):
        del meta[key]
    return change


def _changes(*changes):
    def change(meta):
        for one in changes:
            one(meta)
    return change


#: Forgeries of the fields a checkpoint and an ONNX model share: name -> (change, words).
#: Each applies to an ONNX model's metadata and to a checkpoint dict alike.
COMMON = {
    "class names a plain string": (_set("class_names", value="rock"), "class_names is str 'rock'"),
    "class names with a number": (_set("class_names", value=lambda v: [*v[:-1], 5]),
                                  "class_names[2] 5 is not a non-empty name"),
    "class names with an empty one": (_set("class_names", value=lambda v: [*v[:-1], ""]),
                                      "class_names[2]"),
    "duplicate class names": (_set("class_names", value=lambda v: [v[0]] * len(v)), "twice"),
    "more names than the classifier": (_set("class_names", value=lambda v: [*v, "polka"]),
                                       "class_names: 4 class names for a classifier of 3 classes"),
    "millions of class names": (_set("class_names", value=[f"g{i}" for i in range(100_001)]),
                                "class_names holds 100,001 names"),
    "sample rate out of range": (_set("feature_config", "sample_rate", value=10**9),
                                 "feature_config.sample_rate 1000000000 is outside"),
    "huge sample rate": (_set("feature_config", "sample_rate", value=10**40),
                         "feature_config.sample_rate"),
    "negative n_fft": (_set("feature_config", "n_fft", value=-4),
                       "feature_config: --n-fft -4: must be a whole number above 0"),
    "sample rate a string": (_set("feature_config", "sample_rate", value="22050"),
                             "feature_config.sample_rate '22050' is not a whole number"),
    "duration a bool": (_set("feature_config", "duration", value=True),
                        "feature_config.duration True is not a finite number"),
    "duration not a number": (_set("feature_config", "duration", value=float("nan")),
                              "feature_config.duration nan is not a finite number"),
    "fmax a list": (_set("feature_config", "fmax", value=[1]), "feature_config.fmax [1] is not a finite"),
    "unknown feature setting": (_set("feature_config", value=lambda v: {**v, "n_bins": 3}),
                                "feature_config has unknown field(s) n_bins"),
    "feature settings a string": (_set("feature_config", value="default"),
                                  "feature_config is str 'default', not a mapping"),
    "feature settings invalid together": (_set("feature_config", "hop_length", value=4096),
                                          "feature_config: --hop-length 4096: at most --n-fft"),
    "endless clips": (_changes(_set("feature_config", "duration", value=3600.0),
                               _set("feature_config", "sample_rate", value=96_000)),
                      "feature_config: clips of 3600 s at 96000 Hz"),
    "mel bands disagree": (_set("model_config", "n_mels", value=64),
                           "model_config.n_mels, aux_rows: the model takes 64 mel bands"),
    "aux rows a string": (_set("model_config", "aux_rows", value="20,12,384"),
                          "model_config.aux_rows '20,12,384' is not a list of whole numbers"),
    "huge fusion layer": (_set("model_config", "fusion_hidden", value=[10**9]),
                          "model_config.fusion_hidden [1000000000]"),
    "huge embedding": (_set("model_config", "embed_dim", value=2**40),
                       "model_config.embed_dim 1099511627776 is outside"),
    "unknown model field": (_set("model_config", value=lambda v: {**v, "layers": 9}),
                            "model_config has unknown field(s) layers"),
    "no class names": (_drop("class_names"), "no class_names"),
    "no feature settings": (_drop("feature_config"), "no feature_config"),
}

#: Forgeries only an ONNX model's metadata can have: name -> (change, words after the file).
ONNX_ONLY = {
    "wider logits than the graph": (
        _changes(_set("class_names", value=lambda v: [*v, "polka"]),
                 _set("model_config", "n_classes", value=lambda n: n + 1)),
        ONNX_BAD + "class_names: 4 class names for a graph whose logits output has 3 classes"),
    "rows not the feature config's": (_set("rows", "mfcc", value=13), ONNX_BAD + "rows {"),
    "rows a list": (_set("rows", value=[128, 128]), ONNX_BAD + "rows [128, 128] are not the rows"),
    "rows not the graph's": (
        _changes(_set("feature_config", "n_mfcc", value=13), _set("rows", "mfcc", value=13),
                 _set("model_config", "aux_rows", value=lambda r: [13, *r[1:]])),
        ONNX_BAD + "rows: the graph's mfcc input takes 20 rows, its metadata says 13"),
    "segment frames not the graph's": (_set("segment_frames", value=lambda s: s - 1),
                                       ONNX_BAD + "segment_frames: the graph's mel_spec_orig input"),
    "huge segment frames": (_set("segment_frames", value=10**12),
                            ONNX_BAD + "segment_frames 1000000000000 is not a whole number in [1, "),
    "segment frames a string": (_set("segment_frames", value="129"),
                                ONNX_BAD + "segment_frames '129' is not a whole number"),
    "views not the graph's": (_set("feature_config", "pretrained_view", value=None),
                              ONNX_BAD + "model_config.pretrained_view_rows"),
    "no rows": (_drop("rows"), ONNX_BAD + "no rows"),
    "no segment frames, no model config": (_changes(_drop("segment_frames"), _drop("model_config")),
                                           ONNX_BAD + "no model_config, segment_frames"),
    "another format": (_set("format", value=2), "exported by another deepfusion version "
                       "(metadata format 2; this one reads 1); export it again with deepfusion export"),
    "a format that is a string": (_set("format", value="1"), "metadata format '1'"),
    "no format": (_drop("format"), "(no metadata format; this one reads 1)"),
    "metadata a list": (lambda meta: json.dumps([meta]),
                        ONNX_BAD + "its 'deepfusion' metadata is a JSON array, not an object"),
    "metadata a string": (lambda meta: json.dumps("model"), "metadata is a JSON string, not an object"),
    "metadata not JSON": (lambda meta: "{class_names: rock",
                          ONNX_BAD + "its 'deepfusion' metadata is not JSON"),
    "metadata nested too deep": (lambda meta: "[" * 100_000,
                                 ONNX_BAD + "its 'deepfusion' metadata is not JSON"),
}


def _refusal(result, path: Path, exit_code: int) -> str:
    """The one error line of a refused model, checked to name ``path``; what follows the name."""
    line = one_error_line(result.stderr)
    assert result.exit_code == exit_code, (result.exit_code, result.stderr)
    prefix = f"Error: {path}: "
    assert line.startswith(prefix), line
    return line[len(prefix):]


def _onnx_commands(clip: Path, model: Path, out: Path) -> dict[str, list]:
    """Every command that loads an ONNX model."""
    return {"predict": ["predict", clip, "--checkpoint", model, "--engine", "onnx"],
            "predict --json": ["predict", clip, "--checkpoint", model, "--engine", "onnx", "--json"],
            "embed": ["embed", clip, "--checkpoint", model, "--engine", "onnx", "--out", out]}


@pytest.mark.slow
def test_a_valid_exported_model_is_accepted(exported, clip, tmp_path):
    engine = OnnxEngine(exported)
    meta = _metadata(exported)
    assert engine.class_names == meta["class_names"] and engine.segment_frames == meta["segment_frames"]
    assert engine.described.model_config.n_classes == len(engine.class_names)
    for name, args in _onnx_commands(clip, exported, tmp_path / "e.npz").items():
        result = invoke(*args, "--cache-dir", tmp_path / "cache")
        assert result.exit_code == 0, (name, result.output)
    assert (tmp_path / "e.npz").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMON) + list(ONNX_ONLY))
def test_forged_onnx_metadata_is_one_line_naming_the_field(name, exported, clip, tmp_path):
    change, words = {**COMMON, **ONNX_ONLY}[name]
    forged = forge_onnx(exported, tmp_path / "forged.onnx", change)
    for command, args in _onnx_commands(clip, forged, tmp_path / "e.npz").items():
        said = _refusal(invoke(*args, "--cache-dir", tmp_path / "cache"), forged,
                        OnnxModelError.exit_code)
        if name in COMMON:
            assert said.startswith(ONNX_BAD), (command, said)
        assert words in said, (command, said)
    assert not (tmp_path / "e.npz").exists() and not (tmp_path / "cache").exists()
    with pytest.raises(OnnxModelError) as info:   # the library says the same
        OnnxEngine(forged)
    assert str(info.value) == f"{forged}: {said}"


@pytest.mark.slow
def test_oversized_metadata_is_refused_before_it_is_parsed(exported, clip, tmp_path, monkeypatch):
    from deepfusion.inference import onnx_engine

    monkeypatch.setattr(onnx_engine, "MAX_METADATA_CHARS", 1000)
    said = _refusal(invoke("predict", clip, "--checkpoint", exported, "--engine", "onnx"), exported,
                    OnnxModelError.exit_code)
    assert said.startswith(ONNX_BAD + "its 'deepfusion' metadata holds ") and "over 1,000" in said


@pytest.mark.slow
def test_the_class_width_is_checked_again_on_each_batch(exported):
    """A graph may leave its logits width symbolic (onnxruntime then knows it only when it
    runs): the outputs of each batch are checked against the class names too."""
    import numpy as np

    engine = OnnxEngine(exported)
    engine.class_names.append("polka")      # what a width unknown on load would let through
    fc = engine.feature_config
    views = {k: np.zeros((1, r, fc.n_patches if k == "musicnn" else fc.n_frames), np.float32)
             for k, r in engine.rows.items()}
    with pytest.raises(OnnxModelError, match="class_names: 4 class names for a graph whose logits"):
        engine.window_outputs(views)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMON))
def test_a_forged_checkpoint_reads_as_the_same_forged_onnx_model(name, trained_model_dir, exported,
                                                                clip, tmp_path):
    """evaluate and predict (the torch engine) refuse the checkpoint with the words the onnx
    engine uses for the same field."""
    change, words = COMMON[name]
    best = torch.load(trained_model_dir / "best.pth", weights_only=True)
    ckpt = copy.deepcopy(best)
    change(ckpt)
    path = tmp_path / "forged.pth"
    torch.save(ckpt, path)
    forged = forge_onnx(exported, tmp_path / "forged.onnx", change)
    with pytest.raises(OnnxModelError) as info:
        OnnxEngine(forged)
    onnx_said = str(info.value)[len(f"{forged}: {ONNX_BAD}"):]
    for args in (["evaluate", "--checkpoint", path, "--out-dir", tmp_path / "report"],
                 ["predict", clip, "--checkpoint", path]):
        said = _refusal(invoke(*args), path, CheckpointError.exit_code)
        assert said == CKPT_BAD + onnx_said, (args[0], said, onnx_said)
        assert words in said
    assert not (tmp_path / "report").exists()


# ------------------------------------------------- the checks themselves (fast, no model needed)
#
# The same forgeries handed straight to deepfusion.models.meta: what each check refuses, in its
# own words, and what it lets through (issue 23: these are the tests its mutants meet).

def _described() -> dict:
    """What a checkpoint or an ONNX model of 3 genres says of itself, as JSON gives it back."""
    from deepfusion.config import FeatureConfig, ModelConfig

    fc = FeatureConfig(duration=6.0)
    mc = ModelConfig(n_classes=3, n_mels=fc.n_mels, backbone="light",
                     aux_rows=(fc.n_mfcc, fc.n_chroma, fc.tempogram_win_length),
                     pretrained_view_rows=fc.feature_shapes()["musicnn"][0])
    return json.loads(json.dumps({"class_names": ["blues", "classical", "rock"],
                                  "feature_config": fc.to_dict(), "model_config": mc.to_dict()}))


def _refused_by_meta(check, *args) -> str:
    class Forged(Exception):
        pass
    with pytest.raises(Forged) as info:
        check(*args, Forged)
    return str(info.value)


def test_a_true_description_is_accepted_as_it_is():
    from deepfusion.config import FeatureConfig
    from deepfusion.models.meta import check_description

    saved = _described()
    described = check_description(saved, ValueError)
    assert described.class_names == ["blues", "classical", "rock"]
    assert described.feature_config == FeatureConfig(duration=6.0)
    assert described.model_config.aux_rows == (20, 12, 384)
    assert described.model_config.band_stats is False       # a field saved before it existed
    assert described.rows == {"mel_spec_orig": 128, "mel_spec_harm": 128, "mel_spec_perc": 128,
                              "mfcc": 20, "chroma": 12, "tempogram": 384, "musicnn": 250}
    assert described.keys == tuple(described.rows)
    del saved["model_config"]["band_stats"]
    assert check_description(saved, ValueError).model_config.band_stats is False


@pytest.mark.parametrize("name", [n for n, (_, words) in COMMON.items() if not words.startswith("no ")])
def test_each_forgery_is_refused_by_the_check_itself(name):
    """check_description refuses each forgery with the words the commands print (a missing
    field is the caller's to name: it never reaches the check)."""
    from deepfusion.models.meta import check_description

    change, words = COMMON[name]
    saved = _described()
    change(saved)
    said = _refused_by_meta(check_description, saved)
    assert words in said and "\n" not in said, said


@pytest.mark.parametrize("field, value, words", [
    ("sample_rate", 999, "feature_config.sample_rate 999 is outside [1000, 384000]"),
    ("sample_rate", 384_001, "feature_config.sample_rate 384001 is outside"),
    ("hpss_kernel", 1025, "feature_config.hpss_kernel 1025 is outside [1, 1023]"),
    ("fmax", "8000", "feature_config.fmax '8000' is not a finite number or none"),
    ("fmax", True, "feature_config.fmax True is not a finite number or none"),
    ("fmax", float("inf"), "feature_config.fmax inf is not a finite number or none"),
    ("n_mels", 2.5, "feature_config.n_mels 2.5 is not a whole number"),
    ("n_mels", False, "feature_config.n_mels False is not a whole number"),
    ("pretrained_view", 3, "feature_config.pretrained_view 3 is not a string or none"),
])
def test_feature_settings_out_of_range_or_of_the_wrong_type(field, value, words):
    from deepfusion.models.meta import check_description

    saved = _described()
    saved["feature_config"][field] = value
    assert words in _refused_by_meta(check_description, saved)


def test_feature_settings_at_their_limits_are_accepted():
    from deepfusion.models.meta import FEATURE_LIMITS, check_description

    for field in ("sample_rate", "hpss_kernel"):
        for value in FEATURE_LIMITS[field]:
            saved = _described()
            saved["feature_config"][field] = value
            try:
                check_description(saved, ValueError)
            except ValueError as exc:     # another check may refuse it, never the range's
                assert "is outside" not in str(exc), (field, value, exc)
    saved = _described()
    saved["feature_config"].update(fmax=8000, fmin=20)     # whole numbers are numbers too
    assert check_description(saved, ValueError).feature_config.fmax == 8000


@pytest.mark.parametrize("change, words", [
    ({"n_classes": 100_001}, "model_config.n_classes 100001 is outside [2, 100000]"),
    ({"embed_dim": 8193}, "model_config.embed_dim 8193 is outside [1, 8192]"),
    ({"aux_hidden": 0}, "model_config.aux_hidden 0 is outside [1, 16384]"),
    ({"fusion_hidden": [8] * 17}, "model_config.fusion_hidden [8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, "
                                  "8, 8, 8, 8, 8] is not 1 to 16 widths of 1 to 65536"),
    ({"fusion_hidden": [0]}, "model_config.fusion_hidden [0] is not 1 to 16 widths"),
    ({"fusion_hidden": [65_537]}, "model_config.fusion_hidden [65537] is not 1 to 16 widths"),
    ({"fusion_hidden": [1, True]}, "model_config.fusion_hidden [1, True] is not a list of whole "
                                   "numbers"),
    ({"aux_rows": [20, 12]}, "model_config.n_mels, aux_rows: the model takes 128 mel bands and aux rows [20, 12], the feature config makes 128 and [20, 12, 384]"),
    ({"aux_rows": [20, 13, 384]}, "the model takes 128 mel bands and aux rows [20, 13, 384], the "
                                  "feature config makes 128 and [20, 12, 384]"),
    ({"pretrained_view_rows": 50}, "model_config.pretrained_view_rows: the model takes 50 rows of "
                                   "the pretrained view, the feature config makes 250"),
    ({"band_stats": 1}, "model_config.band_stats 1 is not true or false"),
    ({"backbone": "vgg"}, "model_config: backbone must be one of"),
    ({"dropout": 1.0}, "model_config: dropout must be in [0, 1)"),
])
def test_model_settings_out_of_range_or_disagreeing(change, words):
    from deepfusion.models.meta import check_description

    saved = _described()
    saved["model_config"].update(change)
    assert words in _refused_by_meta(check_description, saved)


def test_model_settings_at_their_limits_are_accepted():
    from deepfusion.models.meta import check_description

    saved = _described()
    saved["model_config"].update(fusion_hidden=[65_536] + [1] * 15, embed_dim=8192, aux_hidden=1)
    assert check_description(saved, ValueError).model_config.fusion_hidden[0] == 65_536
    saved["model_config"].update(fusion_hidden=[], embed_dim=1, aux_hidden=16_384)
    assert check_description(saved, ValueError).model_config.fusion_hidden == ()


def test_class_names_are_a_list_of_distinct_names_as_wide_as_the_classifier():
    from deepfusion.models.meta import MODEL_LIMITS, check_class_count, check_class_names

    assert check_class_names(("a", "b"), ValueError) == ["a", "b"]
    assert check_class_names([f"g{i}" for i in range(100_000)], ValueError)[-1] == "g99999"
    assert _refused_by_meta(check_class_names, {"a": 1}) == (
        "class_names is dict {'a': 1}, not a list of distinct non-empty names")
    assert _refused_by_meta(check_class_names, ["a", None]) == (
        "class_names[1] None is not a non-empty name (class_names is not a list of distinct "
        "non-empty names)")
    assert _refused_by_meta(check_class_names, ["a", "b", "a"]) == (
        "class_names holds 'a' twice (class_names is not a list of distinct non-empty names)")
    assert _refused_by_meta(check_class_names, ["x"] * 100_001) == (
        f"class_names holds 100,001 names, over {MODEL_LIMITS['n_classes'][1]:,}")
    check_class_count(["a", "b"], 2, "a classifier of", ValueError)
    assert _refused_by_meta(check_class_count, ["a", "b"], 3, "a graph whose logits output has") \
        == "class_names: 2 class names for a graph whose logits output has 3 classes"


def test_rows_and_segment_frames_of_an_onnx_model():
    import numpy as np

    from deepfusion.models.meta import check_description, check_rows, check_segment_frames

    described = check_description(_described(), ValueError)
    rows = dict(described.rows)
    got = check_rows({k: np.int64(v) for k, v in reversed(rows.items())}, described, ValueError)
    assert got == rows and all(type(v) is int for v in got.values()) and list(check_rows(rows, described, ValueError)) == list(described.keys)
    want = ", ".join(f"'{k}': {v}" for k, v in rows.items())
    for forged in ([128], {**rows, "mfcc": 13}, {**rows, "mfcc": "20"}, {**rows, "mfcc": 20.0},
                   {**rows, "extra": 1},
                   {k: v for k, v in rows.items() if k != "chroma"}):
        said = _refused_by_meta(check_rows, forged, described)
        assert said.startswith("rows ") and said.endswith(
            f" are not the rows its feature_config makes ({{{want}}})"), said
    frames = described.feature_config.n_frames
    assert check_segment_frames(1, described, ValueError) == 1
    assert check_segment_frames(frames, described, ValueError) == frames
    for forged in (0, frames + 1, 2.0, True, "9"):
        assert _refused_by_meta(check_segment_frames, forged, described) == (
            f"segment_frames {forged!r} is not a whole number in [1, {frames}] (the frames of a "
            "clip)")


def test_normalization_statistics_hold_each_view_with_its_rows():
    import numpy as np

    from deepfusion.models.meta import check_description, check_normalization

    described = check_description(_described(), ValueError)
    good = {k: {"mean": np.zeros(r), "std": np.ones(r)} for k, r in described.rows.items()}
    check_normalization(good, described, ValueError)
    views = ", ".join(described.keys)
    for forged in (None, {k: v for k, v in good.items() if k != "mfcc"}, {**good, "extra": {}}):
        assert _refused_by_meta(check_normalization, forged, described) == (
            f"normalization does not hold the model's views ({views})")
    for stats, stat in (([0.0] * 20, "mean"), ({"mean": np.zeros(20)}, "std"),
                        ({"mean": np.zeros(19), "std": np.ones(20)}, "mean"),
                        ({"mean": np.zeros(20), "std": np.ones((20, 1))}, "std")):
        assert _refused_by_meta(check_normalization, {**good, "mfcc": stats}, described) == (
            f"normalization mfcc {stat} is not a vector of 20 values")


def test_cut_and_show_keep_a_forged_value_on_one_short_line():
    from deepfusion.models.meta import cut, show

    assert cut("a\n b\t c") == "a b c"
    assert cut("x" * 60) == "x" * 60 and cut("x" * 61) == "x" * 57 + "..."
    assert cut("abcdef", 5) == "ab..." and show("abcdef", 7) == "'abc..."
    assert show([1, 2]) == "[1, 2]"
    huge = 10 ** 5000                       # repr refuses: more digits than Python prints
    assert show(huge) == "<int>"


def test_a_checkpoint_path_is_refused_when_no_file_is_there(tmp_path):
    from deepfusion.errors import CheckpointError
    from deepfusion.models.meta import check_checkpoint_path

    with pytest.raises(CheckpointError) as info:
        check_checkpoint_path(tmp_path)
    assert str(info.value) == f"{tmp_path}: a folder, not a checkpoint; give its best.pth or last.pth"
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_path(str(tmp_path / "best.pth"))
    assert str(info.value) == (f"{tmp_path / 'best.pth'}: checkpoint not found; run deepfusion "
                               "train, or give --checkpoint")
    (tmp_path / "best.pth").write_bytes(b"")
    check_checkpoint_path(str(tmp_path / "best.pth"))
