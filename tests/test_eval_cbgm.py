"""CBGM re-ranking: a case where the query's companion must flip the top-1."""

from __future__ import annotations

import numpy as np
import pytest

from dkd_ray.eval import CBGMConfig, Detections, evaluate_search, query_context_from_detections
from tests.eval_fixtures import build_annotations, build_detections

A_BOX, B_BOX = (10, 10, 60, 110), (100, 10, 150, 110)
E = np.eye(4, dtype=np.float32)


def unit(*v):
    v = np.array(v, np.float64)
    return (v / np.linalg.norm(v)).astype(np.float32)


# Query person A (embedding e0) walks with B (e1). In image "pair" both are seen: a1 is A with
# similarity 0.7 to the query, b1 is B (0.95 to B). Image "lookalike" holds C, 0.8 to A, alone.
A_Q, B_Q = E[0], E[1]
A1 = unit(0.7, 0.1, np.sqrt(1 - 0.7**2 - 0.1**2), 0)
B1 = unit(0.1, 0.95, np.sqrt(1 - 0.1**2 - 0.95**2), 0)
C2 = unit(0.8, 0.0, 0.0, 0.6)


def cbgm_case(listing=("pair", "lookalike"), padding=0):
    """``padding`` extra pool images make the 2-image gallery small enough to be gathered
    rather than masked out of a full similarity row: both code paths must agree."""
    images = [
        dict(name="q", boxes=[(*A_BOX, 1), (*B_BOX, 2)]),
        dict(name="pair", boxes=[(*A_BOX, 1), (*B_BOX, 2)]),
        dict(name="lookalike", boxes=[(*A_BOX, 3)]),
    ] + [dict(name=f"pad{i}", boxes=[(*A_BOX, -1)]) for i in range(padding)]
    ann = build_annotations("cuhk_sysu", images, [("q", A_BOX, 1)],
                            {2: ([list(listing)], [(0, "pair", A_BOX)])})
    dets = build_detections(ann, {
        "q": [(A_BOX, 0.99, A_Q), (B_BOX, 0.9, B_Q)],
        "pair": [(A_BOX, 0.9, A1), (B_BOX, 0.9, B1)],
        "lookalike": [(A_BOX, 0.9, C2)],
    })
    return ann, dets


@pytest.mark.parametrize("listing", [("pair", "lookalike"), ("lookalike", "pair")])
@pytest.mark.parametrize("padding", [0, 10])
def test_cbgm_flips_the_top1_with_the_companion(listing, padding):
    # Without CBGM: 0.8 N (C), 0.7 P (a1), 0.1 N (b1) -> AP 1/2, top-1 miss.
    # CBGM (k1=2 -> images lookalike and pair; k2=2 -> context [A_q, B_q]):
    #   pair: weights [[0.7, 0.1], [0.1, 0.95]], best matching A-a1, B-b1, max 0.95 -> a1 := 0.95
    #   lookalike: [[0.8], [0.0]] -> A-C, max 0.8 -> unchanged.
    # Now 0.95 P, 0.8 N, 0.1 N -> AP 1, top-1 hit.
    ann, dets = cbgm_case(listing, padding)
    plain = evaluate_search(ann, dets, A_Q[None], gallery_sizes=[2]).protocols["cuhk_sysu/g2"]
    assert plain.ap[0] == pytest.approx(0.5) and plain.first_rank[0] == 1
    reranked = evaluate_search(ann, dets, A_Q[None], gallery_sizes=[2], cbgm=CBGMConfig(k1=2, k2=2))
    result = reranked.protocols["cuhk_sysu/cbgm/g2"]
    assert result.ap[0] == pytest.approx(1.0) and result.first_rank[0] == 0
    assert result.top_scores[0, 0] == pytest.approx(0.95, abs=1e-6)
    assert reranked.metrics["cuhk_sysu/cbgm/g2/top1"] == 1.0


def test_cbgm_needs_the_companion_and_the_query_box_first():
    ann, dets = cbgm_case()
    # k2 = 1: the context is the query alone; matching it to its best detection changes nothing.
    alone = evaluate_search(ann, dets, A_Q[None], gallery_sizes=[2], cbgm=CBGMConfig(k1=2, k2=1))
    assert alone.protocols["cuhk_sysu/cbgm/g2"].ap[0] == pytest.approx(0.5)
    # A context whose first row is not the query box is refused.
    wrong = Detections.from_lists([0], [np.array([B_BOX, A_BOX])], [np.ones(2)], [np.stack([B_Q, A_Q])],
                                  num_images=1)
    with pytest.raises(ValueError, match="not the query box"):
        evaluate_search(ann, dets, A_Q[None], gallery_sizes=[2], cbgm=True, query_context=wrong)


def test_default_context_is_query_box_then_its_image_detections_by_score():
    # From the gallery detections of image q: the query box (score 1, query embedding) first;
    # the detection on A's own box (IoU 1 > 0.5) is suppressed; B follows.
    ann, dets = cbgm_case()
    context = query_context_from_detections(ann, dets, A_Q[None])
    np.testing.assert_allclose(context.boxes, [A_BOX, B_BOX])
    np.testing.assert_allclose(context.embeddings, [A_Q, B_Q])
    explicit = evaluate_search(ann, dets, A_Q[None], gallery_sizes=[2], cbgm=CBGMConfig(2, 2),
                               query_context=context).metrics
    default = evaluate_search(ann, dets, A_Q[None], gallery_sizes=[2], cbgm=CBGMConfig(2, 2)).metrics
    assert explicit == default


def test_cbgm_defaults_per_dataset():
    assert CBGMConfig.for_dataset("cuhk_sysu") == CBGMConfig(10, 3)
    assert CBGMConfig.for_dataset("prw") == CBGMConfig(30, 4)
    with pytest.raises(ValueError):
        CBGMConfig(0, 3)
