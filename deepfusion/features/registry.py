"""The functions the rows of :data:`deepfusion.views.VIEWS` name, by ``"module:function"``
(the registry itself is plain data at the top layer; the functions live here, in features/)."""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Callable


@lru_cache(maxsize=None)
def view_function(path: str) -> Callable:
    """The function a registry row names: ``"package.module:function"``."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
