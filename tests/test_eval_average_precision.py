"""Average precision: the numpy version equals scikit-learn's, ties and all."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from dkd_ray.eval.average_precision import average_precision, average_precision_from_counts, count_at_least


def test_hand_computed_with_ties():
    # Scores 0.9 (N), 0.5 (P), 0.5 (N), 0.2 (P). Thresholds: 0.9 -> P 0/1; 0.5 -> 1 TP of 3
    # (the tie enters together); 0.2 -> 2 of 4. AP = 1/2 * 1/3 + 1/2 * 2/4 = 0.41667.
    y, s = [0, 1, 0, 1], [0.9, 0.5, 0.5, 0.2]
    assert average_precision(y, s) == pytest.approx(1 / 6 + 1 / 4)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s))


@pytest.mark.parametrize("seed", range(5))
def test_equals_sklearn_on_random_scores_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    y = rng.random(n) < rng.uniform(0.05, 0.6)
    y[0] = True
    s = np.round(rng.random(n), 1 if seed % 2 else 3)  # coarse rounding: many ties
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_no_positive_gives_zero():
    assert average_precision([0, 0, 0], [0.1, 0.2, 0.3]) == 0.0


def test_dividing_by_count_gt_scales_by_recall():
    # Positives at 0.9 and 0.4 among 0.9, 0.7, 0.4: sklearn AP (1 + 2/3) / 2; with 4 people
    # to find (2 never detected) the person-search AP is that x 2/4.
    scores = np.array([0.9, 0.7, 0.4], np.float32)
    ap = average_precision_from_counts(scores[[0, 2]], scores, num_positives=4)
    assert ap == pytest.approx((1 + 2 / 3) / 2 * 2 / 4)


@pytest.mark.parametrize("num_thresholds", [1, 3, 20, 200])  # direct, compressed, and sorted paths
def test_count_at_least_paths_agree(num_thresholds):
    rng = np.random.default_rng(num_thresholds)
    scores = np.round(rng.standard_normal(5000), 2).astype(np.float32)
    scores[:50] = -np.inf
    thresholds = np.sort(rng.choice(scores[50:], num_thresholds))
    expected = (scores[None, :] >= thresholds[:, None]).sum(axis=1)
    np.testing.assert_array_equal(count_at_least(scores, thresholds), expected)
