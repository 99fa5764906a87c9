"""Dev-only: check the PyTorch musicnn port against the original TensorFlow graph.

The original runs in its own virtual environment (``--venv``, default /tmp/musicnn-tf, made on
first use with ``pip install tensorflow-cpu librosa resampy``; never the main environment),
from the musicnn 0.1.0 wheel's own meta graphs and checkpoints (``import_meta_graph`` after
stripping every node's ``_output_shapes``), in a subprocess. Both sides get the SAME input: the
patches of :func:`deepfusion.features.pretrained.musicnn.log_mel` of real clips (``--per-genre`` clips of
each genre folder of ``--data``, all their patches), passed by .npy file. Prints, per model,
the largest absolute difference of each output over all patches, and PASS when taggram,
logits and penultimate agree within 1e-4, and front end, mid end and both pools (values up to
~150) within 1e-4 of their largest value.

It also compares our ``resample_16k`` + ``log_mel`` with the original extractor's own
``batch_data`` (run in the venv with the original's librosa defaults: ``res_type``
``kaiser_best`` and ``pad_mode`` ``reflect`` of librosa 0.7; ``10000 * mel`` in float32 as
numpy < 1.17 computed it), and the whole pipeline end to end (our preprocessing + port against
the original preprocessing + graph).

``--write-fixture`` writes tests/data/musicnn_reference.npz: 3 patches of real log-mel input
with the original's taggram, penultimate and max_pool for both models.

Usage: python benchmarks/musicnn_tf_check.py [--data ../shared/data/minigenres] [--per-genre 2]
       [--wheel musicnn-0.1.0-py3-none-any.whl] [--venv /tmp/musicnn-tf] [--write-fixture]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deepfusion.features.pretrained import musicnn  # noqa: E402

TOL = 1e-4
#: compared in absolute terms; the other TENSORS (features) relative to their largest value
OUTPUTS = ("taggram", "logits", "penultimate")
AUDIO = (".ogg", ".wav", ".flac", ".mp3", ".au")
FIXTURE = ROOT / "tests/data/musicnn_reference.npz"
VENV_PACKAGES = ("tensorflow-cpu", "librosa", "resampy", "soundfile")
#: outputs compared, our key -> the original graph's tensor (meta graph of the training code)
TENSORS = {"taggram": "model/Sigmoid:0",
           "logits": "model/dense_1/BiasAdd:0",
           "penultimate": "model/batch_normalization_10/batchnorm/add_1:0",
           "frontend": "model/concat:0",             # (B, 187, 561)
           "midend": "model/concat_1:0",             # (B, 187, 753, 1)
           "max_pool": "model/Max:0",                # (B, 753, 1)
           "mean_pool": "model/moments/Squeeze:0"}   # (B, 753, 1)

WORKER = textwrap.dedent('''
    """Runs in the TensorFlow venv: the original graphs on x.npy, the original preprocessing."""
    import functools, inspect, json, os, sys, warnings
    warnings.filterwarnings("ignore")
    import numpy as np
    import tensorflow as tf
    from tensorflow.core.protobuf import meta_graph_pb2

    cfg = json.load(open(sys.argv[1]))
    sys.path.insert(0, cfg["wheel_dir"])
    tf.compat.v1.disable_eager_execution()
    tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.ERROR)


    def graph_runner(model):
        mg = meta_graph_pb2.MetaGraphDef()
        with open(os.path.join(cfg["wheel_dir"], "musicnn", model, ".meta"), "rb") as fh:
            mg.ParseFromString(fh.read())
        for node in mg.graph_def.node:      # shapes recorded by TF 1.12 do not import in TF 2
            if "_output_shapes" in node.attr:
                del node.attr["_output_shapes"]
        graph = tf.Graph()
        with graph.as_default():
            saver = tf.compat.v1.train.import_meta_graph(mg, clear_devices=True)
        sess = tf.compat.v1.Session(graph=graph)
        saver.restore(sess, os.path.join(cfg["wheel_dir"], "musicnn", model) + "/")
        x = graph.get_tensor_by_name("model/Placeholder:0")
        training = graph.get_tensor_by_name("model/Placeholder_2:0")
        fetch = {k: graph.get_tensor_by_name(v) for k, v in cfg["tensors"].items()}

        def run(batch):
            outs = [sess.run(fetch, {x: batch[i:i + 16], training: False})
                    for i in range(0, len(batch), 16)]
            return {k: np.concatenate([o[k] for o in outs]) for k in fetch}
        return run


    def original_batch_data(librosa_defaults):
        """The wheel's own extractor.batch_data, with librosa's defaults set as asked."""
        import librosa
        from musicnn import extractor
        src = inspect.getsource(extractor.batch_data)
        old = "np.log10(10000 * audio_rep + 1)"
        assert src.count(old) == 1
        if librosa_defaults == "0.7":
            # numpy < 1.17 promoted 10000 * float16 to float32; numpy 2 stays in float16
            src = src.replace(old, "np.log10(10000 * audio_rep.astype(np.float32) + 1)")
            lib = type("librosa", (), {})()
            lib.load = functools.partial(librosa.load, res_type="kaiser_best")
            lib.feature = type("feature", (), {})()
            lib.feature.melspectrogram = functools.partial(librosa.feature.melspectrogram,
                                                           pad_mode="reflect")
        else:
            lib = librosa
        ns = {"np": np, "librosa": lib, "config": extractor.config}
        exec(src, ns)
        return ns["batch_data"]


    x = np.load(cfg["x"])
    results = {"versions": {"tensorflow": tf.__version__, "numpy": np.__version__}}
    import librosa, resampy
    results["versions"].update(librosa=librosa.__version__, resampy=resampy.__version__)
    runners = {m: graph_runner(m) for m in cfg["models"]}
    for m, run in runners.items():
        np.savez(os.path.join(cfg["out"], f"tf_{m}.npz"), **run(x))

    pre = {}
    for which in ("0.7", "current"):
        batch_data = original_batch_data(which)
        pre[which] = [batch_data(f, 187, 187)[0].astype(np.float32) for f in cfg["clips"]]
    np.savez(os.path.join(cfg["out"], "tf_pre.npz"),
             **{f"{w}_{i}": b for w, bs in pre.items() for i, b in enumerate(bs)})
    for m, run in runners.items():
        np.savez(os.path.join(cfg["out"], f"tf_e2e_{m}.npz"),
                 taggram=run(np.concatenate(pre["0.7"]))["taggram"])
    json.dump(results, open(os.path.join(cfg["out"], "tf_info.json"), "w"))
''')


def ensure_venv(venv: Path) -> Path:
    """The venv's python, with TensorFlow, librosa and resampy installed (once)."""
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import tensorflow, librosa, resampy, soundfile"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    print(f"creating {venv} with {' '.join(VENV_PACKAGES)} (a few minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *VENV_PACKAGES], check=True)
    return py


def pick_clips(data: Path, per_genre: int) -> list[Path]:
    genres = sorted(d for d in data.iterdir() if d.is_dir() and not d.name.startswith("."))
    clips = []
    for g in genres:
        clips += sorted(p for p in g.iterdir() if p.suffix.lower() in AUDIO)[:per_genre]
    if not clips:
        raise SystemExit(f"no audio clips under {data}")
    return clips


def our_patches(path: Path) -> np.ndarray:
    import soundfile as sf

    y, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return musicnn.patches(musicnn.log_mel(musicnn.resample_16k(y.mean(axis=1), sr)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/minigenres")
    ap.add_argument("--per-genre", type=int, default=2)
    ap.add_argument("--wheel", type=Path, help="musicnn-0.1.0 wheel (default: pip download it)")
    ap.add_argument("--venv", type=Path, default=Path("/tmp/musicnn-tf"))
    ap.add_argument("--write-fixture", action="store_true")
    args = ap.parse_args(argv)

    import torch

    py = ensure_venv(args.venv)
    clips = pick_clips(args.data, args.per_genre)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "musicnn==0.1.0",
                            "--no-deps", "-q", "-d", str(tmp)], check=True)
            wheel = next(tmp.glob("musicnn-0.1.0-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp / "wheel")

        t0 = time.perf_counter()
        per_clip = [our_patches(c) for c in clips]
        x = np.concatenate(per_clip)
        np.save(tmp / "x.npy", x)
        print(f"{len(clips)} clips of {args.data}, {len(x)} patches of {musicnn.PATCH_FRAMES} "
              f"frames; our resample_16k + log_mel: {time.perf_counter() - t0:.1f} s")
        cfg = {"wheel_dir": str(tmp / "wheel"), "x": str(tmp / "x.npy"), "out": str(tmp),
               "models": list(musicnn.MODELS), "tensors": TENSORS,
               "clips": [str(c) for c in clips]}
        (tmp / "cfg.json").write_text(json.dumps(cfg))
        (tmp / "worker.py").write_text(WORKER)
        t0 = time.perf_counter()
        # TF's own kernels (Eigen), as TF 1.x ran them, not the oneDNN ones of TF >= 2.9
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
        run = subprocess.run([str(py), str(tmp / "worker.py"), str(tmp / "cfg.json")],
                             env=env, stderr=subprocess.PIPE, text=True)
        if run.returncode:
            sys.stderr.write(run.stderr)
            raise SystemExit(f"the TensorFlow worker failed (exit {run.returncode})")
        info = json.loads((tmp / "tf_info.json").read_text())
        print(f"original graph in {args.venv}: "
              + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
              + f" ({time.perf_counter() - t0:.1f} s)")
        import librosa
        import resampy
        print(f"port: torch {torch.__version__}, numpy {np.__version__}, "
              f"librosa {librosa.__version__}, resampy {resampy.__version__}")

        ok = True
        ours_all, tf_all = {}, {}
        for model in musicnn.MODELS:
            with np.load(tmp / f"tf_{model}.npz") as z:
                # the graph keeps a trailing axis of 1 on the mid end and the pools
                ref = {k: z[k][..., 0] if z[k].shape[-1] == 1 else z[k] for k in z.files}
            with torch.inference_mode():
                out = musicnn.load_musicnn(model)(torch.from_numpy(x))
            ours = {k: out[k].numpy() for k in TENSORS}
            ours_all[model], tf_all[model] = ours, ref
            diffs = {k: float(np.abs(ours[k] - ref[k]).max()) for k in TENSORS}
            scale = {k: float(np.abs(ref[k]).max()) for k in TENSORS}
            # outputs within TOL; the features (up to ~150) within TOL of their largest value
            good = all(d <= TOL * (1.0 if k in OUTPUTS else max(1.0, scale[k]))
                       for k, d in diffs.items())
            ok &= good
            print(f"{model}: max |port - original| over {len(x)} patches: "
                  + ", ".join(f"{k} {d:.2e}" for k, d in diffs.items())
                  + f" -> {'PASS' if good else 'FAIL'}")
            print(f"{model}: max |original|: "
                  + ", ".join(f"{k} {s:.3g}" for k, s in scale.items()))

        with np.load(tmp / "tf_pre.npz") as z:
            pre = {k: z[k] for k in z.files}
        for which, label in (("0.7", "original batch_data with librosa 0.7's defaults "
                                     "(kaiser_best, reflect)"),
                             ("current", f"original batch_data as is with librosa "
                                         f"{info['versions']['librosa']}'s defaults "
                                         "(soxr_hq, constant pad; float16 product)")):
            d, n_inf, n = [], 0, 0
            for i, ours in enumerate(per_clip):
                theirs = pre[f"{which}_{i}"]
                if theirs.shape != ours.shape:
                    raise SystemExit(f"{clips[i]}: original patches {theirs.shape}, ours "
                                     f"{ours.shape}")
                finite = np.isfinite(theirs)
                n_inf += int((~finite).sum())
                n += theirs.size
                d.append(float(np.abs(ours - theirs)[finite].max()))
            print(f"preprocessing, ours vs {label}: max |log-mel diff| per clip "
                  + " ".join(f"{v:.2g}" for v in d) + f"; max {max(d):.3g}"
                  + (f" (over finite values; {n_inf} of {n} values non-finite there)"
                     if n_inf else ""))
        for model in musicnn.MODELS:
            with np.load(tmp / f"tf_e2e_{model}.npz") as z:
                e2e = z["taggram"]
            print(f"{model} end to end (our preprocessing + port vs original 0.7-defaults "
                  f"preprocessing + graph): max |taggram diff| "
                  f"{float(np.abs(ours_all[model]['taggram'] - e2e).max()):.2e} "
                  f"over {len(e2e)} patches")

        if args.write_fixture:
            starts = np.cumsum([0] + [len(p) for p in per_clip])
            # one patch of three clips of three genres (start, middle, end): varied input
            picks = [(1, 0), (len(clips) // 2, 3), (len(clips) - 1, 9)]
            rows = [int(starts[c] + min(p, len(per_clip[c]) - 1)) for c, p in picks]
            fixture = {"x": x[rows],
                       "source": np.array([f"{clips[c].parent.name}/{clips[c].name}#"
                                           f"{min(p, len(per_clip[c]) - 1)}"
                                           for c, p in picks])}
            for model in musicnn.MODELS:
                for k in ("taggram", "penultimate", "max_pool"):
                    fixture[f"{model}/{k}"] = tf_all[model][k][rows]
            FIXTURE.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(FIXTURE, **fixture)
            print(f"wrote {FIXTURE.relative_to(ROOT)} ({FIXTURE.stat().st_size:,} bytes): "
                  + ", ".join(str(s) for s in fixture["source"]))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
