"""Extract speed and fidelity, measured side by side in one run.

Prints, on the same clips:
  * seconds per 30-s clip (single process, one thread, decode excluded) for the
    straightforward librosa recipe (``librosa.effects.hpss`` on the waveform, then one librosa
    call per feature) and for deepfusion's ``compute_features`` of the same six views, and their
    ratio; then ``compute_features`` with the pretrained view (the default: musicnn on one
    patch in four) and its ratio to the six views (the budget: 2.5x), and with every patch;
  * the largest absolute difference per feature between ``compute_features`` and the same
    definitions computed with plain librosa/scipy calls (``reference_features``);
  * clips/s of the whole extract stage (decode + features + cache) with 1 and 2 jobs, on a warm
    worker pool, and their ratio;
  * whole processes on twelve new 30-s WAV clips (start-up and imports included): the librosa
    recipe (``benchmarks/librosa_recipe.py``) against ``deepfusion extract --jobs 1``, and
    ``--jobs 2`` against ``--jobs 1`` (the goals: 5x and 1.6x), and what a run of one new clip
    says of the process's fixed part and of the best ``--jobs 2`` can do on twelve;
  * the torch path (``deepfusion.features.torch_views``): the largest absolute difference per view
    from ``compute_features`` on real clips (``--diff-clips`` of the audio folder) and on
    synthetic ones, on every torch device this machine has, seconds per clip on every torch device this machine has beside numpy's
    (ratios), and the clips/s of ``extract --backend torch`` beside ``--backend numpy``.

Usage: python benchmarks/extract_speed.py [--audio-dir ../shared/data/minigenres] [--clips 6]
       [--diff-clips 20] [--only-torch | --only-whole]
Without an audio folder (or when it does not exist) it renders synthetic clips.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from librosa_recipe import naive_recipe  # noqa: E402 - benchmarks/ is on sys.path
from threadpoolctl import threadpool_limits

from deepfusion.audio import decode, discover
from deepfusion.config import FeatureConfig
from deepfusion.extract import extract
from deepfusion.features.numpy_views import compute_features
from deepfusion.features.torch_views import compute_features_torch
from deepfusion.jobs.job import one_torch_thread
from deepfusion.testing.reference import reference_features
from deepfusion.views import FEATURE_KEYS


def _clips(audio_dir: Path | None, work: Path) -> Path:
    if audio_dir is not None and audio_dir.is_dir():
        return audio_dir
    from deepfusion.synth import synthesize_dataset

    out = work / "synth"
    synthesize_dataset(out, genres=4, clips_per_genre=10, duration=30.0, seed=1)
    return out


def _wav_folder(items, out: Path, n: int, config: FeatureConfig) -> Path:
    """``n`` clips of ``items`` (every genre in turn) written as new 30-s WAV files."""
    import soundfile as sf

    by_genre: dict[str, list] = {}
    for it in items:
        by_genre.setdefault(it.label, []).append(it)
    chosen = [g[i] for i in range(max(map(len, by_genre.values())))
              for g in by_genre.values() if i < len(g)][:n]
    for it in chosen:
        audio = decode(it.path, sr=config.sample_rate, duration=config.duration)
        dest = out / it.label / f"{Path(it.relpath).stem}.wav"
        dest.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(dest), audio.y, config.sample_rate)
    return out


def _timed(argv: list[str], env: dict) -> float:
    """Wall seconds of one process (its output kept only when it fails)."""
    import subprocess

    t = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    return took


def whole_process(items, work: Path, config: FeatureConfig, n: int = 12, repeats: int = 3) -> None:
    """Twelve new 30-s WAV clips, each command a whole process (start-up, imports, decoding,
    the views, the cache, the output): the librosa recipe in one process, ``deepfusion
    extract`` with ``--jobs 1`` and ``--jobs 2`` on an empty cache each. One untimed run of the
    recipe and of extract on other clips first (disk caches, numba's compiled code: what every
    run after a machine's first has). Each of four commands runs ``repeats`` times,
    interleaved, and their medians are compared. The fourth, ``--jobs 1`` on one new clip,
    splits the twelve clips' time into the process's fixed part and the work per clip: the
    ceiling of ``--jobs 2`` against ``--jobs 1`` on twelve clips (Amdahl's law)."""
    import os
    import sys

    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(here.parent), os.environ.get("PYTHONPATH")]))}
    clips = _wav_folder(items, work / "wav12", n, config)
    warm = _wav_folder(items[::-1], work / "wav-warm", 2, config)
    recipe = [sys.executable, str(here / "librosa_recipe.py")]

    def extract_cmd(folder: Path, jobs: int, tag: str) -> list[str]:
        return [sys.executable, "-m", "deepfusion", "extract", "--audio-dir", str(folder),
                "--out", str(work / f"{tag}.pkl"), "--cache-dir", str(work / f"cache-{tag}"),
                "--jobs", str(jobs), "--quiet"]
    single = _wav_folder(items[1::2], work / "wav1", 1, config)
    _timed([*recipe, str(warm), str(work / "warm-recipe.pkl")], env)
    _timed(extract_cmd(warm, 1, "warm"), env)
    runs: dict[str, list[float]] = {"recipe": [], "one": [], "two": [], "alone": []}
    for r in range(repeats):          # interleaved: a slow spell of the machine hits all four
        runs["recipe"].append(_timed([*recipe, str(clips), str(work / f"recipe{r}.pkl")], env))
        runs["one"].append(_timed(extract_cmd(clips, 1, f"jobs1-{r}"), env))
        runs["two"].append(_timed(extract_cmd(clips, 2, f"jobs2-{r}"), env))
        runs["alone"].append(_timed(extract_cmd(single, 1, f"alone{r}"), env))
    recipe_s, one, two, alone = (float(np.median(runs[k])) for k in ("recipe", "one", "two", "alone"))
    print(f"whole process, {n} new {config.duration:g}-s WAV clips, the median of {repeats} "
          f"interleaved runs each: librosa recipe {recipe_s:.2f} s; "
          f"extract --jobs 1 {one:.2f} s ({recipe_s / one:.2f}x the recipe, goal 5x); "
          f"--jobs 2 {two:.2f} s ({one / two:.2f}x --jobs 1, goal 1.6x); each run: "
          + "; ".join(f"{k} " + " ".join(f"{t:.2f}" for t in v) for k, v in runs.items()))
    # Amdahl: one new clip costs the process's fixed part (start-up, imports, warm-up, output)
    # and one clip's work; twelve cost the same fixed part and twelve clips' work. Two jobs can
    # at best halve the work (each worker pays the fixed part, at the same time).
    if n < 2:
        return
    per_clip = max(0.0, (one - alone) / (n - 1))
    fixed = alone - per_clip
    print(f"  of which: fixed part {fixed:.2f} s (one new clip took {alone:.2f} s), "
          f"{per_clip:.3f} s per clip; --jobs 2 could at best reach "
          f"{(fixed + n * per_clip) / (fixed + n * per_clip / 2):.2f}x --jobs 1 on {n} clips")


def _devices() -> list[str]:
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def _worst(signals: list[np.ndarray], config: FeatureConfig, device: str = "cpu",
           batch: int = 8) -> dict[str, float]:
    """Largest |torch - numpy| per view over ``signals`` (torch on ``device``, in batches)."""
    worst = {k: 0.0 for k in FEATURE_KEYS}
    for start in range(0, len(signals), batch):
        chunk = signals[start:start + batch]
        for y, got in zip(chunk, compute_features_torch(np.stack(chunk), config, device=device)):
            want = compute_features(y, config)
            for k in FEATURE_KEYS:
                worst[k] = max(worst[k], float(np.abs(got[k] - want[k]).max()))
    return worst


def torch_path(items, signals: list[np.ndarray], config: FeatureConfig, work: Path,
               diff_clips: int, subset: Path | None) -> None:
    """The torch backend beside numpy: differences per view, seconds per clip, extract speed."""
    import torch
    from threadpoolctl import threadpool_limits

    from deepfusion.synth import synthesize_dataset

    step = max(1, len(items) // diff_clips)
    real = [decode(it.path, sr=config.sample_rate, duration=config.duration).y
            for it in items[::step][:diff_clips]]
    synth_dir = work / "synth-diff"
    synthesize_dataset(synth_dir, genres=4, clips_per_genre=2, duration=config.duration, seed=7)
    synth = [decode(it.path, sr=config.sample_rate, duration=config.duration).y
             for it in discover(synth_dir)]
    for device in _devices():
        for name, clips in ((f"{len(real)} real clips", real), (f"{len(synth)} synthetic clips", synth)):
            worst = _worst(clips, config, device)
            print(f"max |torch ({device}) - numpy| per feature, {name}: "
                  + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()))

    batch = np.stack(signals)
    with threadpool_limits(limits=1):
        compute_features(signals[0], config)
        t = time.perf_counter()
        for y in signals:
            compute_features(y, config)
        numpy_s = (time.perf_counter() - t) / len(signals)
    threads = torch.get_num_threads()
    runs = [("cpu", 1), ("cpu", threads)] if threads > 1 else [("cpu", 1)]
    runs += [(d, threads) for d in _devices() if d != "cpu"]
    line = [f"numpy 1 thread {numpy_s:.3f}"]
    for device, n in runs:
        torch.set_num_threads(n)
        compute_features_torch(batch[:2], config, device=device)          # warm up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        compute_features_torch(batch, config, device=device)  # returns numpy: synchronised
        s = (time.perf_counter() - t) / len(signals)
        label = f"torch {device}" + (f" {n} thread{'s' * (n > 1)}" if device == "cpu" else "")
        line.append(f"{label} {s:.3f} ({numpy_s / s:.2f}x numpy)")
    torch.set_num_threads(threads)
    print(f"seconds per clip, features only, batch of {len(signals)}: " + ", ".join(line))

    if subset is None:
        return
    from joblib.externals.loky import get_reusable_executor

    rates = {}
    for backend, device in (("numpy", "cpu"), *(("torch", d) for d in _devices())):
        name = f"{backend} ({device})"
        # a fresh worker pool per backend: loky replaces a worker whose memory grows by 300 MB
        # after its first task (torch arriving in a numpy worker), which would be timed here
        get_reusable_executor().shutdown(wait=True)
        extract(subset, out=work / "warm.pkl", cache_dir=work / f"warm-{backend}-{device}",
                jobs=2, config=config, quiet=True, backend=backend, device=device)
        t = time.perf_counter()
        res = extract(subset, out=work / f"{backend}-{device}.pkl",
                      cache_dir=work / f"cache-{backend}-{device}", jobs=2, config=config,
                      quiet=True, backend=backend, device=device)
        rates[name] = res.computed / (time.perf_counter() - t)
    base = rates["numpy (cpu)"]
    print("extract throughput, 2 jobs: " + ", ".join(
        f"{name} {rate:.2f} clips/s ({rate / base:.2f}x)" for name, rate in rates.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--audio-dir", type=Path, default=Path("../shared/data/minigenres"))
    parser.add_argument("--clips", type=int, default=6, help="clips timed per recipe")
    parser.add_argument("--throughput-clips", type=int, default=40)
    parser.add_argument("--diff-clips", type=int, default=20,
                        help="real clips the torch path is compared on")
    parser.add_argument("--only-torch", action="store_true",
                        help="measure the torch path only (differences, seconds, throughput)")
    parser.add_argument("--only-whole", action="store_true",
                        help="measure the whole processes on twelve new clips only")
    args = parser.parse_args()

    config = FeatureConfig()
    work = Path(tempfile.mkdtemp(prefix="df-bench-"))
    try:
        root = _clips(args.audio_dir, work)
        items = discover(root)
        step = max(1, len(items) // args.clips)
        chosen = items[::step][: args.clips]
        signals = [decode(it.path, sr=config.sample_rate, duration=config.duration).y
                   for it in chosen]
        print(f"clips: {len(signals)} x {config.duration:g} s from {root}")
        subset = work / "subset"
        pool = items[: args.throughput_clips]
        for it in pool:
            dest = subset / it.relpath
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(it.path, dest)
        if args.only_whole:
            whole_process(items, work, config)
            return
        if args.only_torch:
            torch_path(items, signals, config, work, args.diff_clips, subset)
            return

        six = replace(config, pretrained_view=None)
        every = replace(config, pretrained_stride=1)
        timings = {}
        runs = (("straightforward recipe", lambda y: naive_recipe(y, config.sample_rate)),
                ("deepfusion", lambda y: compute_features(y, six)),
                ("with the view", lambda y: compute_features(y, config)),
                ("every patch", lambda y: compute_features(y, every)))
        with threadpool_limits(limits=1), one_torch_thread():
            for _, fn in runs:
                fn(signals[0])    # warm caches (mel basis, FFT plans, the network's weights)
            for name, fn in runs:
                t = time.perf_counter()
                for y in signals:
                    fn(y)
                timings[name] = (time.perf_counter() - t) / len(signals)
        base, ours = timings["straightforward recipe"], timings["deepfusion"]
        print(f"seconds per clip, 1 thread: straightforward {base:.3f}, deepfusion six views "
              f"{ours:.3f} (goal 0.12), speed-up {base / ours:.1f}x")
        print(f"seconds per clip, 1 thread: + pretrained view (one patch in "
              f"{config.pretrained_stride}) {timings['with the view']:.3f}, "
              f"{timings['with the view'] / ours:.2f}x the six views (budget 2.5x); every patch "
              f"{timings['every patch']:.3f}, {timings['every patch'] / ours:.2f}x")

        worst = {k: 0.0 for k in FEATURE_KEYS}
        for y in signals:
            fast, slow = compute_features(y, config), reference_features(y, config)
            for k in FEATURE_KEYS:
                worst[k] = max(worst[k], float(np.abs(fast[k] - slow[k]).max()))
        print("max |deepfusion - plain librosa/scipy| per feature:")
        for k, v in worst.items():
            print(f"  {k:14s} {v:.3g}")

        rates = {}
        for jobs in (1, 2):
            # warm the worker pool (process start, imports) on a throw-away cache first
            # (an output of its own: the same one again would be up to date, and no pool start)
            extract(subset, out=work / f"warm{jobs}.pkl", cache_dir=work / f"warm{jobs}",
                    jobs=jobs, config=config, quiet=True)
            t = time.perf_counter()
            res = extract(subset, out=work / f"f{jobs}.pkl", cache_dir=work / f"cache{jobs}",
                          jobs=jobs, config=config, quiet=True)
            rates[jobs] = res.computed / (time.perf_counter() - t)
        print(f"extract throughput on {len(pool)} clips, warm worker pool: 1 job {rates[1]:.2f} "
              f"clips/s, 2 jobs {rates[2]:.2f} clips/s, ratio {rates[2] / rates[1]:.2f}x")
        whole_process(items, work, config)
        torch_path(items, signals, config, work, args.diff_clips, subset)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
