"""deepfusion: multi-modal music-genre classification from raw audio.

The public API is importable from here without loading torch or librosa until it is used::

    from deepfusion import extract, FeatureConfig
    result = extract("data/synth", out="data/features.pkl")
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "FeatureConfig": "config",
    "FEATURE_KEYS": "config",
    "DeepFusionError": "errors",
    "compute_features": "features",
    "decode": "audio",
    "discover": "audio",
    "extract": "extract",
    "ExtractResult": "extract",
    "read_features_file": "cache",
    "synthesize_dataset": "synth",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'deepfusion' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
