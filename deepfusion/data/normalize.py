"""Per-row normalisation of every view, fitted on the training clips only (streamed, so a
memory-mapped collection is never loaded whole)."""

from __future__ import annotations

import numpy as np

from deepfusion.io.featureset import FeatureSet
from deepfusion.views import VIEWS

#: Per view, the smallest standard deviation a row is normalised by, as a fraction of the
#: view's mean row deviation. The pretrained view's rows include tags that are near zero on a
#: whole collection (deviation 1e-4 or less): divided by that, the slightest change on another
#: recording (another codec, say) became hundreds of deviations and swung the network's
#: answer; floored, it is a few. The hand-made views keep their plain floor (1e-5).
RELATIVE_STD_FLOOR = {v.name: v.std_floor for v in VIEWS if v.std_floor}


class RunningNormalization:
    """Per-row sums of each view over the clips (or windows) added so far: the statistics of
    :func:`fit_normalization`, gathered a batch at a time (a library larger than memory)."""

    def __init__(self):
        self.total: dict[str, np.ndarray] = {}
        self.sq: dict[str, np.ndarray] = {}
        self.count: dict[str, int] = {}

    def add(self, views: dict[str, np.ndarray]) -> None:
        """Add clips: ``{key: (n, rows, frames)}`` or one clip ``{key: (rows, frames)}``."""
        for k, arr in views.items():
            x = np.asarray(arr, np.float64)
            x = x.reshape(-1, *x.shape[-2:]).transpose(1, 0, 2).reshape(x.shape[-2], -1)
            if k not in self.total:
                self.total[k] = np.zeros(x.shape[0], np.float64)
                self.sq[k] = np.zeros(x.shape[0], np.float64)
                self.count[k] = 0
            self.total[k] += x.sum(axis=1)
            self.sq[k] += (x * x).sum(axis=1)
            self.count[k] += x.shape[1]

    def result(self) -> dict[str, dict[str, np.ndarray]]:
        """``{key: {'mean': (rows,), 'std': (rows,)}}`` (float32; std floored at 1e-5, and at
        :data:`RELATIVE_STD_FLOOR` of the view's mean row deviation)."""
        stats = {}
        for k, total in self.total.items():
            count = max(1, self.count[k])
            mean = total / count
            std = np.sqrt(np.maximum(self.sq[k] / count - mean * mean, 0.0))
            floor = max(1e-5, RELATIVE_STD_FLOOR.get(k, 0.0) * float(std.mean()) if std.size else 0.0)
            stats[k] = {"mean": mean.astype(np.float32),
                        "std": np.maximum(std, floor).astype(np.float32)}
        return stats


def fit_normalization(fs: FeatureSet, indices: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Per-row mean and standard deviation of each view over the clips ``indices`` only.

    Returns ``{key: {'mean': (rows,), 'std': (rows,)}}`` (float32; std floored at 1e-5).
    """
    running = RunningNormalization()
    for i in indices:                    # one clip at a time: no copy of the train set
        running.add({k: arr[i] for k, arr in fs.arrays.items()})
    if not len(indices):
        running.add({k: arr[:0] for k, arr in fs.arrays.items()})
    return running.result()
