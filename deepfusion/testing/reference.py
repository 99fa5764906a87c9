"""The textbook computation of the six views: the oracle that :func:`compute_features` is
tested against (``tests/test_features.py``) and measured against
(``benchmarks/extract_speed.py``). Slow, and never on the extract path."""

from __future__ import annotations

import librosa
import numpy as np

from deepfusion.config import FeatureConfig


def reference_features(y: np.ndarray, config: FeatureConfig = FeatureConfig()) -> dict[str, np.ndarray]:
    """The definitions of :func:`deepfusion.features.numpy_views.compute_features` computed with plain
    librosa calls, one call per view (HPSS of the complex STFT, mel of each part, MFCC of the
    original's dB mel, chroma of the power STFT, tempogram of the onset strength)."""
    sr = config.sample_rate
    D = librosa.stft(y, n_fft=config.n_fft, hop_length=config.hop_length)
    H, P = librosa.decompose.hpss(D, kernel_size=config.hpss_kernel, power=config.hpss_power,
                                  margin=config.hpss_margin)
    def mel_db(X):
        M = librosa.feature.melspectrogram(S=np.abs(X) ** 2, sr=sr, n_fft=config.n_fft,
                                           n_mels=config.n_mels, fmin=config.fmin,
                                           fmax=config.fmax)
        return librosa.power_to_db(M, ref=np.max, top_db=config.top_db)
    db_orig = mel_db(D)
    out = {
        "mel_spec_orig": db_orig,
        "mel_spec_harm": mel_db(H),
        "mel_spec_perc": mel_db(P),
        "mfcc": librosa.feature.mfcc(S=db_orig, n_mfcc=config.n_mfcc),
        "chroma": librosa.feature.chroma_stft(S=np.abs(D) ** 2, sr=sr, n_fft=config.n_fft,
                                              n_chroma=config.n_chroma,
                                              tuning=config.chroma_tuning),
        "tempogram": librosa.feature.tempogram(
            onset_envelope=librosa.onset.onset_strength(y=y, sr=sr,
                                                        hop_length=config.hop_length,
                                                        n_fft=config.n_fft),
            sr=sr, hop_length=config.hop_length, win_length=config.tempogram_win_length),
    }
    return {k: v.astype(np.float32) for k, v in out.items()}
