"""Context bipartite graph matching (CBGM, SeqNet), an optional re-ranking at search time.

For one query: take the gallery detections with the k1 highest similarities and the images they
lie in. For each such image, match the query image's context (the query box first, then the next
``k2 - 1`` detections of the query image) one to one against that image's detections, maximising
the summed similarity (scipy's ``linear_sum_assignment``, the Kuhn-Munkres problem SeqNet solves).
If the query box is matched, the detection it is matched to gets the largest similarity of the
matching. All other similarities stay as they are, and the protocol then runs unchanged.

The query context is a ``Detections`` indexed by *query* row (not image row): its first row per
query must be the query box (with the query's embedding), as SeqNet's "query image as gallery"
pass produces. ``query_context_from_detections`` builds it from the gallery detections of the
query images, the same way: the query box (score 1) suppresses detections overlapping it by
IoU > 0.5 (NMS), the rest follow by descending score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dkd_ray.data.annotations import Annotations
from dkd_ray.eval.arrays import Detections
from dkd_ray.eval.boxes import expand_ranges, paired_iou

# k1 (gallery detections whose images are re-scored), k2 (query-image context size), per SeqNet.
_DEFAULTS = {"cuhk_sysu": (10, 3), "prw": (30, 4)}
_BOX_TOLERANCE_PX = 0.5  # a model may hand back the query box after a resize round trip


@dataclass(frozen=True)
class CBGMConfig:
    k1: int
    k2: int

    def __post_init__(self) -> None:
        if self.k1 < 1 or self.k2 < 1:
            raise ValueError(f"CBGM needs k1 >= 1 and k2 >= 1, got k1={self.k1}, k2={self.k2}")

    @classmethod
    def for_dataset(cls, dataset: str) -> "CBGMConfig":
        if dataset not in _DEFAULTS:
            raise ValueError(f"no CBGM defaults for dataset {dataset!r}; expected one of {sorted(_DEFAULTS)}")
        return cls(*_DEFAULTS[dataset])


def resolve_cbgm(cbgm: "CBGMConfig | bool | None", dataset: str) -> CBGMConfig | None:
    """``True`` means the dataset's defaults (CUHK-SYSU 10/3, PRW 30/4)."""
    if cbgm is None or cbgm is False:
        return None
    if cbgm is True:
        return CBGMConfig.for_dataset(dataset)
    if isinstance(cbgm, CBGMConfig):
        return cbgm
    raise TypeError(f"cbgm must be None, a bool or a CBGMConfig, got {type(cbgm).__name__}")


def query_context_from_detections(
    annotations: Annotations,
    detections: Detections,
    query_embeddings: np.ndarray,
    *,
    score_threshold: float = 0.5,
    nms_iou: float = 0.5,
) -> Detections:
    """Per query: its box and embedding first (score 1), then the detections of its image with
    ``score >= score_threshold`` that overlap the query box by IoU <= ``nms_iou``, by score."""
    queries = annotations.queries
    q = len(queries)
    if len(query_embeddings) != q:
        raise ValueError(f"{len(query_embeddings)} query embeddings for {q} queries")
    own = queries.image_index
    starts = detections.offsets[own]
    rows, query_of = expand_ranges(starts, detections.offsets[own + 1] - starts)
    keep = (detections.scores[rows] >= score_threshold) & (
        paired_iou(detections.boxes[rows], queries.box[query_of]) <= nms_iou
    )
    rows, query_of = rows[keep], query_of[keep]
    owner = np.concatenate([np.arange(q), query_of])
    is_context = np.concatenate([np.zeros(q, bool), np.ones(len(rows), bool)])
    scores = np.concatenate([np.ones(q, np.float32), detections.scores[rows]])
    order = np.lexsort((-scores, is_context, owner))  # query box first, then by score
    return Detections.from_arrays(
        owner[order],
        np.concatenate([queries.box.astype(np.float32), detections.boxes[rows]])[order],
        scores[order],
        np.concatenate([np.asarray(query_embeddings, np.float32), detections.embeddings[rows]])[order],
        num_images=q,
    )


class ContextMatcher:
    """Applies CBGM to one query's similarity row at a time (see module docstring)."""

    def __init__(self, config: CBGMConfig, context: Detections, query_boxes: np.ndarray,
                 gallery_embeddings: np.ndarray, gallery_image: np.ndarray,
                 image_start: np.ndarray, image_end: np.ndarray) -> None:
        q = len(query_boxes)
        if context.num_images != q:
            raise ValueError(f"the query context must be indexed by query row: it covers "
                             f"{context.num_images} rows for {q} queries")
        count = np.diff(context.offsets)
        if np.any(count == 0):
            raise ValueError(f"query {int(np.flatnonzero(count == 0)[0])} has no context detection; "
                             "its first one must be the query box")
        first = context.offsets[:-1]
        off = np.abs(context.boxes[first] - query_boxes).max(axis=1)
        if np.any(off > _BOX_TOLERANCE_PX):
            bad = int(np.argmax(off))
            raise ValueError(f"query {bad}: the first context detection {context.boxes[first[bad]].tolist()} "
                             f"is not the query box {query_boxes[bad].tolist()}")
        if context.dim != gallery_embeddings.shape[1]:
            raise ValueError(f"context embeddings are {context.dim}-d, gallery ones "
                             f"{gallery_embeddings.shape[1]}-d")
        from scipy.optimize import linear_sum_assignment  # scipy.optimize is slow to import

        self._assign = linear_sum_assignment
        self.config = config
        self.context = context
        self.gallery_embeddings = gallery_embeddings
        self.gallery_image = gallery_image
        self.image_start = image_start
        self.image_end = image_end

    def rerank(self, query: int, scores: np.ndarray, rows: np.ndarray | None) -> None:
        """Re-score, in place, the candidates of the images holding the top-k1 candidates.

        ``scores``: the query's candidate similarities; ``rows``: the gallery row of each
        position, or ``None`` when positions are gallery rows. Either way an image's detections
        sit in one block, in gallery order.
        """
        k = min(self.config.k1, len(scores))
        if k == 0:
            return
        top = np.argpartition(scores, len(scores) - k)[len(scores) - k :]
        top = top[np.isfinite(scores[top])]
        top_rows = top if rows is None else rows[top]
        images, first = np.unique(self.gallery_image[top_rows], return_index=True)
        lo_ctx = self.context.offsets[query]
        hi_ctx = min(self.context.offsets[query + 1], lo_ctx + self.config.k2)
        context = self.context.embeddings[lo_ctx:hi_ctx]
        starts, ends = self.image_start[images], self.image_end[images]
        rows, _ = expand_ranges(starts, ends - starts)
        weights = context @ self.gallery_embeddings[rows].T  # [k2, all their detections]
        bounds = np.concatenate([[0], np.cumsum(ends - starts)])
        for i, (pos, row) in enumerate(zip(top[first], top_rows[first])):  # at most k1 matchings
            w = weights[:, bounds[i] : bounds[i + 1]]
            matched_ctx, matched_det = self._assign(w, maximize=True)
            query_match = np.flatnonzero(matched_ctx == 0)
            if query_match.size:
                block = pos - (row - starts[i])  # position of the image's first detection in ``scores``
                scores[block + matched_det[query_match[0]]] = w[matched_ctx, matched_det].max()
