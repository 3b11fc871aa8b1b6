"""Average precision as scikit-learn defines it, in numpy.

scikit-learn's ``average_precision_score`` is ``sum_n (R_n - R_{n-1}) * P_n`` over the distinct
score thresholds, highest first: detections with equal scores enter the ranking together, and
precision is read after the whole tied group. Every published person-search number (OIM, SeqNet,
COAT) is computed with that function, so this module reproduces it exactly (tests compare the two)
without sklearn's per-call overhead, which matters for thousands of queries.
"""

from __future__ import annotations

import numpy as np


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """``sklearn.metrics.average_precision_score(y_true, y_score)`` for binary labels.

    Returns 0.0 when there is no positive (as scikit-learn does, minus its warning).
    """
    y_true = np.asarray(y_true, dtype=bool).ravel()
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    if y_true.shape != y_score.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_score has {y_score.size} scores")
    positive_scores = y_score[y_true]
    return average_precision_from_counts(positive_scores, y_score, y_true.sum())


def average_precision_from_counts(
    positive_scores: np.ndarray, all_scores: np.ndarray, num_positives: int
) -> float:
    """AP from the positives' scores and the scores of every candidate (positives included).

    Each positive contributes the precision at its own score threshold, ties included:
    ``#positives >= s / #candidates >= s``; AP is the sum over positives divided by
    ``num_positives``. Passing ``num_positives = count_gt`` instead of the number of true
    positives gives the person-search AP (sklearn's AP times ``count_tp / count_gt``) directly.

    Cost: one pass over ``all_scores``, then one pass per positive over the candidates scoring at
    least the lowest positive (a sort of those instead when there are many positives).
    """
    if num_positives <= 0 or len(positive_scores) == 0:
        return 0.0
    thresholds = np.sort(np.asarray(positive_scores, dtype=all_scores.dtype))
    n_ge = count_at_least(all_scores, thresholds)
    tp_ge = len(thresholds) - np.searchsorted(thresholds, thresholds, side="left")
    return float((tp_ge / n_ge).sum() / num_positives)


def count_at_least(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For ascending ``thresholds`` [P]: how many ``scores`` are >= each one (int64 [P])."""
    if len(thresholds) <= _FEW:
        # One vectorised comparison pass per threshold beats binary searches of unsorted keys.
        return np.fromiter((np.count_nonzero(scores >= t) for t in thresholds), np.int64, len(thresholds))
    above = scores[scores >= thresholds[0]]  # only these can count
    if len(thresholds) <= _MAX_COUNTING_PASSES:
        return np.fromiter((np.count_nonzero(above >= t) for t in thresholds), np.int64, len(thresholds))
    ranked = np.sort(above)
    return len(ranked) - np.searchsorted(ranked, thresholds, side="left")


_FEW = 4
_MAX_COUNTING_PASSES = 64
