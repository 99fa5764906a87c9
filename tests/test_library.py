"""predict over a library (the shared cache, CSV, ensembles) and embed."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from deepfusion.testing import cli_command, invoke, one_error_line, subprocess_env
from deepfusion.views import ALL_KEYS

SUMMARY = "files classified"


@pytest.fixture(scope="module")
def checkpoint(trained_model_dir) -> Path:
    return trained_model_dir / "best.pth"


@pytest.fixture(scope="module")
def second_checkpoint(tiny_features, tmp_path_factory) -> Path:
    """Another model of the same data (another seed): an ensemble's second member."""
    from deepfusion.config import TrainConfig
    from deepfusion.train.run import train

    model_dir = tmp_path_factory.mktemp("model2")
    train(tiny_features, model_dir=model_dir, backbone="light", pretrained=False, quiet=True,
          config=TrainConfig(epochs=6, batch_size=8, lr=3e-3, val_size=0.2, test_size=0.2, seed=7),
          echo=lambda s: None)
    return model_dir / "best.pth"


def feature_entries(cache: Path) -> int:
    """Feature entries in a cache (not the models' outputs kept beside them)."""
    return sum("outputs" not in p.relative_to(cache).parts for p in cache.rglob("*.npz"))


def summary(result) -> str:
    lines = [ln for ln in result.output.splitlines() if SUMMARY in ln]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.slow
def test_predict_twice_on_the_cache_and_a_csv(tiny_audio, checkpoint, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "p.csv"
    first = invoke("predict", tiny_audio, "--checkpoint", checkpoint, "--cache-dir", cache,
                   "--out", out, "--jobs", "2")
    assert first.exit_code == 0, first.output
    assert summary(first).startswith("18 files classified (18 analysed, 0 from the cache), 0 skipped")
    table = pd.read_csv(out)
    assert list(table.columns) == ["path", "genre", "probability", "rock", "techno", "waltz", "error"]
    assert len(table) == 18 and table["error"].isna().all()
    assert np.allclose(table[["rock", "techno", "waltz"]].sum(axis=1), 1, atol=1e-5)
    assert (table["probability"] == table[["rock", "techno", "waltz"]].max(axis=1)).all()
    before = out.read_bytes()
    second = invoke("predict", tiny_audio, "--checkpoint", checkpoint, "--cache-dir", cache,
                    "--out", out, "--jobs", "2")
    assert second.exit_code == 0, second.output
    assert "(0 analysed, 18 from the cache)" in summary(second)
    assert out.read_bytes() == before
    # extract's cache serves predict: the same keys
    from deepfusion.extract import extract
    from deepfusion.testing import TINY_FEATURES

    shared = tmp_path / "shared"
    extract(tiny_audio, out=tmp_path / "f.pkl", cache_dir=shared, jobs=1, config=TINY_FEATURES,
            quiet=True)
    third = invoke("predict", tiny_audio, "--checkpoint", checkpoint, "--cache-dir", shared,
                   "--out", tmp_path / "q.csv")
    assert "(0 analysed, 18 from the cache)" in summary(third)
    assert (tmp_path / "q.csv").read_bytes() == before


@pytest.mark.slow
def test_a_second_run_runs_no_network_unless_the_model_changed(tiny_audio, checkpoint,
                                                              second_checkpoint, tmp_path,
                                                              monkeypatch):
    """The outputs of a model per file are kept (deepfusion.io.model_ids): run again with the same
    model, no window goes through the network; another model, a damaged entry or another
    precision does."""
    from deepfusion.inference.library import Library, Prediction
    from deepfusion.inference.torch_engine import TorchEngine

    calls = []
    real = TorchEngine.window_outputs

    def counted(self, views):
        calls.append((self.path, len(views["mfcc"])))
        return real(self, views)

    monkeypatch.setattr(TorchEngine, "window_outputs", counted)
    cache = tmp_path / "cache"

    def run(*ckpts, precision="fp32"):
        calls.clear()
        lib = Library([tiny_audio], checkpoints=list(ckpts), cache_dir=cache, precision=precision)
        out = {r.path: (r.probabilities, r.embedding) for r in lib.run(jobs=1)
               if isinstance(r, Prediction)}
        assert len(out) == 18
        return out, sum(n for _, n in calls)

    first, windows = run(checkpoint)
    assert windows == 18
    again, windows = run(checkpoint)
    assert windows == 0
    for path, (probs, emb) in first.items():
        assert again[path][0] == probs and np.array_equal(again[path][1], emb)
    # an ensemble: the kept model runs nothing, the new one every window
    _, windows = run(checkpoint, second_checkpoint)
    assert windows == 2 * 18 and {p for p, _ in calls} == {checkpoint, second_checkpoint}
    _, windows = run(second_checkpoint, checkpoint)
    assert windows == 0
    # a damaged entry is computed again, to the same answer
    outputs = next(cache.glob("features-*")) / "outputs"
    assert len(list(outputs.rglob("*.npz"))) == 2 * 18
    from deepfusion.io.model_ids import model_id

    entry = sorted((outputs / model_id(checkpoint, "torch", "cpu", "fp32")).rglob("*.npz"))[0]
    entry.write_bytes(b"PK\x03\x04 not a zip")
    healed, windows = run(checkpoint)
    assert windows == 1                # that file, through the one model whose entry it was
    for path, (probs, emb) in first.items():
        assert np.allclose([healed[path][0][g] for g in probs], list(probs.values()), atol=1e-6)
    # a model is its bytes, not its name: a copy is the same model, a retrained one is not
    same_name = tmp_path / "best.pth"
    shutil.copy(checkpoint, same_name)
    _, windows = run(same_name)
    assert windows == 0
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["model_state"]["classifier.bias"] += 1.0
    torch.save(ckpt, same_name)
    _, windows = run(same_name)
    assert windows == 18
    # another precision is another model
    from deepfusion.runtime.device import inference_precision

    other = inference_precision(torch.device("cpu"), "amp") != "fp32"
    _, windows = run(checkpoint, precision="amp")
    assert windows == (18 if other else 0)


def test_csv_quotes_any_name_and_lists_failures(tiny_audio, checkpoint, tmp_path):
    clip = tiny_audio / "rock" / "rock.00000.wav"
    names = ['a, "quoted" name.wav', "two\nlines.wav", "plain.wav"]
    for name in names:
        shutil.copy(clip, tmp_path / name)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....")
    out = tmp_path / "out" / "p.csv"
    result = invoke("predict", tmp_path, "--checkpoint", checkpoint, "--out", out, "--jobs", "1")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out, keep_default_na=False)
    assert len(table) == 4
    assert sorted(table["path"]) == sorted(str(tmp_path / n) for n in names + ["broken.wav"])
    broken = table[table["path"] == str(tmp_path / "broken.wav")].iloc[0]
    assert broken["genre"] == "" and broken["error"]
    good = table[table["error"] == ""]
    assert len(good) == 3 and good["genre"].nunique() == 1   # the same bytes three times
    assert "skipped" in result.stderr and str(tmp_path / "broken.wav") in result.stderr


@pytest.mark.slow
def test_ensemble_averages_probabilities(tiny_audio, checkpoint, second_checkpoint, tmp_path):
    files = [tiny_audio / "waltz" / "waltz.00001.wav", tiny_audio / "techno" / "techno.00004.wav"]

    def probs(*ckpts):
        args = [a for c in ckpts for a in ("--checkpoint", c)]
        result = invoke("predict", *files, *args, "--out", tmp_path / "p.csv", "--jobs", "1")
        assert result.exit_code == 0, result.output
        return pd.read_csv(tmp_path / "p.csv")[["rock", "techno", "waltz"]].to_numpy()

    one, two, both = probs(checkpoint), probs(second_checkpoint), probs(checkpoint, second_checkpoint)
    assert not np.allclose(one, two, atol=1e-3)
    assert np.allclose(both, (one + two) / 2, atol=2e-6)


def _forged(checkpoint: Path, out: Path, change) -> Path:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    change(ckpt)
    torch.save(ckpt, out)
    return out


def test_mismatched_ensembles_are_refused(tiny_audio, checkpoint, tmp_path):
    other_features = _forged(checkpoint, tmp_path / "fmax.pth",
                             lambda c: c["feature_config"].update(fmax=8000.0))
    renamed = _forged(checkpoint, tmp_path / "genres.pth",
                      lambda c: c.update(class_names=["blues", "techno", "waltz"]))
    clip = tiny_audio / "rock" / "rock.00000.wav"
    for bad, words in ((other_features, "features differ"), (renamed, "genres")):
        result = invoke("predict", clip, "--checkpoint", checkpoint, "--checkpoint", bad)
        assert result.exit_code != 0
        line = one_error_line(result.stderr)
        assert str(bad) in line and words in line, line


@pytest.mark.slow
def test_embed_shapes_and_top1_equal_predict(tiny_audio, checkpoint, tmp_path):
    out = tmp_path / "emb.npz"
    result = invoke("embed", tiny_audio, "--checkpoint", checkpoint, "--out", out, "--jobs", "2")
    assert result.exit_code == 0, result.output
    with np.load(out, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    n = 18
    assert arrays["paths"].shape == (n,) and arrays["genres"].shape == (n,)
    assert arrays["embeddings"].dtype == np.float32 and arrays["embeddings"].shape[0] == n
    assert arrays["embeddings"].shape[1] == torch.load(checkpoint, weights_only=True)[
        "model_state"]["classifier.weight"].shape[1]
    assert arrays["attention"].shape == (n, len(ALL_KEYS))    # the hand-made views and musicnn
    assert list(arrays["modalities"])[-1] == "musicnn"
    assert np.allclose(arrays["attention"].sum(axis=1), 1, atol=1e-5)
    assert np.isfinite(arrays["embeddings"]).all() and arrays["embeddings"].std(axis=0).max() > 0
    listed = invoke("predict", tiny_audio, "--checkpoint", checkpoint, "--json", "--top-k", "1")
    top1 = {o["path"]: o["top"][0]["genre"] for o in map(json.loads, listed.stdout.splitlines())}
    assert dict(zip(arrays["paths"], arrays["genres"])) == top1
    # the Python function returns the same arrays
    from deepfusion.embed import embed

    again = embed([tiny_audio], checkpoint=checkpoint, jobs=1)
    assert np.array_equal(again.paths, arrays["paths"])
    assert np.allclose(again.embeddings, arrays["embeddings"], atol=1e-6)


def test_embed_refuses_an_output_over_an_input(tiny_audio, checkpoint):
    clip = tiny_audio / "rock" / "rock.00000.wav"
    result = invoke("embed", clip, "--checkpoint", checkpoint, "--out", clip)
    assert result.exit_code != 0
    assert str(clip) in one_error_line(result.stderr)


@pytest.mark.slow
def test_killed_predict_continues_from_the_cache(tiny_audio, checkpoint, tmp_path):
    """Killed mid-run, predict keeps what its workers stored; the next run computes only the
    rest and writes what an uninterrupted run writes."""
    cache, out = tmp_path / "cache", tmp_path / "p.csv"
    args = cli_command("predict", tiny_audio, "--checkpoint", checkpoint, "--cache-dir", cache,
                       "--out", out, "--jobs", "1")
    proc = subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and feature_entries(cache) < 4:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    stored = feature_entries(cache)
    assert 4 <= stored < 18 and not out.exists()
    again = subprocess.run(args, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    line = [ln for ln in again.stdout.splitlines() if SUMMARY in ln][0]
    analysed = int(line.split("(")[1].split()[0])
    assert analysed == 18 - stored, line
    fresh = tmp_path / "fresh.csv"
    clean = invoke("predict", tiny_audio, "--checkpoint", checkpoint, "--cache-dir",
                   tmp_path / "other", "--out", fresh, "--jobs", "2")
    assert clean.exit_code == 0
    assert out.read_bytes() == fresh.read_bytes()


CRASHING_WORKERS = """
import os, signal
if os.environ.get("DEEPFUSION_TEST_CRASH") and os.getpid() != int(os.environ["DEEPFUSION_TEST_CRASH"]):
    import deepfusion.features.numpy_views as features
    real, calls = features.compute_features, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:          # the warm-up, two files, then a crash in the third
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(*args, **kwargs)

    features.compute_features = crashing
"""


@pytest.mark.slow
def test_a_crashing_worker_is_one_line_and_the_next_run_continues(tiny_audio, checkpoint, tmp_path):
    """A worker killed by a signal (a decoder crash, the OOM killer): one line, not an internal
    error; the files finished before are in the cache and the next run computes only the rest."""
    import os

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(CRASHING_WORKERS)
    cache = tmp_path / "cache"
    args = cli_command("predict", tiny_audio, "--checkpoint", checkpoint, "--cache-dir", cache,
                       "--out", tmp_path / "p.csv", "--jobs", "2")
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(hooks), env["PYTHONPATH"]])
    # the driver is spared: the shell gives its pid, which exec keeps
    crash = subprocess.run(["sh", "-c", 'DEEPFUSION_TEST_CRASH=$$ exec "$@"', "sh", *args], env=env,
                           capture_output=True, text=True, timeout=300)
    assert crash.returncode != 0
    # (the dying worker's own report, faulthandler's, may precede it on stderr)
    errors = [ln for ln in crash.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "internal error" not in errors[0], crash.stderr
    assert "worker process died" in errors[0] and "SIGSEGV" in errors[0], errors[0]
    stored = feature_entries(cache)
    assert stored >= 2 and not (tmp_path / "p.csv").exists()
    again = subprocess.run(args, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"({18 - stored} analysed, {stored} from the cache)" in again.stdout
