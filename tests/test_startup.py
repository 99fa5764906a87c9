"""Fast to start, fast for one file (issue 22, section 3): a model file is hashed once, and
each command imports only what the path it takes needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepfusion.io import model_ids as memo
from deepfusion.io.model_ids import ModelIds, model_id

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def hashes(monkeypatch) -> list[Path]:
    """The files whose bytes :func:`deepfusion.io.model_ids.model_id` reads (every call recorded)."""
    seen: list[Path] = []
    real = memo.file_digest

    def counted(path):
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(memo, "file_digest", counted)
    return seen


def _model(path: Path, data: bytes = b"weights " * 1000) -> Path:
    path.write_bytes(data)
    return path


def test_a_model_file_is_hashed_once(tmp_path, hashes):
    model = _model(tmp_path / "best.pth")
    cache = tmp_path / "cache"
    full = model_id(model, "torch", "cpu", "fp32")        # no id file: hashed every time
    assert len(hashes) == 1
    ids = ModelIds(cache)
    assert model_id(model, "torch", "cpu", "fp32", ids=ids) == full
    assert len(hashes) == 2 and not (cache / ModelIds.NAME).exists()    # nothing until save
    ids.save()
    assert (cache / ModelIds.NAME).is_file()
    # the next run (a new process reads the file): the same id, the bytes not read
    again = ModelIds(cache)
    assert model_id(model, "torch", "cpu", "fp32", ids=again) == full
    assert model_id(model, "onnx", "CPUExecutionProvider", ids=again).startswith(full[:32])
    assert len(hashes) == 2
    again.save()       # nothing new: the file is not written again
    assert json.loads((cache / ModelIds.NAME).read_text())["ids"] == again._known


def test_a_model_changed_in_place_is_hashed_again(tmp_path, hashes):
    model = _model(tmp_path / "best.pth")
    cache = tmp_path / "cache"
    ids = ModelIds(cache)
    first = model_id(model, "torch", ids=ids)
    ids.save()
    st = os.stat(model)
    # other bytes of the same size, the modification time set back: the change time moved
    with open(model, "r+b") as fh:
        fh.write(b"W")
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    ids = ModelIds(cache)
    second = model_id(model, "torch", ids=ids)
    assert second != first and len(hashes) == 2
    # a new size, a new file under the old name (another inode)
    _model(tmp_path / "other.pth", b"other " * 10).replace(model)
    third = model_id(model, "torch", ids=ids)
    assert third not in (first, second) and len(hashes) == 3
    ids.save()
    assert len(json.loads((cache / ModelIds.NAME).read_text())["ids"]) == 3


def test_a_model_changed_while_loaded_has_no_identity(tmp_path, hashes):
    model = _model(tmp_path / "best.pth")
    ids = ModelIds(tmp_path / "cache")
    model_id(model, ids=ids)
    ids.save()
    stamp = memo.file_stamp(model)
    _model(tmp_path / "new.pth", b"new").replace(model)       # replaced after it was loaded
    assert model_id(model, "torch", stamp=stamp, ids=ModelIds(tmp_path / "cache")) is None


@pytest.mark.parametrize("damage", [b"{\"ids\": {\"1:2\": ", b"\x00\xff garbage", b"[1, 2]",
                                    b'{"ids": {"1:2:3": "not a digest"}}', b"{" + b" " * 70000])
def test_a_damaged_id_file_is_ignored_and_rewritten(tmp_path, hashes, damage):
    model = _model(tmp_path / "best.pth")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ModelIds.NAME).write_bytes(damage)
    ids = ModelIds(cache)
    assert model_id(model, ids=ids) == model_id(model)
    ids.save()
    data = json.loads((cache / ModelIds.NAME).read_text())
    assert list(data["ids"].values()) == [memo.file_digest(model)]
    hashes.clear()
    model_id(model, ids=ModelIds(cache))
    assert hashes == []


def test_a_forged_entry_cannot_name_another_file(tmp_path, hashes):
    """An entry is found by the file's whole stamp (device, inode, size, both times): an entry
    for other numbers is never used for this file."""
    model = _model(tmp_path / "best.pth")
    cache = tmp_path / "cache"
    cache.mkdir()
    dev, ino, size, mtime, ctime = memo.file_stamp(model)
    forged = {f"{dev}:{ino}:{size}:{mtime}:{ctime + 1}": "0" * 64,
              f"{dev}:{ino}:{size + 1}:{mtime}:{ctime}": "1" * 64}
    (cache / ModelIds.NAME).write_text(json.dumps({"format": 1, "ids": forged}))
    assert model_id(model, ids=ModelIds(cache)) == model_id(model)
    assert len(hashes) == 2


def test_the_id_file_is_bounded_and_keeps_the_newest(tmp_path, monkeypatch):
    monkeypatch.setattr(ModelIds, "LIMIT", 3)
    cache = tmp_path / "cache"
    for i in range(5):
        ids = ModelIds(cache)
        model_id(_model(tmp_path / f"m{i}.pth", bytes([i]) * 10), ids=ids)
        ids.save()
    kept = ModelIds(cache)._known
    assert len(kept) == 3
    assert all(kept.get(ModelIds._key(memo.file_stamp(tmp_path / f"m{i}.pth"))) for i in (2, 3, 4))


def test_an_id_file_that_cannot_be_written_costs_only_a_hash(tmp_path):
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache folder would be")
    ids = ModelIds(cache)
    assert model_id(_model(tmp_path / "best.pth"), ids=ids) is not None
    ids.save()          # no error: the next run hashes again
    assert cache.read_text().startswith("a file")


def test_predict_writes_the_id_file_only_once_it_starts(tiny_audio, trained_model_dir, tmp_path,
                                                        hashes):
    """The Library hashes a checkpoint once, and builds no network when every output is
    kept; a run refused before it starts writes nothing."""
    from deepfusion.errors import OutputError
    from deepfusion.inference.library import Library, Prediction

    checkpoint = trained_model_dir / "best.pth"
    cache = tmp_path / "cache"
    files = sorted(tiny_audio.rglob("*.wav"))[:2]
    for run in range(2):
        lib = Library(files, checkpoints=[checkpoint], cache_dir=cache)
        assert all(isinstance(r, Prediction) for r in lib.run(jobs=1))
        # the network is built only when a window goes through it: not when all is kept
        assert (lib.engines[0]._trained_model is None) == (run == 1)
    assert hashes.count(checkpoint) == 1
    blocked = tmp_path / "blocked"
    blocked.write_text("a file")
    with pytest.raises(OutputError):
        Library(files, checkpoints=[checkpoint], cache_dir=blocked / "cache")
    assert blocked.read_text() == "a file"


# ------------------------------------------------------------ what each path imports

#: Runs the command of argv[1:] in this process, then prints the heavy modules it imported.
IMPORTED = """
import sys
from deepfusion.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    heavy = ("torch", "librosa", "scipy.signal", "numba", "joblib", "onnxruntime", "pandas",
             "torchvision")
    print("imported:", ",".join(m for m in heavy if m in sys.modules), file=sys.stderr)
"""


def imported(*args, env=None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """A deepfusion command run in a fresh process, and the heavy modules it imported."""
    from deepfusion.testing import subprocess_env

    proc = subprocess.run([sys.executable, "-c", IMPORTED, *map(str, args)],
                          env=subprocess_env(**(env or {})), capture_output=True, text=True,
                          timeout=300)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("imported:")][-1]
    return proc, set(filter(None, line.split(":", 1)[1].strip().split(",")))


@pytest.fixture(scope="module")
def cached_clip(tiny_audio, trained_model_dir, tmp_path_factory):
    """One clip whose features, and the light model's outputs for it, are in a cache; the
    model exported to ONNX, its outputs kept too. Returns (clip, checkpoint, onnx, cache)."""
    from deepfusion.export import export_onnx
    from deepfusion.inference.library import Library, Prediction

    work = tmp_path_factory.mktemp("startup")
    clip = sorted(tiny_audio.rglob("*.wav"))[0]
    checkpoint = trained_model_dir / "best.pth"
    onnx = work / "model.onnx"
    export_onnx(checkpoint, onnx, echo=lambda s: None)
    for model, engine in ((checkpoint, "torch"), (onnx, "onnx")):
        lib = Library([clip], checkpoints=[model], engine=engine, cache_dir=work / "cache")
        assert all(isinstance(r, Prediction) for r in lib.run(jobs=1))
    return clip, checkpoint, onnx, work / "cache"


def test_extract_of_a_cached_clip_imports_no_torch_nor_librosa(cached_clip, tmp_path):
    clip, _, _, cache = cached_clip
    (tmp_path / "one" / "rock").mkdir(parents=True)
    (tmp_path / "one" / "rock" / clip.name).write_bytes(clip.read_bytes())
    proc, heavy = imported("extract", "--audio-dir", tmp_path / "one", "--out",
                           tmp_path / "f.pkl", "--cache-dir", cache, "--quiet",
                           "--duration", "6")
    assert "1 clip (0 computed, 1 from cache)" in proc.stdout, proc.stderr
    assert heavy == set(), heavy


def test_predict_of_a_cached_file_imports_only_its_engine(cached_clip):
    clip, checkpoint, onnx, cache = cached_clip
    proc, heavy = imported("predict", clip, "--checkpoint", checkpoint, "--cache-dir", cache)
    assert proc.stdout.startswith(f"{clip}: "), proc.stderr
    assert heavy == {"torch"}, heavy        # no librosa, no pool, no torchvision to build it
    proc, heavy = imported("predict", clip, "--checkpoint", onnx, "--engine", "onnx",
                           "--cache-dir", cache)
    assert proc.stdout.startswith(f"{clip}: "), proc.stderr
    assert heavy == {"onnxruntime"}, heavy


def test_predict_with_the_onnx_engine_on_a_new_file_imports_no_torch(cached_clip, tmp_path):
    """Where torch is installed too: the pretrained view runs on onnxruntime, to the torch
    port's values within float32 rounding (the same cache entries but for that)."""
    import numpy as np

    clip, _, onnx, cache = cached_clip
    proc, heavy = imported("predict", clip, "--checkpoint", onnx, "--engine", "onnx",
                           "--cache-dir", tmp_path / "new", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "torch" not in heavy and "onnxruntime" in heavy and "librosa" in heavy, heavy
    (new,) = (tmp_path / "new").glob("features-*/*/*.npz")
    with np.load(new) as got, np.load(next(cache.glob(f"features-*/*/{new.name}"))) as kept:
        for key in got.files:
            if key != "__meta__":
                np.testing.assert_allclose(got[key], kept[key], rtol=0,
                                           atol=1e-5 * max(1.0, np.abs(kept[key]).max()))


@pytest.mark.parametrize("command", [
    ("predict", "CLIP", "--checkpoint", "nothere.pth"),
    ("predict", "CLIP", "--checkpoint", "MODEL", "--checkpoint", "nothere.pth"),
    ("evaluate", "--checkpoint", "nothere.pth")])
def test_a_mistyped_checkpoint_is_refused_before_torch_is_imported(cached_clip, tmp_path,
                                                                   command):
    clip, checkpoint, _, _ = cached_clip
    args = [{"CLIP": clip, "MODEL": checkpoint}.get(a, a) for a in command]
    proc, heavy = imported(*args, "--cache-dir" if command[0] == "predict" else "--out-dir",
                           tmp_path / "out")
    assert "nothere.pth: checkpoint not found; run deepfusion train" in proc.stderr
    assert "torch" not in heavy and "pandas" not in heavy, heavy
    assert not (tmp_path / "out").exists()


def test_extract_on_a_machine_without_a_gpu_asks_torch_nothing(monkeypatch, tmp_path):
    """--device auto: no GPU driver's device file on Linux means the CPU, told without
    importing torch (a cached clip needs none); with torch imported, torch is asked."""
    from deepfusion.jobs import job as tasks
    from deepfusion.runtime import device as runtime

    asked = []
    monkeypatch.setattr(runtime, "resolve_device", lambda name: asked.append(name) or "cpu")
    monkeypatch.setattr(tasks, "GPU_DEVICE_FILES", (str(tmp_path / "no-such-device"),))
    monkeypatch.delitem(sys.modules, "torch")      # as in a command's process, before
    monkeypatch.setattr(sys, "platform", "linux")
    assert tasks.resolve_backend(None, "auto") == ("numpy", None)
    assert tasks.resolve_backend("torch", "auto") == ("torch", "cpu")
    assert "torch" not in sys.modules and asked == []
    (tmp_path / "no-such-device").touch()          # a GPU's driver: torch decides
    assert tasks.resolve_backend(None, "auto") == ("numpy", None) and asked == ["auto"]
