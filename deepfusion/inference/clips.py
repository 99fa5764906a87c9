"""A model over clips: the logits of every non-overlapping segment, averaged per clip.

Train (validation and test), evaluate and predict all classify clips through
:func:`predict_clips`, so a clip gets the same answer whichever stage asks. Under torchrun
train splits the clips over the processes and gathers their answers (``shard``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from deepfusion.data.dataset import eval_segments, make_torch_dataset
from deepfusion.io.featureset import FeatureSet
from deepfusion.metrics import log_loss, softmax
from deepfusion.runtime import ddp
from deepfusion.runtime.device import autocast_for, to_device


@dataclass
class ClipPredictions:
    """Per-clip outputs of a model over all non-overlapping segments of each clip."""

    clips: np.ndarray           # (n,) clip indices into the FeatureSet
    logits: np.ndarray          # (n, n_classes) mean of segment logits
    attention: np.ndarray       # (n, modalities) mean modality attention
    segment_correct: int
    segment_total: int
    embeddings: Optional[np.ndarray] = None   # (n, d) mean classifier input, when asked

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    def probabilities(self) -> np.ndarray:
        """Softmax of the mean logits, shape (n, n_classes)."""
        return softmax(self.logits)


@torch.inference_mode()
def predict_clips(model: torch.nn.Module, fs: FeatureSet, norm: dict, clips: np.ndarray, *,
                  seg: int, batch_size: int = 64, device: torch.device = torch.device("cpu"),
                  amp: Union[bool, str] = False, labels: Optional[np.ndarray] = None,
                  shard: bool = False, embeddings: bool = False) -> ClipPredictions:
    """Mean logits and attention over all non-overlapping segments of each clip.

    ``amp``: the precision (``fp32``, ``bf16``, ``fp16``, or a bool as
    :func:`~deepfusion.runtime.device.autocast_for` reads it). ``labels`` (default the FeatureSet's)
    only serve the segment-level accuracy. ``shard``:
    in a torchrun group (:mod:`deepfusion.runtime.ddp`; every process calls, with the same ``clips``)
    each process predicts its share of the clips and every process returns all of them, the
    same on every process. ``embeddings``: also the mean fused embedding of each clip (the
    classifier's input; not with ``shard``).
    """
    if shard and ddp.world_size() > 1:
        part = predict_clips(model, fs, norm, ddp.shard(np.asarray(clips)), seg=seg,
                             batch_size=batch_size, device=device, amp=amp, labels=labels)
        parts = ddp.gather((torch.from_numpy(part.clips), torch.from_numpy(part.logits),
                            torch.from_numpy(part.attention), part.segment_correct,
                            part.segment_total))
        c, lg, att = (ddp.unshard([p[i].numpy() for p in parts]) for i in range(3))
        return ClipPredictions(c, lg, att, sum(p[3] for p in parts), sum(p[4] for p in parts))
    labels = fs.labels if labels is None else labels
    seg_clips, starts = eval_segments(clips, fs.n_frames, seg)
    ds = make_torch_dataset(fs, norm, seg_clips, seg=seg, starts=starts)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    position = {int(c): i for i, c in enumerate(clips)}
    n_classes = model.classifier.out_features
    logit_sum = np.zeros((len(clips), n_classes), np.float64)
    att_sum = np.zeros((len(clips), len(model.keys)), np.float64)   # (n, views)
    emb_sum = None
    count = np.zeros(len(clips), np.int64)
    correct = total = 0
    model.eval()
    for x, _, c in loader:
        x = {k: to_device(v, device) for k, v in x.items()}
        with autocast_for(device, amp):
            out = model(x)
        logits = out["logits"].float().cpu().numpy()
        att = out["attention"].float().cpu().numpy()
        rows = np.array([position[int(i)] for i in c])
        np.add.at(logit_sum, rows, logits)
        np.add.at(att_sum, rows, att)
        if embeddings:
            emb = out["embedding"].float().cpu().numpy()
            if emb_sum is None:
                emb_sum = np.zeros((len(clips), emb.shape[1]), np.float64)
            np.add.at(emb_sum, rows, emb)
        np.add.at(count, rows, 1)
        truth = labels[c.numpy()]
        known = truth >= 0
        correct += int((logits.argmax(1)[known] == truth[known]).sum())
        total += int(known.sum())
    count = np.maximum(count, 1)[:, None]
    return ClipPredictions(np.asarray(clips), (logit_sum / count).astype(np.float32),
                           (att_sum / count).astype(np.float32), correct, total,
                           None if emb_sum is None else (emb_sum / count).astype(np.float32))


def clip_loss(pred: ClipPredictions, labels: np.ndarray) -> float:
    """Cross-entropy of the mean clip logits against ``labels`` (indexed by clip)."""
    return log_loss(pred.probabilities(), labels[pred.clips])
