"""Search protocols: one hand-computed case per rule, properties, and a brute-force reference.

Similarities are exact: the query embedding is e0 and a detection's embedding has dot product
``s`` with it (``sim_vector``), so every ranking below is written out by hand. "P" = the single
positive of a gallery image, "N" = a negative; AP = sklearn AP x count_tp / count_gt.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from dkd_ray.eval import Detections, evaluate_search
from dkd_ray.eval.boxes import paired_iou
from dkd_ray.eval.search import top_positions
from tests.eval_fixtures import A1, A2, QUERY, X, Y, build_annotations, build_detections, cuhk_case


def search(ann, dets, **kw):
    return evaluate_search(ann, dets, QUERY[None].repeat(len(ann.queries), 0), **kw)


def test_base_case_listed_gallery():
    # g3 candidates (query image q not listed): 0.9 P(a), 0.8 N(c), 0.7 N(b), 0.6 P(b), 0.3 N(a)
    # AP = (1/1 + 2/4) / 2 = 0.75; top-1 hit.
    ann, dets = cuhk_case()
    m = search(ann, dets, gallery_sizes=[3]).metrics
    assert m["cuhk_sysu/g3/mAP"] == pytest.approx(0.75)
    assert m["cuhk_sysu/g3/top1"] == 1.0
    assert m["cuhk_sysu/g3/num_queries"] == 1


def test_rule_score_threshold_drops_detections_before_search():
    # A 0.95-similar detection in c scoring 0.4 < 0.5 is dropped: AP stays 0.75, top-1 hit.
    # Kept (threshold 0.3): 0.95 N, 0.9 P, 0.8 N, 0.7 N, 0.6 P -> AP = (1/2 + 2/5)/2 = 0.45, top-1 miss.
    ann, dets = cuhk_case({"c": [(X, 0.9, 0.8), (Y, 0.4, 0.95)]})
    kept = search(ann, dets, gallery_sizes=[3], score_threshold=0.5).metrics
    assert kept["cuhk_sysu/g3/mAP"] == pytest.approx(0.75)
    assert kept["cuhk_sysu/g3/top1"] == 1.0
    loose = search(ann, dets, gallery_sizes=[3], score_threshold=0.3).metrics
    assert loose["cuhk_sysu/g3/mAP"] == pytest.approx(0.45)
    assert loose["cuhk_sysu/g3/top1"] == 0.0


def test_rule_no_detection_above_the_threshold_scores_zero_without_failing():
    # An untrained detector (a sweep's first epoch) may keep nothing: every query's AP is 0, the
    # queries still count, and each top list is empty.
    ann, dets = cuhk_case()
    result = search(ann, dets, gallery_sizes=[3], score_threshold=1.01)
    assert result.metrics["cuhk_sysu/g3/mAP"] == 0.0 and result.metrics["cuhk_sysu/g3/top1"] == 0.0
    assert result.metrics["cuhk_sysu/g3/num_queries"] == 1
    assert all((r.top_rows == -1).all() for r in result.protocols.values())


def small_and_large_case():
    """Query 0 seeks a small person (10x20 box), query 1 a large one (100x200); each gallery
    image holds one detection covering the top 40% of the person: IoU = 0.4 for both."""
    small, large = (0, 0, 10, 20), (0, 0, 100, 200)
    images = [
        dict(name="q0", boxes=[(*small, 1)]), dict(name="q1", boxes=[(*large, 2)]),
        dict(name="g0", boxes=[(*small, 1)]), dict(name="g1", boxes=[(*large, 2)]),
        dict(name="n", boxes=[(*X, -1)]),
    ]
    ann = build_annotations("cuhk_sysu", images, [("q0", small, 1), ("q1", large, 2)],
                            {2: ([["g0", "n"], ["g1", "n"]], [(0, "g0", small), (1, "g1", large)])})
    return ann, build_detections(ann, {"g0": [((0, 0, 10, 8), 0.9, 0.9)],
                                       "g1": [((0, 0, 100, 80), 0.9, 0.9)],
                                       "n": [(X, 0.9, 0.5)]})


def test_rule_small_person_iou_threshold():
    # Small: threshold min(0.5, 200/(20*30)) = 1/3 <= 0.4 -> positive, AP 1 (0.9 P, 0.5 N).
    # Large: min(0.5, 20000/(110*210)) = 0.5 > 0.4 -> no positive, AP 0. A fixed 0.5 gives 0 and 0.
    ann, dets = small_and_large_case()
    assert paired_iou([(0, 0, 10, 8)], [(0, 0, 10, 20)])[0] == pytest.approx(0.4)
    result = search(ann, dets, gallery_sizes=[2]).protocols["cuhk_sysu/g2"]
    np.testing.assert_allclose(result.ap, [1.0, 0.0])
    np.testing.assert_array_equal(result.count_tp, [1, 0])


def test_rule_single_positive_per_image_in_similarity_order():
    # Image a: two detections on A, IoU 0.6 at s=0.8 and IoU 0.55 at s=0.9; image c: N at 0.85.
    # Most similar qualifying one is the positive: 0.9 P, 0.85 N, 0.8 N -> AP 1, top-1 hit.
    # (Both positive: AP 5/6 * 2 > 1; highest-IoU one: 0.9 N, 0.85 N, 0.8 P -> AP 1/3, top-1 miss.)
    gt = (0, 0, 100, 100)
    high_iou, low_iou = (0, 0, 100, 60), (0, 0, 100, 55)
    images = [dict(name="q", boxes=[(*gt, 1)]), dict(name="a", boxes=[(*gt, 1)]), dict(name="c", boxes=[(*X, -1)])]
    ann = build_annotations("cuhk_sysu", images, [("q", gt, 1)], {2: ([["a", "c"]], [(0, "a", gt)])})
    dets = build_detections(ann, {"a": [(high_iou, 0.9, 0.8), (low_iou, 0.9, 0.9)], "c": [(X, 0.9, 0.85)]})
    result = search(ann, dets, gallery_sizes=[2]).protocols["cuhk_sysu/g2"]
    assert result.ap[0] == pytest.approx(1.0)
    assert result.first_rank[0] == 0
    np.testing.assert_array_equal(result.top_correct[0, :3], [True, False, False])
    assert result.count_tp[0] == 1


def test_rule_ap_scaled_by_recall_count_tp_over_count_gt():
    # A is in a (detected, 0.9) and in b, whose only detection (score 0.3) is dropped:
    # count_gt 2, count_tp 1. Candidates 0.9 P, 0.8 N -> sklearn AP 1, times 1/2 = 0.5.
    ann, dets = cuhk_case({"b": [(A2, 0.3, 0.6)]})
    result = search(ann, dets, gallery_sizes=[3]).protocols["cuhk_sysu/g3"]
    assert (result.count_gt[0], result.count_tp[0]) == (2, 1)
    assert result.ap[0] == pytest.approx(0.5)
    assert result.top_k(1) == 1.0


def test_rule_ap_zero_without_true_positive_and_counted_in_mean():
    # Query 1's positive image has no overlapping detection: AP exactly 0 (not NaN), top-k 0,
    # and it still counts: mAP = (1 + 0) / 2 = 0.5 over 2 queries.
    ann, dets = small_and_large_case()
    result = search(ann, dets, gallery_sizes=[2]).protocols["cuhk_sysu/g2"]
    assert result.ap[1] == 0.0 and result.count_gt[1] == 1
    assert result.first_rank[1] == -1
    assert result.metrics()["cuhk_sysu/g2/mAP"] == pytest.approx(0.5)
    assert result.metrics()["cuhk_sysu/g2/top10"] == pytest.approx(0.5)
    assert result.metrics()["cuhk_sysu/g2/num_queries"] == 2


def test_rule_full_set_adds_every_other_pool_image_as_negative_but_not_the_query_image():
    # Full set = a, b, c + d (pool, unlisted; N at 0.85); q (the query's own image, 0.99 and 0.2)
    # and the training image are left out: 0.9 P, 0.85 N, 0.8 N, 0.7 N, 0.6 P, 0.3 N
    # -> AP = (1 + 2/5)/2 = 0.7 (with q's 0.99 in: (1/2 + 2/6)/2 = 0.4167).
    ann, dets = cuhk_case()
    m = search(ann, dets).metrics
    assert m["cuhk_sysu/g3/mAP"] == pytest.approx(0.75)
    assert m["cuhk_sysu/full/mAP"] == pytest.approx(0.7)
    assert m["cuhk_sysu/full/top1"] == 1.0


def prw_case():
    """Query A in frame f0 (camera 1). A is also in f1 (camera 1) and f2 (camera 2);
    f3 (camera 2) and f4 (camera 1) hold other people."""
    images = [
        dict(name="f0", camera=1, boxes=[(*A1, 5), (*X, 9)]),
        dict(name="f1", camera=1, boxes=[(*A1, 5)]),
        dict(name="f2", camera=2, boxes=[(*A2, 5), (*X, -1)]),
        dict(name="f3", camera=2, boxes=[(*X, 9)]),
        dict(name="f4", camera=1, boxes=[(*X, -1)]),
        dict(name="tr", camera=2, boxes=[(*A1, 0)], split="train"),
    ]
    ann = build_annotations("prw", images, [("f0", A1, 5)])
    dets = build_detections(ann, {
        "f0": [(A1, 0.9, 1.0)],  # the query itself: must never be a candidate
        "f1": [(A1, 0.9, 0.9)],
        "f2": [(A2, 0.9, 0.6)],
        "f3": [(X, 0.9, 0.5)],
        "f4": [(X, 0.9, 0.95)],
        "tr": [(A1, 0.9, 0.97)],
    })
    return ann, dets


def test_rule_prw_query_frame_left_out():
    # All frames but f0: 0.95 N(f4), 0.9 P(f1), 0.6 P(f2), 0.5 N(f3); count_gt 2 (f1, f2)
    # -> AP = (1/2 + 2/3)/2 = 0.5833, top-1 miss, top-5 hit. (With f0: its 1.0 on top, or a 3rd gt.)
    ann, dets = prw_case()
    result = search(ann, dets, cross_camera=False).protocols["prw/all"]
    assert result.count_gt[0] == 2
    assert result.ap[0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert result.first_rank[0] == 1
    assert result.top_k(1) == 0.0 and result.top_k(5) == 1.0


def test_rule_prw_cross_camera_keeps_other_cameras_only():
    # Camera 2 only: 0.6 P(f2), 0.5 N(f3); count_gt 1 -> AP 1, top-1 hit.
    ann, dets = prw_case()
    m = search(ann, dets).metrics
    assert m["prw/cross_cam/mAP"] == pytest.approx(1.0)
    assert m["prw/cross_cam/top1"] == 1.0
    assert m["prw/all/mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_query_without_any_gallery_match_is_left_out_of_the_means():
    # Cross-camera search for a person seen by the query camera only: count_gt 0, no AP.
    ann, dets = prw_case()
    ann.images.pids[ann.images.box_offsets[2]] = 6  # A in f2 becomes someone else
    result = search(ann, dets, cross_camera=True).protocols["prw/cross_cam"]
    assert result.count_gt[0] == 0 and np.isnan(result.ap[0])
    assert result.metrics()["prw/cross_cam/num_queries"] == 0


def test_gallery_listing_an_image_twice_searches_it_once():
    # TestG4 lists b twice: candidates stay 0.9 P, 0.8 N, 0.7 N, 0.6 P, 0.3 N -> AP 0.75.
    ann, dets = cuhk_case()
    g = ann.galleries.pop(3)
    g.size, g.image_index = 4, np.array([[1, 2, 2, 3]])
    ann.galleries[4] = g
    assert search(ann, dets, gallery_sizes=[4]).metrics["cuhk_sysu/g4/mAP"] == pytest.approx(0.75)


def test_positive_outside_the_listed_gallery_is_an_error():
    ann, dets = cuhk_case(listed=("a", "c", "d"))  # b holds a positive but is not listed
    with pytest.raises(ValueError, match="does not list"):
        search(ann, dets, gallery_sizes=[3])


# ---- properties ---------------------------------------------------------------------------------
def perfect_world(dataset: str):
    """Every person detected exactly; embeddings one-hot per identity (unlabelled people each
    get their own direction): every protocol must score mAP 1 and top-1 1."""
    rng = np.random.default_rng(3)
    people, images, dets = 5, [], {}
    dim = 64
    basis = np.eye(dim, dtype=np.float32)
    stranger = people
    for i in range(16):
        pids = rng.choice(people, size=2, replace=False)
        boxes = [(10 + 60 * k, 20, 50 + 60 * k, 120, int(pids[k]) + 1) for k in range(2)]
        boxes.append((10, 130, 40, 190, -1))
        images.append(dict(name=f"im{i}", camera=1 + i % 3, boxes=boxes))
        dets[f"im{i}"] = [((x1, y1, x2, y2), 0.95, basis[pid - 1] if pid > 0 else basis[stranger + i])
                          for x1, y1, x2, y2, pid in boxes]
    queries, lists, positives = [], [], []
    for pid in range(1, people + 1):
        holders = [im for im in images if any(b[4] == pid for b in im["boxes"])]
        # Query in the first holder that shares a camera with nobody else holding pid... simply first.
        q_img = holders[0]
        box = next(b[:4] for b in q_img["boxes"] if b[4] == pid)
        queries.append((q_img["name"], box, pid))
        others = [im for im in images if im is not q_img]
        lists.append([im["name"] for im in others])
        for im in others:
            for b in im["boxes"]:
                if b[4] == pid:
                    positives.append((pid - 1, im["name"], b[:4]))
    galleries = {len(lists[0]): (lists, positives)} if dataset == "cuhk_sysu" else None
    ann = build_annotations(dataset, images, queries, galleries)
    det = Detections.from_lists(list(range(len(images))),
                                [np.array([d[0] for d in dets[im["name"]]]) for im in images],
                                [np.array([d[1] for d in dets[im["name"]]]) for im in images],
                                [np.array([d[2] for d in dets[im["name"]]]) for im in images],
                                num_images=len(images))
    return ann, det, basis[np.arange(people)]


@pytest.mark.parametrize("dataset", ["cuhk_sysu", "prw"])
def test_perfect_detections_and_embeddings_score_one(dataset):
    ann, dets, query_emb = perfect_world(dataset)
    results = evaluate_search(ann, dets, query_emb)
    for name, result in results.protocols.items():
        assert result.evaluated.sum() >= 1, name
        assert result.mean_ap() == pytest.approx(1.0), name
        assert result.top_k(1) == 1.0, name


def test_shuffling_gallery_order_changes_nothing():
    ann, dets, qe = random_world("cuhk_sysu", seed=5)
    base = evaluate_search(ann, dets, qe)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(dets))
    shuffled = Detections.from_arrays(dets.image_index[perm], dets.boxes[perm], dets.scores[perm],
                                      dets.embeddings[perm], num_images=dets.num_images)
    for g in ann.galleries.values():
        g.image_index = np.stack([rng.permutation(row) for row in g.image_index])
        order = rng.permutation(len(g.positive_query))
        g.positive_query, g.positive_image, g.positive_box = (
            g.positive_query[order], g.positive_image[order], g.positive_box[order])
    again = evaluate_search(ann, shuffled, qe)
    assert base.metrics.keys() == again.metrics.keys()
    for key, value in base.metrics.items():
        assert again.metrics[key] == pytest.approx(value, abs=1e-12), key


def test_two_step_is_passing_other_embeddings():
    # The same boxes with a second model's embeddings: with_embeddings() must be exactly
    # equivalent to building the detections from scratch, and the numbers must move.
    ann, dets, qe = random_world("prw", seed=11)
    rng = np.random.default_rng(1)
    other = _unit(rng.standard_normal(dets.embeddings.shape))
    other_q = _unit(rng.standard_normal(qe.shape))
    two_step = evaluate_search(ann, dets.with_embeddings(other), other_q).metrics
    rebuilt = Detections.from_arrays(dets.image_index, dets.boxes, dets.scores, other, num_images=dets.num_images)
    assert evaluate_search(ann, rebuilt, other_q).metrics == two_step
    assert evaluate_search(ann, dets, qe).metrics["prw/all/mAP"] != pytest.approx(two_step["prw/all/mAP"])


# ---- brute force: the rules written as plain loops, compared on random data -----------------------
def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_world(dataset: str, seed: int, n_images: int = 40, n_people: int = 8):
    rng = np.random.default_rng(seed)
    images, people = [], np.arange(1, n_people + 1)
    for i in range(n_images):
        boxes = []
        for k, pid in enumerate(rng.choice(people, size=2, replace=False)):
            x = 10 + 90 * k + rng.uniform(0, 20)
            w, h = rng.uniform(4, 60), rng.uniform(10, 120)  # some small people
            boxes.append((x, 20, x + w, 20 + h, int(pid)))
        boxes.append((20, 150, 60, 195, -1))
        images.append(dict(name=f"im{i}", camera=1 + i % 3, boxes=boxes,
                           split="train" if i >= n_images - 4 else "test"))
    test_images = [im for im in images if im["split"] == "test"]
    queries = []
    for pid in people:
        holders = [im for im in test_images if any(b[4] == pid for b in im["boxes"])]
        if len(holders) >= 2:
            im = holders[0]
            queries.append((im["name"], next(b[:4] for b in im["boxes"] if b[4] == pid), int(pid)))
    galleries = None
    if dataset == "cuhk_sysu":
        galleries = {}
        for size in (6, 20):  # 6 of 36 pool images: gathered; 20: masked full rows
            lists, positives = [], []
            for qi, (q_name, _, pid) in enumerate(queries):
                holders = [im for im in test_images if im["name"] != q_name and any(b[4] == pid for b in im["boxes"])]
                rest = [im for im in test_images if im["name"] != q_name and im not in holders]
                chosen = holders[:3] + list(rng.choice(rest, size=size - len(holders[:3]), replace=False))
                lists.append([im["name"] for im in chosen])
                positives += [(qi, im["name"], next(b[:4] for b in im["boxes"] if b[4] == pid)) for im in holders[:3]]
            galleries[size] = (lists, positives)
    ann = build_annotations(dataset, images, queries, galleries)
    per_image, idx = [], []
    for i, im in enumerate(images):
        boxes = []
        for x1, y1, x2, y2, _ in im["boxes"]:
            for _ in range(rng.integers(0, 3)):  # 0-2 jittered detections per person
                j = rng.normal(0, 0.15, 4) * [x2 - x1, y2 - y1, x2 - x1, y2 - y1]
                boxes.append((x1 + j[0], y1 + j[1], x2 + j[2], y2 + j[3]))
        boxes.append((100, 100, 140, 180))  # clutter
        idx.append(i)
        per_image.append(np.array(boxes, np.float32))
    n = [len(b) for b in per_image]
    dets = Detections.from_lists(idx, per_image, [rng.uniform(0.2, 1.0, k) for k in n],
                                 [_unit(rng.standard_normal((k, 8))) for k in n], num_images=len(images))
    qe = _unit(rng.standard_normal((len(queries), 8)))
    return ann, dets, qe


def brute_force(ann, dets, qe, protocol, size=None, threshold=0.5):
    """docs/EVALUATION.md, literally: per query, per gallery image, per detection."""
    images, queries = ann.images, ann.queries
    test = [i for i in range(len(images)) if images.split[i] == "test"]
    aps, first_ranks = [], []
    for q in range(len(queries)):
        q_img, pid = queries.image_index[q], queries.pid[q]
        positives = {}
        if protocol in ("listed", "full"):
            g = ann.galleries[size]
            gallery = list(dict.fromkeys(g.image_index[q].tolist()))
            for pq, pi, pb in zip(g.positive_query, g.positive_image, g.positive_box):
                if pq == q:
                    positives.setdefault(int(pi), pb)
            if protocol == "full":
                gallery += [i for i in test if i not in gallery and i != q_img]
        else:
            gallery = [i for i in test if i != q_img
                       and (protocol == "prw_all" or images.camera[i] != images.camera[q_img])]
            for i in gallery:
                hit = np.flatnonzero(images.pids_of(i) == pid)
                if hit.size:
                    positives[i] = images.boxes_of(i)[hit[0]]
        count_gt, count_tp, y_true, y_score = len(positives), 0, [], []
        for i in gallery:
            rows = [r for r in range(dets.offsets[i], dets.offsets[i + 1]) if dets.scores[r] >= threshold]
            sims = [float(dets.embeddings[r] @ qe[q]) for r in rows]
            labels = [0] * len(rows)
            if i in positives:
                gt = positives[i]
                w, h = gt[2] - gt[0], gt[3] - gt[1]
                iou_threshold = min(0.5, w * h / ((w + 10) * (h + 10)))
                for j in sorted(range(len(rows)), key=lambda j: -sims[j]):
                    if paired_iou(dets.boxes[rows[j]], gt)[0] >= iou_threshold:
                        labels[j] = 1
                        count_tp += 1
                        break
            y_true += labels
            y_score += sims
        if count_gt == 0:
            aps.append(np.nan)
            first_ranks.append(-1)
            continue
        aps.append(0.0 if count_tp == 0 else average_precision_score(y_true, y_score) * count_tp / count_gt)
        ranked = np.array(y_true)[np.argsort(-np.array(y_score), kind="stable")]
        first_ranks.append(int(np.argmax(ranked)) if ranked.any() else -1)
    return np.array(aps), np.array(first_ranks)


@pytest.mark.parametrize("dataset,seed", [("cuhk_sysu", 0), ("cuhk_sysu", 1), ("prw", 0), ("prw", 1)])
def test_matches_brute_force_reference_on_random_data(dataset, seed):
    ann, dets, qe = random_world(dataset, seed)
    results = evaluate_search(ann, dets, qe).protocols
    if dataset == "cuhk_sysu":
        cases = [("cuhk_sysu/g6", "listed", 6), ("cuhk_sysu/g20", "listed", 20), ("cuhk_sysu/full", "full", 6)]
    else:
        cases = [("prw/all", "prw_all", None), ("prw/cross_cam", "prw_cross", None)]
    for name, protocol, size in cases:
        ap, first_rank = brute_force(ann, dets, qe, protocol, size)
        np.testing.assert_allclose(results[name].ap, ap, rtol=1e-6, atol=1e-9, err_msg=name)
        np.testing.assert_array_equal(results[name].first_rank, first_rank, err_msg=name)
        assert np.nanmean(ap) > 0, name  # the random world does produce true positives


@pytest.mark.parametrize("n,excluded", [(50, 0.0), (50_000, 0.1), (50_000, 0.995)])
def test_top_positions_equal_a_full_sort(n, excluded):
    rng = np.random.default_rng(n)
    scores = rng.standard_normal(n).astype(np.float32)
    scores[rng.random(n) < excluded] = -np.inf
    expected = np.argsort(-scores, kind="stable")[:10]
    expected = expected[np.isfinite(scores[expected])]
    np.testing.assert_array_equal(top_positions(scores, 10), expected)
