"""Everything an evaluation run reports, from arrays: detection, search (and CBGM), files.

``evaluate_arrays`` is what ``jobs/evaluate.py`` runs on saved detections/embeddings; a model
evaluation produces the same arrays first and then calls it too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from dkd_ray.data.annotations import Annotations
from dkd_ray.eval.arrays import Detections
from dkd_ray.eval.cbgm import CBGMConfig
from dkd_ray.eval.detection import evaluate_detection
from dkd_ray.eval.plots import pick_example_queries, plot_cmc, plot_gallery_size_curve, plot_query_matches
from dkd_ray.eval.results import write_metrics, write_query_results
from dkd_ray.eval.search import SearchResults, evaluate_search

log = logging.getLogger(__name__)

HEADLINE = {"cuhk_sysu": "cuhk_sysu/g100", "prw": "prw/all"}


def headline_prefix(metrics: dict[str, float], dataset: str) -> str:
    """The protocol whose mAP/top-1 tag a registered model: CUHK-SYSU gallery 100 (the field's
    headline), else the largest ``TestG`` gallery present; PRW all frames."""
    preferred = HEADLINE.get(dataset)
    if preferred and f"{preferred}/mAP" in metrics:
        return preferred
    sizes = [int(k.split("/")[1][1:]) for k in metrics
             if k.endswith("/mAP") and k.count("/") == 2 and k.split("/")[1][:1] == "g" and k.split("/")[1][1:].isdigit()]
    if sizes:
        return f"{dataset}/g{max(sizes)}"
    candidates = sorted(k[: -len("/mAP")] for k in metrics if k.endswith("/mAP"))
    return candidates[0] if candidates else ""


@dataclass
class EvaluationReport:
    metrics: dict[str, float]
    searches: list[SearchResults]
    files: list[Path] = field(default_factory=list)  # written artifacts (metrics, results, plots)


def evaluate_arrays(
    annotations: Annotations,
    gallery: Detections,
    query_embeddings: np.ndarray,
    *,
    score_threshold: float = 0.5,
    det_score_threshold: float = 0.5,
    gallery_sizes: Sequence[int | str] | None = None,
    cbgm: CBGMConfig | bool = False,
    query_context: Detections | None = None,
    output_dir: str | Path | None = None,
    plots: bool = True,
    example_queries: int = 4,
) -> EvaluationReport:
    """Detection (all and labelled people), search, and with ``cbgm`` search re-ranked by CBGM
    as well; with ``output_dir``: ``metrics.json``, ``results.jsonl`` and PNG plots there."""
    metrics: dict[str, float] = {}
    metrics.update(evaluate_detection(annotations, gallery, score_threshold=det_score_threshold))
    if np.any(annotations.images.pids[_test_box_mask(annotations)] >= 0):
        metrics.update(evaluate_detection(annotations, gallery, score_threshold=det_score_threshold,
                                          labelled_only=True))
    common = dict(score_threshold=score_threshold, gallery_sizes=gallery_sizes)
    searches = [evaluate_search(annotations, gallery, query_embeddings, **common)]
    if cbgm:
        searches.append(evaluate_search(annotations, gallery, query_embeddings, cbgm=cbgm,
                                        query_context=query_context, **common))
    for search in searches:
        metrics.update(search.metrics)
    report = EvaluationReport(metrics, searches)
    if output_dir is not None:
        out = Path(output_dir)
        report.files.append(write_metrics(out / "metrics.json", metrics))
        report.files.append(write_query_results(out / "results.jsonl", searches, annotations, gallery))
        if plots:
            report.files.extend(_plots(annotations, gallery, searches, metrics, out, example_queries))
    return report


def _test_box_mask(annotations: Annotations) -> np.ndarray:
    images = annotations.images
    return images.split[images.box_image_index()] == "test"


def _plots(annotations, gallery, searches, metrics, out: Path, example_queries: int) -> list[Path]:
    files = [plot_cmc(searches, out / "cmc.png")]
    curve = plot_gallery_size_curve(metrics, out / "gallery_size.png")
    if curve is not None:
        files.append(curve)
    headline = searches[0].protocols.get(HEADLINE.get(annotations.dataset, ""))
    if headline is None:
        headline = next(iter(searches[0].protocols.values()))
    for q in pick_example_queries(headline, example_queries):
        picture = plot_query_matches(annotations, gallery, headline, q, out / "queries" / f"query_{q:05d}.png")
        if picture is None:  # no pixels (annotation-only data): one message is enough
            break
        files.append(picture)
    return files
