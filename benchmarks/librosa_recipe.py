"""The straightforward librosa recipe deepfusion's extraction is measured against.

Waveform HPSS (``librosa.effects.hpss``), then one librosa call per view: what a script
written from librosa's documentation does. As a script it is the whole-process baseline of
``benchmarks/extract_speed.py``: one process that decodes every audio file under a folder
(``librosa.load`` at 22,050 Hz, mono, the first 30 s), computes the six views and pickles
them, the way ``deepfusion extract --jobs 1`` runs.

Usage: python benchmarks/librosa_recipe.py AUDIO_DIR OUT.pkl
"""

from __future__ import annotations

import sys

import numpy as np

#: What the recipe decodes: deepfusion's defaults (FeatureConfig's sample rate and duration).
SAMPLE_RATE = 22050
DURATION = 30.0
AUDIO = (".wav", ".ogg", ".flac", ".mp3")


def naive_recipe(y: np.ndarray, sr: int = SAMPLE_RATE) -> dict[str, np.ndarray]:
    """The six views of one clip, the straightforward way."""
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


def main(audio_dir: str, out: str) -> None:
    import pickle
    from pathlib import Path

    import librosa

    rows = []
    for path in sorted(p for p in Path(audio_dir).rglob("*") if p.suffix.lower() in AUDIO):
        y, sr = librosa.load(str(path), sr=SAMPLE_RATE, mono=True, duration=DURATION)
        rows.append({"path": str(path), "label": path.parent.name,
                     "features": naive_recipe(y, sr)})
    with open(out, "wb") as fh:
        pickle.dump(rows, fh)
    print(f"{len(rows)} clips", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    main(sys.argv[1], sys.argv[2])
