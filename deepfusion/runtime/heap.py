"""A feature worker's own memory: the C allocator's thresholds and Python's collector, set once
per process by :func:`deepfusion.jobs.job.warm_up`, after its imports and before its first
file, in the processes deepfusion owns (:func:`claim`): the ``deepfusion`` command's own
(``--jobs 1`` extracts there) and the local workers it starts. A program that calls the Python
API keeps its process as it was.

A clip's views pass through a few dozen arrays of 1-20 MB (spectrograms, masks, their mel
projections). glibc serves each block over its mmap threshold with fresh pages from the
kernel and gives them back when the block is freed, so every clip faulted them in again:
about 200,000 page faults and a quarter of the CPU time in the kernel for twelve clips. With
the threshold at 32 MiB and freed memory kept up to 256 MiB, a worker reuses its blocks from
one clip to the next: 111,000 page faults, and ``--jobs 1`` took 3.80 s instead of 4.46 (the
medians of 5 runs, docs/features.md). The settings are glibc's documented ``mallopt``
parameters. Where the environment tunes the allocator itself (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` or a ``glibc.malloc.*`` tunable: a user's choice, or a Dask
worker's, whose nanny sets the trim threshold low to hand memory back) it is left as it is;
on another C library nothing changes.

The imports leave a few hundred thousand objects that live as long as the process. Python's
full collections walk them all, and so does the final one when the process ends (0.1-0.3 s
for librosa and scipy's modules); :func:`gc.freeze` moves them out of the collector's sight.
"""

from __future__ import annotations

import gc
import os
import platform

_claimed = False


def claim() -> None:
    """Say that this process is deepfusion's own: the command's (:func:`deepfusion.__main__.run`)
    or a local worker's (the pool's initializer, :mod:`deepfusion.runtime.pool`)."""
    global _claimed
    _claimed = True


def claimed() -> bool:
    """Whether :func:`claim` was called in this process."""
    return _claimed


#: glibc's ``mallopt`` parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap and are reused: the cap of glibc's own moving
#: threshold on a 64-bit machine (``DEFAULT_MMAP_THRESHOLD_MAX``), above any one array of a
#: 30-s clip.
MMAP_THRESHOLD = 32 << 20
#: Freed memory at the heap's top is given back to the kernel only past this much.
TRIM_THRESHOLD = 256 << 20

#: The environment's names for them: either set, the allocator is the environment's.
ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def environment_sets_allocator() -> bool:
    """Whether the environment tunes glibc's allocator itself: :data:`ENV_VARS`, or any
    ``glibc.malloc.*`` tunable in ``GLIBC_TUNABLES`` (the newer way to say the same)."""
    return (any(v in os.environ for v in ENV_VARS)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))


def keep_large_blocks() -> bool:
    """Set glibc's mmap and trim thresholds (above); True when they were set. Does nothing
    (False) where the environment tunes the allocator (:func:`environment_sets_allocator`) or
    the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc" or environment_sets_allocator():
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)


def freeze_imports(*, collect: bool = False) -> None:
    """Move every object the collector tracks now (the imports', a warmed-up worker's) to the
    permanent generation: later collections, and the one at exit, skip them. Garbage that
    exists at this moment would never be collected, so this runs once per process, right
    after the imports, and ``collect`` first collects it: after a warm-up that compiled
    numba's functions (a cold cache), which leaves some 70,000 objects of garbage. After one
    that loaded them from the cache there are a handful, not worth a full collection (0.1 s
    of a twelve-clip run here)."""
    if collect:
        gc.collect()
    gc.freeze()
