"""Person search evaluation (CUHK-SYSU, PRW) on arrays, as the published numbers are computed.

Per query (docs/EVALUATION.md; OIM ``psdb.evaluate_search``, SeqNet/COAT ``eval_search_cuhk/prw``):
1. gallery: CUHK-SYSU ``TestG<size>`` lists, or the full set (the ``TestG50`` lists plus every
   other pool image but the query's own, all negatives); PRW every test frame but the query's
   own (``prw/all``), or only other cameras' frames (``prw/cross_cam``);
2. gallery detections with ``score < score_threshold`` are dropped;
3. ``count_gt`` = gallery images containing the query person; in each, the detections are taken
   by descending similarity and the first whose IoU with the person's box reaches
   ``min(0.5, w*h/((w+10)*(h+10)))`` is that image's single positive (``count_tp += 1``); every
   other candidate detection is a negative;
4. AP = scikit-learn's average precision over all candidates scored by similarity, times
   ``count_tp / count_gt``; 0 when ``count_tp == 0``;
5. top-k = 1 when a positive is among the k most similar candidates (k = 1, 5, 10). Tied
   similarities rank negatives first (the reference leaves tie order to ``argsort``).
A query with ``count_gt == 0`` (possible e.g. in cross-camera search on other data) has no
defined AP; it is left out of the means and counted out of ``num_queries``.

Embeddings that would make a similarity non-finite (a NaN or inf, or values so large that a dot
product overflows float32) are refused with an ``ArraysError`` before anything is computed, so
every AP and top-k is a finite number.

Two-step evaluation (a separate Re-ID model embedding the detector's boxes) is the same call
with other embeddings: ``evaluate_search(ann, dets.with_embeddings(reid_gallery), reid_queries)``.
Nothing here knows where embeddings come from.

Speed: the similarities of a chunk of queries to every kept gallery detection are one BLAS
matmul; candidates are CSR gathers; AP needs one pass over a query's candidates plus
a pass per positive over the candidates above the lowest positive (no full sort); the top-10
is an ``argpartition`` of the few candidates above a sampled cut.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from dkd_ray.data.annotations import Annotations
from dkd_ray.eval.arrays import ArraysError, Detections
from dkd_ray.eval.average_precision import count_at_least
from dkd_ray.eval.boxes import expand_ranges
from dkd_ray.eval.cbgm import CBGMConfig, ContextMatcher, query_context_from_detections, resolve_cbgm
from dkd_ray.eval.protocols import GalleryIndex, SearchProtocol, cuhk_sysu_protocol, prw_protocol

log = logging.getLogger(__name__)

TOP_K = (1, 5, 10)
FULL_SET = "full"
_CHUNK_ELEMENTS = 1 << 24  # similarities held at once (64 MiB of float32)
_SAMPLE = 2048  # scores sampled to find a cut for the top list
# Every partial sum of a d-dim dot product is at most d * max|q| * max|g|; kept below this (with
# room for rounding) no float32 similarity can overflow to inf, or become inf - inf = NaN.
_SIMILARITY_LIMIT = float(np.finfo(np.float32).max) / 4


@dataclass
class ProtocolResult:
    """Per-query outcome of one protocol; arrays indexed by query row."""

    name: str  # e.g. 'cuhk_sysu/g100', 'cuhk_sysu/cbgm/g100', 'prw/cross_cam'
    ap: np.ndarray  # float64 [Q], NaN where count_gt == 0
    first_rank: np.ndarray  # int64 [Q], 0-based rank of the best positive; -1 without one
    count_gt: np.ndarray  # int64 [Q]
    count_tp: np.ndarray  # int64 [Q]
    top_rows: np.ndarray  # int64 [Q, n], rows of the gallery Detections, best first; -1 pads
    top_scores: np.ndarray  # float32 [Q, n]
    top_correct: np.ndarray  # bool [Q, n]

    @property
    def evaluated(self) -> np.ndarray:
        return self.count_gt > 0

    def mean_ap(self) -> float:
        ev = self.evaluated
        return float(self.ap[ev].mean()) if ev.any() else float("nan")

    def top_k(self, k: int) -> float:
        ev = self.evaluated
        if not ev.any():
            return float("nan")
        rank = self.first_rank[ev]
        return float(((rank >= 0) & (rank < k)).mean())

    def cmc(self, max_rank: int = 50) -> np.ndarray:
        """``cmc[k-1]`` = fraction of queries with a positive among their k best, k = 1..max_rank."""
        ev = self.evaluated
        rank = self.first_rank[ev]
        hit = rank >= 0
        ks = np.arange(1, max_rank + 1)
        if not ev.any():
            return np.full(max_rank, np.nan)
        return ((rank[None, :] < ks[:, None]) & hit[None, :]).mean(axis=1)

    def metrics(self) -> dict[str, float]:
        out = {f"{self.name}/mAP": self.mean_ap()}
        out.update({f"{self.name}/top{k}": self.top_k(k) for k in TOP_K})
        out[f"{self.name}/num_queries"] = float(self.evaluated.sum())
        return out


@dataclass
class SearchResults:
    dataset: str
    protocols: dict[str, ProtocolResult]
    cbgm: CBGMConfig | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def evaluate_search(
    annotations: Annotations,
    gallery: Detections,
    query_embeddings: np.ndarray,
    *,
    score_threshold: float = 0.5,
    gallery_sizes: Sequence[int | str] | None = None,
    cbgm: CBGMConfig | bool | None = None,
    query_context: Detections | None = None,
    cross_camera: bool | None = None,
    top_n: int = 10,
) -> SearchResults:
    """Run the dataset's search protocols; see the module docstring for the rules.

    - ``gallery``: detections on (at least) the test images, indexed by ImageTable row.
    - ``query_embeddings``: ``[Q, d]``, row q = the embedding of query q's ground-truth box.
    - ``gallery_sizes`` (CUHK-SYSU): ``TestG`` sizes to run and/or ``"full"`` (or -1); default
      every size in ``annotations.galleries`` plus the full set.
    - ``cross_camera`` (PRW): ``None`` runs both ``prw/all`` and ``prw/cross_cam``, ``False``
      only the first, ``True`` only the second.
    - ``cbgm``: ``True`` for the dataset's k1/k2, or a ``CBGMConfig``; results are then named
      ``<dataset>/cbgm/<protocol>``. ``query_context`` (indexed by query row, query box first)
      defaults to one built from ``gallery`` on the query images
      (``query_context_from_detections``).
    """
    queries = annotations.queries
    query_embeddings = np.ascontiguousarray(query_embeddings, dtype=np.float32)
    if query_embeddings.ndim != 2 or len(query_embeddings) != len(queries):
        raise ArraysError(f"query_embeddings must be [{len(queries)}, d] (one per query), "
                          f"got {query_embeddings.shape}")
    if query_embeddings.shape[1] != gallery.dim:
        raise ArraysError(f"query embeddings are {query_embeddings.shape[1]}-d but gallery "
                          f"embeddings are {gallery.dim}-d")
    started = time.perf_counter()
    index = GalleryIndex.build(annotations, gallery, score_threshold)
    query_scale = largest_magnitude(query_embeddings, "query embeddings", lambda r: f"query {r}")
    gallery_scale = largest_magnitude(  # only kept detections are ever compared
        index.embeddings, f"gallery embeddings (score >= {score_threshold:g})",
        lambda r: f"gallery row {int(index.source[r])} (image row {int(index.image[r])})")
    check_similarities_finite(query_scale, gallery_scale, gallery.dim, "query")
    protocols = build_protocols(annotations, index, gallery_sizes=gallery_sizes, cross_camera=cross_camera)
    config = resolve_cbgm(cbgm, annotations.dataset)
    matcher = None
    if config is not None:
        if query_context is None:
            query_context = query_context_from_detections(
                annotations, gallery, query_embeddings, score_threshold=score_threshold
            )
        context_scale = largest_magnitude(
            query_context.embeddings, "query context embeddings",
            lambda r: f"context row {r} (query {int(query_context.image_index[r])})")
        check_similarities_finite(context_scale, gallery_scale, gallery.dim, "query context")
        matcher = ContextMatcher(config, query_context, queries.box, index.embeddings, index.image,
                                 index.image_start, index.image_end)
    num_q = len(queries)
    pool_images = int((annotations.images.split == "test").sum())
    outputs = [_Output(p, top_n, index, gather=_gathers(p, pool_images)) for p in protocols]
    # Similarities to every kept gallery detection (one BLAS matmul per chunk of queries) are only
    # needed when some protocol searches most of the pool; small TestG lists gather their own.
    need_rows = not all(out.gather for out in outputs)
    chunk = max(1, min(512, _CHUNK_ELEMENTS // max(1, len(index)))) if need_rows else 512
    log.info("search %s: %d queries, %d gallery detections (score >= %g), protocols %s%s",
             annotations.dataset, num_q, len(index), score_threshold,
             ", ".join(p.name for p in protocols), f", CBGM k1={config.k1} k2={config.k2}" if config else "")
    next_report = 0.25
    for q0 in range(0, num_q, chunk):
        q1 = min(num_q, q0 + chunk)
        sims = query_embeddings[q0:q1] @ index.embeddings.T if need_rows else None  # [B, M]
        for b in range(q1 - q0):
            row = None if sims is None else sims[b]
            for out in outputs:
                _search_query(q0 + b, row, query_embeddings[q0 + b], out, index, matcher)
        if q1 / num_q >= next_report and q1 < num_q:
            log.info("search %s: %d/%d queries (%.1f s)", annotations.dataset, q1, num_q,
                     time.perf_counter() - started)
            next_report += 0.25
    results = {}
    for out in outputs:
        result = out.result(_result_name(out.protocol.name, config))
        if len(index.source):  # back to rows of the caller's gallery
            result.top_rows = np.where(result.top_rows >= 0, index.source[np.maximum(result.top_rows, 0)], -1)
        results[result.name] = result
    metrics: dict[str, float] = {}
    for result in results.values():
        metrics.update(result.metrics())
    log.info("search %s done in %.1f s", annotations.dataset, time.perf_counter() - started)
    return SearchResults(annotations.dataset, results, config, metrics)


def largest_magnitude(embeddings: np.ndarray, what: str, row_name) -> float:
    """``max |x|`` over ``embeddings``; a NaN or inf is refused, naming its row (``row_name(r)``).

    ``max``/``min`` propagate NaN and inf, so finite arrays cost two passes and no copy.
    """
    if embeddings.size == 0:
        return 0.0
    hi, lo = float(embeddings.max()), float(embeddings.min())
    if not (np.isfinite(hi) and np.isfinite(lo)):
        bad = ~np.isfinite(embeddings).all(axis=1)
        r = int(np.flatnonzero(bad)[0])
        value = embeddings[r][~np.isfinite(embeddings[r])][0]
        raise ArraysError(f"{what}: {row_name(r)} is not finite ({value}); its similarities would be "
                          "NaN or inf, so no metric could be computed")
    return max(hi, -lo)


def check_similarities_finite(scale_a: float, scale_b: float, dim: int, what: str) -> None:
    """Refuse embedding magnitudes whose float32 dot products could overflow (NaN/inf similarity)."""
    if dim * scale_a * scale_b > _SIMILARITY_LIMIT:
        raise ArraysError(f"{what} and gallery embeddings reach |x| = {scale_a:.3g} and {scale_b:.3g} "
                          f"({dim}-d): their float32 similarities would overflow to inf/NaN "
                          "(embeddings are expected L2-normalised)")


def build_protocols(
    annotations: Annotations,
    index: GalleryIndex,
    *,
    gallery_sizes: Sequence[int | str] | None = None,
    cross_camera: bool | None = None,
) -> list[SearchProtocol]:
    if annotations.dataset == "cuhk_sysu":
        if not annotations.galleries:
            raise ValueError("CUHK-SYSU annotations have no TestG<size> gallery protocol")
        sizes = list(gallery_sizes) if gallery_sizes is not None else sorted(annotations.galleries) + [FULL_SET]
        protocols = []
        for size in sizes:
            if size in (FULL_SET, -1):
                # The full set starts from the TestG50 lists (the smallest protocol present).
                base = annotations.galleries[min(annotations.galleries)]
                protocols.append(cuhk_sysu_protocol(annotations, index, base, full_set=True))
            elif size in annotations.galleries:
                protocols.append(cuhk_sysu_protocol(annotations, index, annotations.galleries[size]))
            else:
                raise ValueError(f"no TestG{size} protocol in the annotations "
                                 f"(have {sorted(annotations.galleries)} and {FULL_SET!r})")
        return protocols
    if annotations.dataset == "prw":
        variants = [False, True] if cross_camera is None else [bool(cross_camera)]
        return [prw_protocol(annotations, index, cross_camera=v) for v in variants]
    raise ValueError(f"unknown dataset {annotations.dataset!r}; expected 'cuhk_sysu' or 'prw'")


def _result_name(protocol_name: str, config: CBGMConfig | None) -> str:
    if config is None:
        return protocol_name
    dataset, variant = protocol_name.split("/", 1)
    return f"{dataset}/cbgm/{variant}"


def _gathers(protocol: SearchProtocol, pool_images: int) -> bool:
    """Small listed galleries gather their images' detections; the rest mask a full row."""
    return protocol.listed_images is not None and 4 * protocol.listed_images.shape[1] <= pool_images


class _Output:
    """Per-query arrays of one protocol, filled query by query."""

    def __init__(self, protocol: SearchProtocol, top_n: int, index: GalleryIndex, *, gather: bool) -> None:
        q = protocol.num_queries
        self.protocol = protocol
        self.gather = gather
        self.pair_entry = np.repeat(np.arange(len(protocol.entry_image)), np.diff(protocol.pair_offsets))
        self.block_of_image = np.zeros(len(index.image_start), np.int64)  # scratch for gathers
        self.ap = np.full(q, np.nan)
        self.first_rank = np.full(q, -1, np.int64)
        self.count_tp = np.zeros(q, np.int64)
        self.top_rows = np.full((q, top_n), -1, np.int64)
        self.top_scores = np.full((q, top_n), np.nan, np.float32)
        self.top_correct = np.zeros((q, top_n), bool)

    def result(self, name: str) -> ProtocolResult:
        return ProtocolResult(name, self.ap, self.first_rank, self.protocol.count_gt, self.count_tp,
                              self.top_rows, self.top_scores, self.top_correct)


def _search_query(q: int, row: np.ndarray | None, embedding: np.ndarray, out: _Output,
                  index: GalleryIndex, matcher: ContextMatcher | None) -> None:
    """One query of one protocol: candidates, (CBGM), single positives, AP, top-k, top list.

    ``scores`` holds the candidates' similarities; ``rows`` maps its positions to gallery rows
    (``None``: positions are gallery rows, excluded ones set to -inf). Positives are read from
    ``scores`` itself, so CBGM's edits and the ranking see exactly the same numbers.
    """
    protocol = out.protocol
    e0, e1 = protocol.entry_offsets[q], protocol.entry_offsets[q + 1]
    p0, p1 = protocol.pair_offsets[e0], protocol.pair_offsets[e1]
    pair_row = protocol.pair_row[p0:p1]
    if out.gather:
        images = protocol.listed_images[q]
        images = images[images >= 0]
        starts = index.image_start[images]
        rows, _ = expand_ranges(starts, index.image_end[images] - starts)
        scores = row[rows] if row is not None else index.embeddings[rows] @ embedding
        lengths = index.image_end[images] - starts
        out.block_of_image[images] = np.cumsum(lengths) - lengths  # where each image's block begins
        pair_image = index.image[pair_row]
        pair_pos = out.block_of_image[pair_image] + (pair_row - index.image_start[pair_image])
    else:
        rows = None
        scores = row.copy()
        if protocol.listed_images is not None:
            listed = np.zeros(len(index.image_start), bool)
            listed[protocol.listed_images[q][protocol.listed_images[q] >= 0]] = True
            scores[~listed[index.image]] = -np.inf
        else:
            lo, hi = protocol.excluded_rows[q]
            scores[lo:hi] = -np.inf  # never reaches a threshold, never in a top list
        pair_pos = pair_row
    if matcher is not None:  # CBGM edits similarities before labels are assigned, as in SeqNet
        matcher.rerank(q, scores, rows)

    # Each positive image's single positive: its most similar detection among those whose IoU
    # with the person's box reaches the threshold.
    pair_sim = scores[pair_pos]
    pair_entry = out.pair_entry[p0:p1]
    order = np.lexsort((-pair_sim, pair_entry))
    first = np.ones(len(order), bool)
    first[1:] = pair_entry[order][1:] != pair_entry[order][:-1]
    t_sim, t_pos = pair_sim[order][first], pair_pos[order][first]

    count_gt = protocol.count_gt[q]
    out.count_tp[q] = len(t_sim)
    if len(t_sim):
        thresholds = np.sort(t_sim)
        n_ge = count_at_least(scores, thresholds)  # candidates at or above each positive
        tp_ge = len(thresholds) - np.searchsorted(thresholds, thresholds, side="left")
        out.ap[q] = (tp_ge / n_ge).sum() / count_gt
        out.first_rank[q] = n_ge[-1] - tp_ge[-1]  # negatives at or above the best positive
    elif count_gt > 0:
        out.ap[q] = 0.0
    top = top_positions(scores, out.top_rows.shape[1])
    out.top_rows[q, : len(top)] = top if rows is None else rows[top]
    out.top_scores[q, : len(top)] = scores[top]
    out.top_correct[q, : len(top)] = (top[:, None] == t_pos[None, :]).any(axis=1)


def top_positions(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest finite scores, best first.

    A full ``argpartition`` of ~100k similarities per query dominates the search otherwise; the
    k-th best of an evenly strided sample (~2k scores) is a cut that at least k scores clear,
    so only the few hundred above it are partitioned.
    """
    n = len(scores)
    k = min(k, n)
    if k == 0:
        return np.zeros(0, np.int64)
    if n > 4 * _SAMPLE:
        sample = scores[:: n // _SAMPLE]
        cut = np.partition(sample, len(sample) - k)[len(sample) - k]
        if np.isfinite(cut):
            pool = np.flatnonzero(scores >= cut)
            top = pool[np.argpartition(scores[pool], len(pool) - k)[len(pool) - k :]]
        else:  # mostly excluded (-inf) candidates: partition them all
            top = np.argpartition(scores, n - k)[n - k :]
    else:
        top = np.argpartition(scores, n - k)[n - k :]
    top = top[np.argsort(-scores[top], kind="stable")]
    return top[np.isfinite(scores[top])]
