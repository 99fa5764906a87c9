"""The train layer: the train stage (:mod:`run`), one epoch (:mod:`loop`), the auto recipe and
resume rules (:mod:`recipe`), a model started from another (:mod:`finetune`), when a run's files
are written (:mod:`run_writer`) and ``train --folds`` (:mod:`crossval`).

``from deepfusion.train import train`` is the stage's documented place; it loads torch only
when asked for.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "train":
        from deepfusion.train.run import train

        return train
    raise AttributeError(f"module 'deepfusion.train' has no attribute {name!r}")
