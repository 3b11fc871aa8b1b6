"""Person-search evaluation on arrays (CUHK-SYSU, PRW): detection, search, CBGM, files, plots.

The functions take arrays, never models (``Detections`` + query embeddings), and follow the
published protocols (docs/EVALUATION.md; OIM / SeqNet / COAT evaluation code) rule for rule.

Metric names (stable; values are fractions in [0, 1], counts are plain numbers):

- ``det/ap``, ``det/recall``: detection over the test images, all people;
  ``det/labelled/ap``, ``det/labelled/recall``: labelled people only.
- ``<dataset>/<protocol>/<metric>`` for search, with metric ``mAP``, ``top1``, ``top5``,
  ``top10`` and ``num_queries`` (queries with at least one gallery match), and protocol
  - CUHK-SYSU: ``g50``, ``g100`` (the headline), ``g500``, ``g1000``, ``g2000``, ``g4000``
    (each ``TestG<size>`` present) and ``full`` (every pool image but the query's own);
  - PRW: ``all`` (every test frame but the query's own; the headline) and ``cross_cam``
    (frames of other cameras only).
  With CBGM re-ranking the protocol gets a ``cbgm/`` prefix: ``cuhk_sysu/cbgm/g100/mAP``,
  ``prw/cbgm/all/top1``.

Main entry points: ``evaluate_detection``, ``evaluate_search`` (returns ``SearchResults`` with
``.metrics`` and per-protocol per-query arrays), ``evaluate_arrays`` (both, plus metrics.json,
the per-query results file and the plots).
"""

from dkd_ray.eval.arrays import Detections, load_query_embeddings, save_query_embeddings
from dkd_ray.eval.average_precision import average_precision
from dkd_ray.eval.cbgm import CBGMConfig, query_context_from_detections
from dkd_ray.eval.detection import evaluate_detection
from dkd_ray.eval.pipeline import EvaluationReport, evaluate_arrays
from dkd_ray.eval.search import ProtocolResult, SearchResults, evaluate_search

__all__ = [
    "CBGMConfig",
    "Detections",
    "EvaluationReport",
    "ProtocolResult",
    "SearchResults",
    "average_precision",
    "evaluate_arrays",
    "evaluate_detection",
    "evaluate_search",
    "load_query_embeddings",
    "query_context_from_detections",
    "save_query_embeddings",
]
