"""Extract speed and fidelity, measured side by side in one run.

Prints, on the same clips:
  * seconds per 30-s clip (single process, decode excluded) for the straightforward librosa
    recipe (``librosa.effects.hpss`` on the waveform, then one librosa call per feature) and for
    deepfusion's ``compute_features``, and their ratio;
  * the largest absolute difference per feature between ``compute_features`` and the same
    definitions computed with plain librosa/scipy calls (``reference_features``);
  * clips/s of the whole extract stage (decode + features + cache) with 1 and 2 jobs, on a warm
    worker pool, and their ratio.

Usage: python benchmarks/extract_speed.py [--audio-dir ../shared/data/minigenres] [--clips 6]
Without an audio folder (or when it does not exist) it renders synthetic clips.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from deepfusion.audio import decode, discover
from deepfusion.config import FEATURE_KEYS, FeatureConfig
from deepfusion.extract import extract
from deepfusion.features import compute_features
from deepfusion.testing.reference import reference_features


def naive_recipe(y: np.ndarray, sr: int = 22050) -> dict[str, np.ndarray]:
    """The straightforward recipe deepfusion replaces: waveform HPSS, one librosa call per view.

    The baseline of this benchmark only.
    """
    import librosa

    y_harm, y_perc = librosa.effects.hpss(y)
    def mel_db(sig):
        return librosa.power_to_db(librosa.feature.melspectrogram(y=sig, sr=sr), ref=np.max)
    return {
        "mel_spec_orig": mel_db(y),
        "mel_spec_harm": mel_db(y_harm),
        "mel_spec_perc": mel_db(y_perc),
        "mfcc": librosa.feature.mfcc(y=y, sr=sr, n_mfcc=20),
        "chroma": librosa.feature.chroma_stft(y=y, sr=sr),
        "tempogram": librosa.feature.tempogram(y=y, sr=sr),
    }


def _clips(audio_dir: Path | None, work: Path) -> Path:
    if audio_dir is not None and audio_dir.is_dir():
        return audio_dir
    from deepfusion.synth import synthesize_dataset

    out = work / "synth"
    synthesize_dataset(out, genres=4, clips_per_genre=10, duration=30.0, seed=1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--audio-dir", type=Path, default=Path("../shared/data/minigenres"))
    parser.add_argument("--clips", type=int, default=6, help="clips timed per recipe")
    parser.add_argument("--throughput-clips", type=int, default=40)
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

        compute_features(signals[0], config)  # warm caches (mel basis, FFT plans)
        naive_recipe(signals[0], config.sample_rate)
        timings = {}
        for name, fn in (("straightforward recipe", lambda y: naive_recipe(y, config.sample_rate)),
                         ("deepfusion", lambda y: compute_features(y, config))):
            t = time.perf_counter()
            for y in signals:
                fn(y)
            timings[name] = (time.perf_counter() - t) / len(signals)
        base, ours = timings["straightforward recipe"], timings["deepfusion"]
        print(f"seconds per clip, 1 process: straightforward {base:.3f}, deepfusion {ours:.3f}, "
              f"speed-up {base / ours:.1f}x")

        worst = {k: 0.0 for k in FEATURE_KEYS}
        for y in signals:
            fast, slow = compute_features(y, config), reference_features(y, config)
            for k in FEATURE_KEYS:
                worst[k] = max(worst[k], float(np.abs(fast[k] - slow[k]).max()))
        print("max |deepfusion - plain librosa/scipy| per feature:")
        for k, v in worst.items():
            print(f"  {k:14s} {v:.3g}")

        subset = work / "subset"
        pool = items[: args.throughput_clips]
        for it in pool:
            dest = subset / it.relpath
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(it.path, dest)
        rates = {}
        for jobs in (1, 2):
            # warm the worker pool (process start, imports) on a throw-away cache first
            extract(subset, out=work / "warm.pkl", cache_dir=work / f"warm{jobs}", jobs=jobs,
                    config=config, quiet=True)
            t = time.perf_counter()
            res = extract(subset, out=work / f"f{jobs}.pkl", cache_dir=work / f"cache{jobs}",
                          jobs=jobs, config=config, quiet=True)
            rates[jobs] = res.computed / (time.perf_counter() - t)
        print(f"extract throughput on {len(pool)} clips: 1 job {rates[1]:.2f} clips/s, "
              f"2 jobs {rates[2]:.2f} clips/s, ratio {rates[2] / rates[1]:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
