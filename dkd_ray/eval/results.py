"""Writing evaluation outcomes: metrics.json, the per-query results file, a printable table.

Per-query results (``.jsonl``, one JSON object a line, or ``.parquet`` with the same fields):
``protocol``, ``query`` (QueryTable row), ``query_image``, ``query_box`` [x1 y1 x2 y2], ``pid``,
``ap`` (null where the query has no gallery match), ``count_gt``, ``count_tp``, ``first_rank``
(0-based rank of the best positive, -1 without one) and ``top``: the top-10 gallery detections,
best first, each ``{"image", "box", "score", "correct"}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from dkd_ray.data.annotations import Annotations
from dkd_ray.eval.arrays import Detections
from dkd_ray.eval.search import SearchResults


def query_records(
    searches: Iterable[SearchResults], annotations: Annotations, gallery: Detections
) -> Iterator[dict]:
    images, queries = annotations.images, annotations.queries
    query_image = images.name[queries.image_index]
    for search in searches:
        for name, result in search.protocols.items():
            rows = result.top_rows
            valid = rows >= 0
            safe = np.where(valid, rows, 0)
            top_image = images.name[gallery.image_index[safe]] if len(gallery) else np.full(rows.shape, "")
            top_box = np.round(gallery.boxes[safe], 2).tolist() if len(gallery) else []
            top_score = result.top_scores.astype(float).round(6).tolist()
            correct = result.top_correct.tolist()
            for q in range(len(queries)):
                ap = float(result.ap[q])
                yield {
                    "protocol": name,
                    "query": q,
                    "query_image": str(query_image[q]),
                    "query_box": [round(float(v), 2) for v in queries.box[q]],
                    "pid": int(queries.pid[q]),
                    "ap": None if math.isnan(ap) else ap,
                    "count_gt": int(result.count_gt[q]),
                    "count_tp": int(result.count_tp[q]),
                    "first_rank": int(result.first_rank[q]),
                    "top": [
                        {"image": str(top_image[q, j]), "box": top_box[q][j], "score": top_score[q][j],
                         "correct": bool(correct[q][j])}
                        for j in np.flatnonzero(valid[q])
                    ],
                }


def write_query_results(
    path: str | Path, searches: Iterable[SearchResults], annotations: Annotations, gallery: Detections
) -> Path:
    """Write every query of every protocol to ``.jsonl`` or ``.parquet`` (see module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = query_records(searches, annotations, gallery)
    if path.suffix == ".jsonl":
        with path.open("w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(records)), path)
    else:
        raise ValueError(f"{path}: per-query results are written as .jsonl or .parquet")
    return path


def read_query_results(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def write_metrics(path: str | Path, metrics: dict[str, float]) -> Path:
    """``metrics.json``: the flat metrics dict, keys sorted; NaN (undefined) written as null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in sorted(metrics.items())}
    path.write_text(json.dumps(clean, indent=2) + "\n")
    return path


def format_metrics_table(metrics: dict[str, float]) -> str:
    """A fixed-width table: one line per protocol (mAP, top-1/5/10, queries) and per detection set."""
    lines = []
    search_rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        prefix, _, metric = key.rpartition("/")
        if not key.startswith("det/"):
            search_rows.setdefault(prefix, {})[metric] = value
    if search_rows:
        lines.append(f"{'protocol':<28}{'mAP':>8}{'top-1':>8}{'top-5':>8}{'top-10':>8}{'queries':>9}")
        for prefix, row in search_rows.items():
            cells = "".join(_pct(row.get(m)) for m in ("mAP", "top1", "top5", "top10"))
            count = row.get("num_queries")
            lines.append(f"{prefix:<28}{cells}{'' if count is None else int(count):>9}")
    det_sets = [("det", "detection (all people)"), ("det/labelled", "detection (labelled)")]
    det_lines = [f"{label:<28}{_pct(metrics.get(p + '/ap'))}{_pct(metrics.get(p + '/recall'))}"
                 for p, label in det_sets if p + "/ap" in metrics]
    if det_lines:
        lines.append("")
        lines.append(f"{'detection':<28}{'AP':>8}{'recall':>8}")
        lines.extend(det_lines)
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>8}"
    return f"{100.0 * value:>7.2f}%"
