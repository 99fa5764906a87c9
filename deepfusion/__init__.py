"""deepfusion: multi-modal music-genre classification from raw audio.

Each stage is a function in the module of the same name (a notebook calls it with the CLI's
arguments); the configs and helpers below are importable from here without loading torch or
librosa until used::

    from deepfusion import FeatureConfig, TrainConfig
    from deepfusion.extract import extract
    from deepfusion.train import train
    from deepfusion.evaluate import evaluate
    from deepfusion.predict import predict
    from deepfusion.tag import tag

    extract("data/synth", out="data/features.pkl", config=FeatureConfig())
    train("data/features.pkl", model_dir="models", backbone="light", pretrained=False)
    report = evaluate("models/best.pth")
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "FeatureConfig": "config",
    "FEATURE_KEYS": "views",
    "DeepFusionError": "errors",
    "compute_features": "features.numpy_views",
    "decode": "audio",
    "discover": "audio",
    "ExtractResult": "extract",
    "read_features_file": "io.features_file",
    "synthesize_dataset": "synth",
    "TrainConfig": "config",
    "ModelConfig": "config",
    "Library": "inference.library",
    "Embeddings": "embed",
    "Tagger": "tag",
    "ALL_KEYS": "views",
    "load_checkpoint": "models.checkpoint",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'deepfusion' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
