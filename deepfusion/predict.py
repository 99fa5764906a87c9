"""Genre predictions for new audio files, computed exactly as training computed features.

The checkpoint carries the :class:`FeatureConfig` and normalisation of its training data, so a
file is decoded and analysed with the same code and settings as ``extract`` used. A file longer
than the training clip is covered by consecutive clip-length windows (the last one aligned to
the end of the file, see :func:`deepfusion.audio.decode_windows`), each cut into the same non-overlapping segments as evaluation; the logits
of all segments are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Union

import numpy as np

from .audio import AUDIO_EXTENSIONS, decode_windows, discover
from .checkpoint import (feature_config_of, load_checkpoint, model_from_checkpoint,
                         normalization_of, runtime_of)
from .config import TrainConfig
from .data import segment_frames, segments_per_clip
from .errors import AudioError, DatasetError
from .inference import predict_clips
from .io.featureset import FeatureSet
from .metrics import softmax
from .runtime import resolve_device, use_amp


@dataclass
class Prediction:
    """Top genres of one file."""

    path: str
    top: list[tuple[str, float]]       # (genre, probability), most probable first
    windows: int                       # clip-length windows analysed
    segments: int                      # segments whose logits were averaged
    seconds: float                     # length of the decoded file

    def to_dict(self) -> dict:
        return {"path": self.path, "top": [{"genre": g, "probability": round(p, 6)} for g, p in self.top],
                "windows": self.windows, "segments": self.segments, "seconds": round(self.seconds, 3)}


class Predictor:
    """A checkpoint loaded once, ready to classify any number of files."""

    def __init__(self, checkpoint: Path, *, device: str = "auto", batch_size: int = 64):
        self.ckpt = load_checkpoint(Path(checkpoint))
        self.class_names = list(self.ckpt["class_names"])
        self.feature_config = feature_config_of(self.ckpt)
        self.norm = normalization_of(self.ckpt)
        self.train_config = TrainConfig.from_dict(self.ckpt["train_config"])
        self.device = resolve_device(device)
        self.amp = use_amp(runtime_of(self.ckpt).amp, self.device)
        self.model = model_from_checkpoint(self.ckpt).to(self.device)
        self.batch_size = batch_size

    def iter_window_features(self, path: Path) -> Iterator[tuple[float, dict[str, np.ndarray]]]:
        """``(file seconds, six views)`` of each clip-length window of ``path``, one at a time.

        The first window is decoded and analysed exactly as ``extract`` does it (same bytes);
        later windows the same way.
        """
        from threadpoolctl import threadpool_limits

        from .features import compute_features

        cfg = self.feature_config
        for _, seconds, y in decode_windows(Path(path), sr=cfg.sample_rate,
                                            duration=cfg.duration, min_duration=cfg.min_duration):
            with threadpool_limits(limits=1):   # as extract does: identical numbers
                feats = compute_features(y, cfg)
            yield seconds, feats

    def predict_file(self, path: Path, *, top_k: int = 3) -> Prediction:
        """Top-k genres of one file. Raises :class:`AudioError` for unreadable files.

        Windows are classified as they are decoded, so memory holds one window whatever the
        file's length.
        """
        logit_sum, windows, segments, seconds = None, 0, 0, 0.0
        for seconds, feats in self.iter_window_features(path):
            fs = FeatureSet({k: v[None] for k, v in feats.items()}, np.full(1, -1, np.int64),
                            self.class_names, [str(path)], np.zeros(1, np.int64))
            seg = segment_frames(self.train_config.segment_seconds, self.feature_config, fs.n_frames)
            pred = predict_clips(self.model, fs, self.norm, np.arange(1), seg=seg,
                                 batch_size=self.batch_size, device=self.device, amp=self.amp)
            logit_sum = pred.logits[0] if logit_sum is None else logit_sum + pred.logits[0]
            windows += 1
            segments += segments_per_clip(fs.n_frames, seg)
        p = softmax((logit_sum / windows)[None])[0]
        order = np.argsort(-p)[:max(1, top_k)]
        return Prediction(str(path), [(self.class_names[i], float(p[i])) for i in order],
                          windows, segments, seconds)


def expand_inputs(inputs: Iterable[Path]) -> list[Path]:
    """Files as given, and the audio files under each folder (sorted)."""
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            try:
                files += [it.path for it in discover(p)]
            except DatasetError:
                files.append(p)   # reported as "no audio files" by predict
        else:
            files.append(p)
    return files


def predict(inputs: Iterable[Union[str, Path]], *, checkpoint: Path, top_k: int = 3,
            device: str = "auto") -> Iterator[Union[Prediction, tuple[str, str]]]:
    """Yield a :class:`Prediction` per readable file, or ``(path, reason)`` for the others."""
    predictor = Predictor(checkpoint, device=device)
    for path in expand_inputs(inputs):
        if path.is_dir():
            yield str(path), f"no audio files ({', '.join(AUDIO_EXTENSIONS)})"
            continue
        try:
            yield predictor.predict_file(path, top_k=top_k)
        except AudioError as exc:
            yield str(path), exc.reason
        except Exception as exc:  # noqa: BLE001 - one odd file must not end the batch
            yield str(path), f"feature computation failed ({type(exc).__name__}: {exc})"
