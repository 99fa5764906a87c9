"""The one output rule (:func:`deepfusion.io.guard.check_destinations`), for every command that
writes a file the user names: an output never replaces a file the run reads (however it is
spelt: ``./x``, a symbolic link, a hard link), and replaces an existing file only when it is of
the kind the command writes there, or with ``--overwrite``. Through the real commands."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from deepfusion.testing import invoke, one_error_line

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX links")

LIGHT = ("--backbone", "light", "--no-pretrained", "--epochs", "1", "--batch-size", "8",
         "--val-size", "0.2", "--test-size", "0.2", "--quiet")
SPREADSHEET = "name,amount\nrent,1200\n"


@pytest.fixture()
def work(tmp_path, trained_model_dir, tiny_audio, tiny_features, monkeypatch):
    """A model folder with a copy of the trained checkpoint, a clip to classify, a features
    file, all in ``tmp_path`` (the working folder, for relative spellings)."""
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(trained_model_dir / "best.pth", model / "best.pth")
    clip = tmp_path / "song.wav"
    shutil.copy(next(tiny_audio.rglob("*.wav")), clip)
    features = tmp_path / "features.pkl"
    shutil.copy(tiny_features, features)
    return {"ckpt": model / "best.pth", "clip": clip, "features": features, "audio": tiny_audio,
            "tmp": tmp_path}


def _command(name: str, w: dict, dest: Path) -> tuple:
    """``deepfusion NAME`` writing to ``dest`` (a file, or the folder of the reports)."""
    cache = ("--cache-dir", w["tmp"] / "cache", "--quiet", "--jobs", "1")
    return {
        "predict": ("predict", w["clip"], "--checkpoint", w["ckpt"], "--out", dest, *cache),
        "embed": ("embed", w["clip"], "--checkpoint", w["ckpt"], "--out", dest, *cache),
        "export": ("export", "--checkpoint", w["ckpt"], "--out", dest),
        "extract": ("extract", "--audio-dir", w["audio"], "--out", dest, "--duration", "6", *cache),
    }[name]


def _spellings(target: Path, tmp: Path) -> list[Path]:
    """``target`` as given, relative with ``./``, through a symbolic and a hard link."""
    sym, hard = tmp / f"sym-{target.name}", tmp / f"hard-{target.name}"
    sym.symlink_to(target)
    os.link(target, hard)
    return [target, Path(".") / target.relative_to(tmp), sym, hard]


@pytest.mark.parametrize("name, read", [("predict", "ckpt"), ("predict", "clip"),
                                        ("embed", "ckpt"), ("embed", "clip"),
                                        ("export", "ckpt")])
def test_an_output_never_replaces_what_the_run_reads(work, name, read):
    target = work[read]
    before = target.read_bytes()
    for dest in _spellings(target, work["tmp"]):
        for extra in ((), ("--overwrite",)):        # --overwrite never reaches an input
            result = invoke(*_command(name, work, dest), *extra)
            line = one_error_line(result.stderr)
            assert result.exit_code == 1 and "which this command reads" in line, (dest, line)
            assert str(dest) in line
            assert target.read_bytes() == before, f"{name} --out {dest} changed {target}"


def test_extract_out_never_replaces_an_audio_file_however_spelt(work):
    clip = next(work["audio"].rglob("*.wav"))
    local = work["tmp"] / "audio"
    shutil.copytree(work["audio"], local)
    work["audio"] = local
    clip = local / clip.relative_to(clip.parents[1])
    before = clip.read_bytes()
    for dest in _spellings(clip, work["tmp"]):
        result = invoke(*_command("extract", work, dest), "--overwrite")
        assert "which this command reads" in one_error_line(result.stderr), dest
        assert clip.read_bytes() == before


def _foreign_files(w: dict) -> dict[str, Path]:
    """Files nobody wants replaced by a command's output, none of them read by the run."""
    other = w["tmp"] / "other"
    other.mkdir(exist_ok=True)
    sheet = other / "budget.csv"
    sheet.write_text(SPREADSHEET)
    wav = other / "keep.wav"
    shutil.copy(w["clip"], wav)
    pickle = other / "their.pkl"
    shutil.copy(w["features"], pickle)
    ckpt = other / "model.pth"
    shutil.copy(w["ckpt"], ckpt)
    return {"a spreadsheet": sheet, "an audio file": wav, "a features pickle": pickle,
            "a checkpoint": ckpt}


#: What each command writes, as its refusal names it.
KIND = {"predict": "a predictions CSV", "embed": "an embeddings .npz",
        "export": "an ONNX model exported by deepfusion", "extract": "a features pickle"}


@pytest.mark.parametrize("name", ["predict", "embed",
                                  pytest.param("export", marks=pytest.mark.slow),
                                  pytest.param("extract", marks=pytest.mark.slow)])
def test_a_file_of_another_kind_needs_overwrite(work, name):
    foreign = _foreign_files(work)
    for what, path in foreign.items():
        if name == "extract" and what == "a features pickle":
            continue                                    # its own kind: replaced (below)
        if name == "export" and what != "a spreadsheet":
            continue                                    # one case each is enough for export
        before = path.read_bytes()
        result = invoke(*_command(name, work, path))
        line = one_error_line(result.stderr)
        assert result.exit_code == 1, line
        assert (f"{path} exists and is not {KIND[name]}; give --overwrite to replace it, or "
                "another --out") in line, line
        assert path.read_bytes() == before, f"{name} replaced {what}"
    victim = foreign["a spreadsheet"]
    result = invoke(*_command(name, work, victim), "--overwrite")
    assert result.exit_code == 0, result.output
    assert victim.read_text(errors="replace") != SPREADSHEET


@pytest.mark.slow
@pytest.mark.parametrize("name", ["predict", "embed", "extract"])
def test_its_own_kind_is_replaced_and_an_empty_file_too(work, name):
    out = work["tmp"] / f"out-{name}"
    assert invoke(*_command(name, work, out)).exit_code == 0
    first = out.read_bytes()
    again = invoke(*_command(name, work, out))
    assert again.exit_code == 0, again.output
    assert out.read_bytes() == first
    empty = work["tmp"] / f"empty-{name}"
    empty.touch()
    assert invoke(*_command(name, work, empty)).exit_code == 0
    assert empty.stat().st_size > 0


@pytest.mark.slow
def test_evaluate_reports_never_replace_other_files(work):
    folder = work["ckpt"].parent
    (folder / "predictions.csv").write_text(SPREADSHEET)
    result = invoke("evaluate", "--checkpoint", work["ckpt"])
    line = one_error_line(result.stderr)
    assert "predictions.csv" in line and "is not evaluate's predictions" in line and "--overwrite" in line
    assert (folder / "predictions.csv").read_text() == SPREADSHEET
    assert not (folder / "evaluation.json").exists()      # refused before anything was written
    assert invoke("evaluate", "--checkpoint", work["ckpt"], "--overwrite").exit_code == 0
    assert (folder / "predictions.csv").read_text().startswith("path,true_genre")
    # its own reports: replaced by the next evaluate without a flag
    again = invoke("evaluate", "--checkpoint", work["ckpt"])
    assert again.exit_code == 0, again.output
    # --out-dir onto the checkpoint's own name: an input, whatever the flag
    linked = work["tmp"] / "reports"
    linked.mkdir()
    os.link(work["ckpt"], linked / "attention.png")
    result = invoke("evaluate", "--checkpoint", work["ckpt"], "--out-dir", linked, "--overwrite")
    assert "which this command reads" in one_error_line(result.stderr)


@pytest.mark.slow
def test_train_refuses_other_files_in_its_folder_and_keeps_init_from(work, tiny_features):
    folder = work["tmp"] / "fresh"
    folder.mkdir()
    (folder / "training_history.csv").write_text(SPREADSHEET)
    result = invoke("train", "--features", tiny_features, "--model-dir", folder, *LIGHT)
    line = one_error_line(result.stderr)
    assert "training_history.csv exists and is not a training history" in line
    assert "--overwrite" in line and not (folder / "best.pth").exists()
    assert invoke("train", "--features", tiny_features, "--model-dir", folder, *LIGHT,
                  "--overwrite").exit_code == 0

    # --overwrite --init-from the run's own best.pth: read before the run is replaced
    model = work["ckpt"].parent
    import torch

    source = torch.load(work["ckpt"], weights_only=True)
    result = invoke("train", "--features", tiny_features, "--model-dir", model, *LIGHT,
                    "--overwrite", "--init-from", model / "best.pth")
    assert result.exit_code == 0, result.output
    new = torch.load(model / "best.pth", weights_only=True)
    assert new["train_config"]["init_from"] == str(model / "best.pth")
    assert not torch.equal(new["model_state"]["classifier.weight"],
                           source["model_state"]["classifier.weight"]) or new["epoch"] >= 1
    # without --overwrite the folder's run is refused, and the source kept
    again = invoke("train", "--features", tiny_features, "--model-dir", model, *LIGHT,
                   "--init-from", model / "best.pth")
    assert "holds a run" in one_error_line(again.stderr)
    assert (model / "best.pth").exists()


def test_synth_never_replaces_a_real_collection(work):
    real = work["tmp"] / "gtzan"
    (real / "techno").mkdir(parents=True)
    mine = real / "techno" / "techno.00000.wav"     # synth's first genre, a real recording
    import soundfile as sf

    sf.write(mine, np.sin(np.arange(22050) * 0.05).astype(np.float32), 22050)
    before = mine.read_bytes()
    result = invoke("synth", "--out", real, "--genres", "1", "--clips-per-genre", "2",
                    "--duration", "1")
    line = one_error_line(result.stderr)
    assert f"{mine}: synth would replace this file" in line and "--overwrite" in line
    assert mine.read_bytes() == before and not (real / "techno" / "techno.00001.wav").exists()
    # its own folder: written again without a flag
    own = work["tmp"] / "synth"
    args = ("synth", "--out", own, "--genres", "1", "--clips-per-genre", "2", "--duration", "1")
    assert invoke(*args).exit_code == 0
    assert invoke(*args, "--seed", "3").exit_code == 0
    assert invoke("synth", "--out", real, "--genres", "1", "--clips-per-genre", "2",
                  "--duration", "1", "--overwrite").exit_code == 0
    assert mine.read_bytes() != before


def test_the_kinds_recognise_what_deepfusion_writes(work):
    from deepfusion.io.guard import KINDS

    out = work["tmp"]
    assert invoke(*_command("predict", work, out / "p.csv")).exit_code == 0
    assert invoke(*_command("embed", work, out / "e.npz")).exit_code == 0
    assert KINDS["predictions"].test(out / "p.csv")
    assert KINDS["embeddings"].test(out / "e.npz")
    assert KINDS["checkpoint"].test(work["ckpt"])
    assert KINDS["features"].test(work["features"])
    for kind in ("predictions", "embeddings", "checkpoint", "onnx", "evaluation", "figure"):
        assert not KINDS[kind].test(work["clip"]), kind
    np.savez(out / "plain.npz", x=np.zeros(2))
    assert not KINDS["embeddings"].test(out / "plain.npz")


@pytest.mark.slow
def test_cross_validation_tables_never_replace_other_files(work, tiny_features):
    folder = work["tmp"] / "cv"
    folder.mkdir()
    (folder / "cross_validation.csv").write_text(SPREADSHEET)
    args = ("train", "--features", tiny_features, "--model-dir", folder, "--folds", "2", *LIGHT)
    line = one_error_line(invoke(*args).stderr)
    assert "cross_validation.csv exists and is not a cross-validation table" in line
    assert "--overwrite" in line and (folder / "cross_validation.csv").read_text() == SPREADSHEET
    assert not (folder / "fold-1").exists()
    features = folder / "cross_validation_predictions.csv"        # an input where it writes
    shutil.copy(tiny_features, features)
    result = invoke("train", "--features", features, "--model-dir", folder, "--folds", "2",
                    *LIGHT, "--overwrite")
    assert "which this command reads" in one_error_line(result.stderr)


@pytest.mark.slow
def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(work, tiny_features):
    model = work["ckpt"].parent
    (model / "training_history.csv").write_text("epoch,train_loss\n1,0.5\n")
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    # fails after the claim, before any epoch: a split file that names no clip
    split = work["tmp"] / "split.csv"
    split.write_text("path,split\nnowhere.wav,train\n")
    result = invoke("train", "--features", tiny_features, "--model-dir", model, *LIGHT,
                    "--overwrite", "--split-file", split)
    assert result.exit_code != 0
    one_error_line(result.stderr)
    after = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if not k.startswith(".")} == before
    assert not (model / ".replaced-run").exists()
    # a kill -9 before the first checkpoint: the next claim puts the old run back
    from deepfusion.io.run_folder import ASIDE, claim_run_folder

    aside = model / ASIDE
    aside.mkdir()
    for name in ("best.pth", "training_history.csv"):
        (model / name).rename(aside / name)
    (model / "training_history.png").write_bytes(b"\x89PNG\r\n\x1a\n")   # the dead run's
    with claim_run_folder(model, resume=True, overwrite=False):
        pass
    assert (model / "best.pth").read_bytes() == before["best.pth"]
    assert not aside.exists() and not (model / "training_history.png").exists()
    # a replacement that succeeds leaves nothing set aside
    ok = invoke("train", "--features", tiny_features, "--model-dir", model, *LIGHT, "--overwrite")
    assert ok.exit_code == 0, ok.output
    assert not aside.exists() and (model / "best.pth").read_bytes() != before["best.pth"]


# --------------------------------------------- the rule itself (deepfusion.io.guard, no command)
#
# Fast: what check_destinations, check_outputs, the kind sniffers and check_free_space decide,
# and the exact words they say it in (issue 23: these are the tests the module's mutants meet).

def _refused_by_guard(call, *args, **kwargs) -> str:
    from deepfusion.errors import OutputError

    with pytest.raises(OutputError) as info:
        call(*args, **kwargs)
    return str(info.value)


def test_an_input_is_found_however_the_output_spells_it(tmp_path):
    from deepfusion.io.guard import check_outputs, same_file

    features = tmp_path / "features.pkl"
    features.write_bytes(b"\x80")
    link, hard = tmp_path / "link.pkl", tmp_path / "hard.pkl"
    link.symlink_to(features)
    os.link(features, hard)
    inputs = {None: "nothing", tmp_path / "absent.pkl": "the absent file", features: "the features file"}
    for out in (features, tmp_path / "sub" / ".." / "features.pkl", link, hard):
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert same_file(out, features) and same_file(features, out)
        assert _refused_by_guard(check_outputs, {out: "--out"}, inputs) == (
            f"{out}: --out is the features file, which this command reads; give another --out")
        assert _refused_by_guard(check_outputs, {out: "best.pth"}, inputs, option="--model-dir") \
            == f"{out} is the features file, which this command reads; give another --model-dir"
        assert _refused_by_guard(check_outputs, {out: "best.pth"}, inputs) == (
            f"{out} is the features file, which this command reads; write somewhere else")
    other = tmp_path / "other.pkl"
    other.write_bytes(b"\x80")
    check_outputs({other: "--out", tmp_path / "new.pkl": "--out"}, inputs)
    assert not same_file(other, features) and not same_file(tmp_path / "a", tmp_path / "b")
    # a hard link found among several inputs, the message naming the right one
    assert _refused_by_guard(check_outputs, {hard: "--out"}, {other: "the manifest", link: "the link"}) \
        .endswith("--out is the link, which this command reads; give another --out")


def _kind_files(tmp_path) -> dict:
    """name -> (path, whether the kind of that name recognises it)."""
    import json
    import zipfile

    files = {}

    def put(name, data, *, ok):
        path = tmp_path / f"{len(files)}-{name}"
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        files[len(files)] = (name, path, ok)

    put("predictions", "path,genre,probability\na.wav,rock,0.9\n", ok=True)
    put("predictions", "\ufeffpath,genre,probability\n", ok=True)           # a byte order mark
    put("predictions", "path,genre\n", ok=False)
    put("predictions", "x\npath,genre,probability\n", ok=False)             # not the header
    put("history_csv", "epoch,train_loss,val_loss\n", ok=True)
    put("class_report", "\ufeffgenre,precision,recall\n", ok=True)
    put("figure", b"\x89PNG\r\n\x1a\n" + bytes(20), ok=True)
    put("figure", b"\x89PNG\r\n\x1a", ok=False)
    put("features", b"\x80\x05.", ok=True)
    put("features", b"(lp0\n.", ok=False)                                  # protocol 0
    put("evaluation", json.dumps({"split": "test", "metrics": {}, "n": 3}), ok=True)
    put("evaluation", json.dumps({"split": "test"}), ok=False)
    put("evaluation", json.dumps([["split", "metrics"]]), ok=False)
    put("evaluation", "{split: test}", ok=False)
    put("evaluation", b'{"split": "\xff", "metrics": 1}', ok=False)         # not UTF-8
    for name, members, ok in (("checkpoint", ["best/data.pkl", "best/version"], True),
                              ("checkpoint", ["data.pkl"], False),
                              ("embeddings", ["paths.npy", "embeddings.npy", "x.npy"], True),
                              ("embeddings", ["embeddings.npy"], False)):
        path = tmp_path / f"{len(files)}-{name}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for member in members:
                zf.writestr(member, b"x")
        files[len(files)] = (name, path, ok)
    put("checkpoint", b"PK\x03\x04 but no zip", ok=False)
    put("onnx", b"\x08\x07" + b"graph" * 10 + b"deepfusion", ok=True)
    put("onnx", b"\x12deepfusion", ok=False)
    return files


def test_each_kind_recognises_its_own_files_only(tmp_path):
    from deepfusion.io.guard import KINDS

    for name, path, ok in _kind_files(tmp_path).values():
        assert KINDS[name].test(path) is ok, (name, path.read_bytes()[:40])


def test_the_sniffers_read_only_so_much(tmp_path):
    """A JSON report over 64 MiB is not ours (not parsed); an ONNX model is ours when its last
    4 MiB name deepfusion (its metadata is serialised after the graph)."""
    from deepfusion.io.guard import KINDS

    report = b'{"split": "test", "metrics": {}}'
    path = tmp_path / "evaluation.json"
    path.write_bytes(report + b" " * (64 * 2**20 - len(report)))
    assert KINDS["evaluation"].test(path)
    with open(path, "ab") as fh:
        fh.write(b" ")
    assert not KINDS["evaluation"].test(path)
    window = 4 * 2**20
    for start, ok in ((0, False), (1, True), (100, True)):   # where the window's first byte is
        model = tmp_path / f"model{start}.onnx"
        with open(model, "wb") as fh:
            fh.write(b"\x08")
            fh.seek(100 + start)
            fh.write(b"deepfusion")
            fh.truncate(100 + window + 1)
        assert KINDS["onnx"].test(model) is ok, start


def test_destinations_of_another_kind_need_overwrite(tmp_path):
    from deepfusion.io.guard import Destination, check_destinations

    sheet = tmp_path / "budget.csv"
    sheet.write_text(SPREADSHEET)
    out = Destination(sheet, "--out", "predictions")
    assert _refused_by_guard(check_destinations, [out], {}) == (
        f"{sheet} exists and is not a predictions CSV; give --overwrite to replace it, or "
        "another --out")
    named = Destination(sheet, "history.csv", "history_csv")
    assert _refused_by_guard(check_destinations, [named], {}, option="--model-dir") == (
        f"{sheet} exists and is not a training history; give --overwrite to replace it, or "
        "another --model-dir")
    assert _refused_by_guard(check_destinations, [named], {}).endswith(
        "give --overwrite to replace it, or write somewhere else")
    assert _refused_by_guard(check_destinations, [named], {}, how="give --force") == (
        f"{sheet} exists and is not a training history; give --force")
    check_destinations([out], {}, overwrite=True)
    (tmp_path / "empty.csv").write_bytes(b"")
    own = tmp_path / "own.csv"
    own.write_text("path,genre,probability\n")
    check_destinations([Destination(tmp_path / "empty.csv", "--out", "predictions"),
                        Destination(tmp_path / "new.csv", "--out", "predictions"),
                        Destination(own, "--out", "predictions")], {})


def test_destinations_that_are_folders_or_inputs(tmp_path, monkeypatch):
    from deepfusion.io import guard
    from deepfusion.io.guard import Destination, check_destinations

    folder = tmp_path / "run"
    folder.mkdir()
    assert _refused_by_guard(check_destinations, [Destination(folder, "--out", "predictions")], {}) \
        == f"{folder}: --out is a folder; give a file name"
    dest = Destination(folder, "best.pth", "checkpoint")
    assert _refused_by_guard(check_destinations, [dest], {}, option="--model-dir") == (
        f"{folder} is a folder, where this command writes a file; give another --model-dir")
    assert _refused_by_guard(check_destinations, [dest], {}, overwrite=True).endswith(
        "is a folder, where this command writes a file; remove it")
    source = tmp_path / "init.csv"
    source.write_text(SPREADSHEET)
    inputs = {source: "the --init-from checkpoint", None: "nothing"}
    dest = Destination(source, "--out", "checkpoint")
    assert "which this command reads" in _refused_by_guard(
        check_destinations, [dest], inputs, overwrite=True)
    # read whole before anything is written: it may be replaced, whatever its kind
    check_destinations([dest], inputs, loaded_first=[str(source)])
    link = tmp_path / "link.csv"
    link.symlink_to(source)
    check_destinations([Destination(link, "--out", "checkpoint")], inputs, loaded_first=[source])
    # a destination the sniffer cannot read is left to the writer, which will say why

    def unreadable(path):
        raise PermissionError(path)
    monkeypatch.setitem(guard.KINDS, "locked", guard.Kind("a locked kind", unreadable))
    check_destinations([Destination(source, "--out", "locked")], {})


def test_inputs_that_are_not_regular_files_are_named(tmp_path):
    import socket

    from deepfusion.errors import FeaturesFileError
    from deepfusion.io.guard import audio_inputs, require_regular_file

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert _refused_by_guard(require_regular_file, fifo, what="the --manifest") == (
        f"{fifo}: the --manifest is a FIFO (named pipe); give a regular file")
    with pytest.raises(FeaturesFileError, match="features file is a device; give a regular file"):
        require_regular_file(Path("/dev/null"), what="the features file", error=FeaturesFileError)
    sock = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(sock))
        assert _refused_by_guard(require_regular_file, sock, what="x").endswith("x is a socket; "
                                                                                "give a regular file")
    (tmp_path / "f").write_text("x")
    for fine in (tmp_path / "f", tmp_path, tmp_path / "absent"):
        require_regular_file(fine, what="x")
    assert audio_inputs(["a.wav", Path("b.wav")]) == {Path("a.wav"): "an audio file",
                                                      Path("b.wav"): "an audio file"}


def test_free_space_counts_what_is_replaced(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    from deepfusion.io.guard import check_free_space

    usage = namedtuple("usage", "total used free")
    asked = []

    def disk_usage(path):
        asked.append(Path(path))
        return usage(0, 0, 100 * 2**20)
    monkeypatch.setattr(shutil_module, "disk_usage", disk_usage)
    old = tmp_path / "old.pkl"
    old.write_bytes(bytes(2**20))
    check_free_space(tmp_path, 100 * 2**20, "the features")
    check_free_space(tmp_path / "new" / "deeper", 101 * 2**20, "the features", replaced=[old])
    assert asked[-1] == tmp_path                 # the nearest folder that exists
    assert _refused_by_guard(check_free_space, tmp_path / "new", 150 * 2**20, "the features",
                             replaced=[str(old), tmp_path, tmp_path / "absent"]) == (
        f"{tmp_path / 'new'}: 100 MB free, the features need about 149 MB more; free some space "
        "or choose another folder")
    assert "100 MB free, x need about 100 MB more" in _refused_by_guard(
        check_free_space, tmp_path, 100 * 2**20 + 1, "x")

    def cannot_say(path):
        raise OSError("no statfs here")
    monkeypatch.setattr(shutil_module, "disk_usage", cannot_say)
    check_free_space(tmp_path, 2**60, "x")


def test_the_sniffer_factories_on_files_of_each_kind(tmp_path):
    """_csv, _zip_holding and _json_object make the sniffers of KINDS (once, on import): the
    sniffers they make now judge the same files alike."""
    from deepfusion.io import guard

    fresh = {"predictions": guard._csv("path,genre,probability"), "history_csv": guard._csv("epoch,"),
             "class_report": guard._csv("genre,precision"),
             "evaluation": guard._json_object("split", "metrics"),
             "checkpoint": guard._zip_holding(lambda names: any(n.endswith("/data.pkl") for n in names)),
             "embeddings": guard._zip_holding(lambda names: {"paths.npy", "embeddings.npy"} <= set(names))}
    seen = set()
    for name, path, ok in _kind_files(tmp_path).values():
        if name in fresh:
            assert fresh[name](path) is ok, (name, path.read_bytes()[:40])
            seen.add(name)
    assert seen == set(fresh)
    big = tmp_path / "big.json"
    big.write_bytes(b'{"split": 1, "metrics": 2}' + b" " * (64 * 2**20))
    assert not fresh["evaluation"](big)


def test_each_destination_is_checked_after_one_that_may_be_replaced(tmp_path, monkeypatch):
    from deepfusion.io import guard
    from deepfusion.io.guard import Destination, check_destinations

    sheet = tmp_path / "budget.csv"
    sheet.write_text(SPREADSHEET)
    empty, loaded = tmp_path / "empty.csv", tmp_path / "init.pth"
    empty.write_bytes(b"")
    loaded.write_text(SPREADSHEET)

    def unreadable(path):
        raise PermissionError(path)
    monkeypatch.setitem(guard.KINDS, "locked", guard.Kind("a locked kind", unreadable))
    for first in (Destination(empty, "--out", "predictions"), Destination(loaded, "--init", "checkpoint"),
                  Destination(sheet, "--out", "locked")):
        said = _refused_by_guard(check_destinations, [first, Destination(sheet, "--log", "history_csv")],
                                 {loaded: "the --init-from checkpoint"}, loaded_first=[loaded])
        assert said.startswith(f"{sheet} exists and is not a training history"), (first, said)


def test_an_input_not_yet_there_and_one_file_under_two_names(tmp_path):
    from deepfusion.io.guard import Destination, check_destinations, check_outputs

    absent = tmp_path / "later.csv"
    (tmp_path / "sub").mkdir()
    assert _refused_by_guard(check_outputs, {tmp_path / "sub" / ".." / "later.csv": "--out"},
                             {absent: "the --manifest"}).endswith(
        "--out is the --manifest, which this command reads; give another --out")
    features = tmp_path / "features.pkl"
    features.write_bytes(b"\x80")
    hard = tmp_path / "hard.pkl"
    os.link(features, hard)
    inputs = {features: "the features file", hard: "the hard link"}
    assert _refused_by_guard(check_outputs, {features: "--out"}, inputs) == (
        f"{features}: --out is the features file, which this command reads; give another --out")
    assert _refused_by_guard(check_destinations, [Destination(features, "best.pth", "checkpoint")],
                             inputs, option="--model-dir").endswith("give another --model-dir")


def test_a_block_device_is_named_a_device(tmp_path):
    import stat

    from deepfusion.io.guard import require_regular_file

    node = tmp_path / "disk"
    try:
        os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"no device node here: {exc}")
    assert _refused_by_guard(require_regular_file, node, what="the --out").endswith(
        "the --out is a device; give a regular file")
