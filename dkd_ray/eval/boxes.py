"""Box overlap in numpy, with the person-search protocols' conventions.

IoU here has no "+1" pixel convention (as in the OIM/SeqNet/COAT evaluation code) and is computed
in float64 so that a threshold at exactly 0.5 is decided the same way as the reference's Python
floats. torchvision's ``box_iou`` would do the same maths but needs tensors; evaluation stays numpy.
"""

from __future__ import annotations

import numpy as np


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``a[i]`` with ``b[i]`` for each row: ``[N, 4]`` x ``[N, 4]`` -> float64 ``[N]``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    inter_w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0.0, None)
    inter_h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0.0, None)
    inter = inter_w * inter_h
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union -= inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [N, 4] with every box of ``b`` [M, 4] -> float64 [N, M]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    n, m = len(a), len(b)
    return paired_iou(np.repeat(a, m, axis=0), np.tile(b, (n, 1))).reshape(n, m)


def search_iou_threshold(gt_boxes: np.ndarray) -> np.ndarray:
    """Per ground-truth box ``[x1 y1 x2 y2]``: ``min(0.5, w*h / ((w+10)*(h+10)))``.

    Small people get a looser threshold (docs/EVALUATION.md, search rule 4).
    """
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    w = gt[:, 2] - gt[:, 0]
    h = gt[:, 3] - gt[:, 1]
    return np.minimum(0.5, (w * h) / ((w + 10.0) * (h + 10.0)))


def expand_ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the index ranges ``[starts[i], starts[i] + lengths[i])`` without a Python loop.

    Returns ``(indices, owner)``: the flat indices and, for each, the ``i`` it came from. This is
    the CSR gather used everywhere here (detections of a list of images, gt x det pairs, ...).
    """
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    if total == 0:
        return np.zeros(0, np.int64), owner
    first = np.cumsum(lengths) - lengths  # position where each range begins in the output
    indices = np.arange(total, dtype=np.int64) - first[owner] + starts[owner]
    return indices, owner
