"""Detection evaluation over the gallery (test) images, as OIM/SeqNet/COAT ``eval_detection``.

Per image, with detections ``score >= score_threshold``: a detection and a ground-truth box are
matched when their IoU is >= ``iou_threshold`` *and* the box is the detection's most-overlapping
box *and* the detection is the box's most-overlapping detection (first index on ties, like
``np.argmax``). Recall = matched boxes / all boxes; AP = scikit-learn's average precision of all
detections ranked by score (matched = positive) times that recall.

``labelled_only``: only labelled people (pid >= 0) are ground truth; images without any are left
out entirely, their detections included (as the reference code does); detections of unlabelled
people count as false positives.
"""

from __future__ import annotations

import numpy as np

from dkd_ray.data.annotations import Annotations
from dkd_ray.eval.arrays import Detections
from dkd_ray.eval.average_precision import average_precision
from dkd_ray.eval.boxes import expand_ranges, paired_iou


def evaluate_detection(
    annotations: Annotations,
    detections: Detections,
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
    labelled_only: bool = False,
) -> dict[str, float]:
    """Returns ``{"det/ap", "det/recall"}``, or ``{"det/labelled/ap", "det/labelled/recall"}``.

    ``score_threshold`` 0.5 is the OIM default; SeqNet and COAT pass 0.01 for the detection
    numbers (their models already drop boxes below their own test threshold).
    """
    images = annotations.images
    if detections.num_images != len(images):
        raise ValueError(f"detections index {detections.num_images} images but the image table "
                         f"has {len(images)}")
    test = images.indices("test")
    gt_start, gt_count = images.box_offsets[test], np.diff(images.box_offsets)[test]
    gt_rows, gt_image = expand_ranges(gt_start, gt_count)  # gt_image: position in ``test``
    if labelled_only:
        labelled = images.pids[gt_rows] >= 0
        gt_rows, gt_image = gt_rows[labelled], gt_image[labelled]
        # Images with no labelled person are skipped, detections and all.
        used = np.zeros(len(test), bool)
        used[gt_image] = True
        test = test[used]
        remap = np.cumsum(used) - 1
        gt_image = remap[gt_image]
    num_gt = len(gt_rows)
    if num_gt == 0:
        raise ValueError("no ground-truth boxes in the test images"
                         + (" with labelled people" if labelled_only else ""))

    kept = detections.scores >= score_threshold
    det_start = detections.offsets[test]
    det_rows, det_image = expand_ranges(det_start, detections.offsets[test + 1] - det_start)
    keep = kept[det_rows]
    det_rows, det_image = det_rows[keep], det_image[keep]

    # Every (gt, detection) pair of the same image, gt-major.
    det_first = np.searchsorted(det_image, np.arange(len(test)))
    det_per_image = np.bincount(det_image, minlength=len(test))
    # pair_det: position in det_rows; pair_gt: position in gt_rows
    pair_det, pair_gt = expand_ranges(det_first[gt_image], det_per_image[gt_image])
    iou = paired_iou(images.boxes[gt_rows[pair_gt]], detections.boxes[det_rows[pair_det]])

    best_gt_of_det = _first_argmax(pair_det, pair_gt, iou)  # the det's most-overlapping gt
    best_det_of_gt = _first_argmax(pair_gt, pair_det, iou)  # the gt's most-overlapping det
    matched = (iou >= iou_threshold) & (best_gt_of_det[pair_det] == pair_gt) & (best_det_of_gt[pair_gt] == pair_det)
    det_is_tp = np.zeros(len(det_rows), bool)
    det_is_tp[pair_det[matched]] = True

    recall = matched.sum() / num_gt
    ap = average_precision(det_is_tp, detections.scores[det_rows]) * recall if len(det_rows) else 0.0
    prefix = "det/labelled" if labelled_only else "det"
    return {f"{prefix}/ap": float(ap), f"{prefix}/recall": float(recall)}


def _first_argmax(group: np.ndarray, member: np.ndarray, value: np.ndarray) -> np.ndarray:
    """For each group id, the member with the largest value (lowest member id on ties), as a
    dense array indexed by group id (-1 for groups without members)."""
    size = int(group.max()) + 1 if len(group) else 0
    best = np.full(size, -1, np.int64)
    if len(group) == 0:
        return best
    order = np.lexsort((member, -value, group))
    g = group[order]
    first = np.ones(len(g), bool)
    first[1:] = g[1:] != g[:-1]
    best[g[first]] = member[order][first]
    return best
