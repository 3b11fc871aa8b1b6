"""Detection evaluation: one-to-one matching, labelled-only rules, AP x recall vs brute force."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from dkd_ray.eval import Detections, evaluate_detection
from dkd_ray.eval.boxes import pairwise_iou
from tests.eval_fixtures import build_annotations, build_detections

GT1, GT2 = (0, 0, 10, 10), (5, 0, 15, 10)
D1, D2 = (1, 0, 11, 10), (2, 0, 12, 10)


def test_rule_one_to_one_matching():
    # IoU: D1-GT1 0.818, D1-GT2 0.429; D2-GT1 0.667, D2-GT2 0.538.
    # (GT1, D1): each the other's best -> match. D2's best box is GT1, already D1's -> D2 is a
    # false positive although IoU(D2, GT2) >= 0.5; GT2 stays unmatched.
    # Recall 1/2; ranking D1 (0.9, TP), D2 (0.8, FP) -> sklearn AP 1 -> AP 1 x 1/2 = 0.5.
    # (Greedy/Hungarian matching would pair D2-GT2: recall 1, AP 1.)
    np.testing.assert_allclose(pairwise_iou([GT1, GT2], [D1, D2]), [[9 / 11, 8 / 12], [6 / 14, 7 / 13]])
    ann = build_annotations("prw", [dict(name="a", boxes=[(*GT1, 1), (*GT2, 2)])], [])
    dets = build_detections(ann, {"a": [(D1, 0.9, 0.0), (D2, 0.8, 0.0)]})
    assert evaluate_detection(ann, dets) == {"det/ap": pytest.approx(0.5), "det/recall": pytest.approx(0.5)}


def test_duplicate_detection_of_one_person_is_a_false_positive():
    # Two detections on GT1 alone: the better-overlapping one (D1, score 0.8) matches; D2
    # (score 0.9) is a false positive ranked first -> precision 1/2 at the TP: AP 0.5, recall 1.
    ann = build_annotations("prw", [dict(name="a", boxes=[(*GT1, 1)])], [])
    dets = build_detections(ann, {"a": [(D1, 0.8, 0.0), (D2, 0.9, 0.0)]})
    assert evaluate_detection(ann, dets) == {"det/ap": pytest.approx(0.5), "det/recall": pytest.approx(1.0)}


def labelled_case():
    images = [
        dict(name="a", boxes=[(0, 0, 50, 100, 1), (100, 0, 150, 100, -1)]),
        dict(name="b", boxes=[(0, 0, 50, 100, -1)]),  # nobody labelled
        dict(name="c", boxes=[(0, 0, 50, 100, 2)]),
        dict(name="t", boxes=[(0, 0, 50, 100, 0)], split="train"),
    ]
    ann = build_annotations("prw", images, [])
    dets = build_detections(ann, {
        "a": [((0, 0, 50, 100), 0.9, 0.0), ((100, 0, 150, 100), 0.95, 0.0)],
        "b": [((0, 0, 50, 100), 0.99, 0.0)],
        "c": [((200, 0, 250, 100), 0.6, 0.0), ((0, 0, 50, 100), 0.4, 0.0)],
        "t": [((0, 0, 50, 100), 0.9, 0.0)],  # training images are not evaluated
    })
    return ann, dets


def test_labelled_only_skips_images_without_labelled_people_and_counts_unlabelled_hits_as_fp():
    # Labelled gts: a/person 1, c/person 2. Image b (no labelled person) is skipped with its 0.99
    # detection. Kept (score >= 0.5): a 0.95 (unlabelled person: FP), a 0.9 (TP), c 0.6 (FP);
    # c's hit on person 2 scores 0.4 and is dropped. Recall 1/2; ranking FP, TP, FP ->
    # sklearn AP 1/2 -> AP 0.25.
    ann, dets = labelled_case()
    assert evaluate_detection(ann, dets, labelled_only=True) == {
        "det/labelled/ap": pytest.approx(0.25), "det/labelled/recall": pytest.approx(0.5)}
    # All people: gts a1, a2, b1, c1 = 4; TPs a 0.95, a 0.9, b 0.99; c 0.6 FP.
    # Ranking 0.99 TP, 0.95 TP, 0.9 TP, 0.6 FP -> sklearn AP 1 -> AP = recall = 3/4.
    assert evaluate_detection(ann, dets) == {"det/ap": pytest.approx(0.75), "det/recall": pytest.approx(0.75)}


def test_score_threshold_is_applied():
    # Threshold 0.3 keeps c's 0.4 hit on person 2: all people recall 1, ranking TP TP TP FP TP
    # -> sklearn AP (1 + 1 + 1 + 4/5) / 4 = 0.95.
    ann, dets = labelled_case()
    m = evaluate_detection(ann, dets, score_threshold=0.3)
    assert m["det/recall"] == pytest.approx(1.0)
    assert m["det/ap"] == pytest.approx(0.95)


def brute_force(ann, dets, score_threshold=0.5, iou_threshold=0.5, labelled_only=False):
    """The reference rules as plain loops over images, boxes and detections."""
    y_true, y_score, count_gt, count_tp = [], [], 0, 0
    for i in range(len(ann.images)):
        if ann.images.split[i] != "test":
            continue
        gt = ann.images.boxes_of(i)
        if labelled_only:
            gt = gt[ann.images.pids_of(i) >= 0]
            if len(gt) == 0:
                continue
        rows = [r for r in range(dets.offsets[i], dets.offsets[i + 1]) if dets.scores[r] >= score_threshold]
        count_gt += len(gt)
        if not rows:
            continue
        iou = pairwise_iou(gt, dets.boxes[rows])
        for j, r in enumerate(rows):
            tp = False
            for g in range(len(gt)):
                if iou[g, j] >= iou_threshold and np.argmax(iou[:, j]) == g and np.argmax(iou[g, :]) == j:
                    tp = True
                    count_tp += 1
            y_true.append(tp)
            y_score.append(dets.scores[r])
    recall = count_tp / count_gt
    return average_precision_score(y_true, y_score) * recall, recall


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("labelled_only", [False, True])
def test_matches_brute_force_on_random_scenes(seed, labelled_only):
    rng = np.random.default_rng(seed)
    images, per_image = [], []
    for i in range(30):
        n = int(rng.integers(1, 6))
        xy = rng.uniform(0, 300, (n, 2))
        wh = rng.uniform(20, 80, (n, 2))
        pid = np.where(rng.random(n) < 0.5, rng.integers(1, 9, n), -1)
        boxes = np.concatenate([xy, xy + wh], axis=1)
        images.append(dict(name=f"i{i}", boxes=[(*b, int(p)) for b, p in zip(boxes, pid)],
                           split="test" if i < 25 else "train"))
        # detections: jittered copies of some people, plus clutter
        det = [b + rng.normal(0, 6, 4) for b in boxes for _ in range(rng.integers(0, 3))]
        det += [np.concatenate([p, p + rng.uniform(20, 80, 2)]) for p in rng.uniform(0, 300, (2, 2))]
        per_image.append(np.array(det, np.float32))
    ann = build_annotations("prw", images, [])
    dets = Detections.from_lists(list(range(30)), per_image, [rng.uniform(0, 1, len(d)) for d in per_image],
                                 [np.zeros((len(d), 2)) for d in per_image], num_images=30)
    ap, recall = brute_force(ann, dets, labelled_only=labelled_only)
    prefix = "det/labelled" if labelled_only else "det"
    m = evaluate_detection(ann, dets, labelled_only=labelled_only)
    assert 0 < recall < 1
    assert m[f"{prefix}/recall"] == pytest.approx(recall)
    assert m[f"{prefix}/ap"] == pytest.approx(ap)
