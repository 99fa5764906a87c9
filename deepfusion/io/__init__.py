"""Everything that touches disk: atomic writes and locks, the restricted unpickler, features
files, the feature store and the cache, and the checks that keep outputs off inputs.

Submodules are imported by name (``from deepfusion.io.store import open_store``); this package
imports nothing, so importing one of them stays light.
"""
