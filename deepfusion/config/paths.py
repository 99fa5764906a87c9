"""Where the stages read and write when not told otherwise (relative to the working folder)."""

from __future__ import annotations

from pathlib import Path

#: Where the stages read and write when not told otherwise (relative to the working folder).
DEFAULT_FEATURES = Path("data/features.pkl")


DEFAULT_STORE = Path("data/features.store")


DEFAULT_CACHE_DIR = Path("data/cache")


DEFAULT_MODEL_DIR = Path("models")
