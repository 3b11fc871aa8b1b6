"""PNG plots of an evaluation: CUHK-SYSU mAP against gallery size, CMC curves, query pictures.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so
this works on headless workers and inside processes that already use matplotlib otherwise.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from dkd_ray.data.annotations import Annotations
from dkd_ray.eval.arrays import Detections
from dkd_ray.eval.search import ProtocolResult, SearchResults

log = logging.getLogger(__name__)

_GALLERY_KEY = re.compile(r"^cuhk_sysu/(?:(cbgm)/)?g(\d+)/mAP$")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_gallery_size_curve(metrics: dict[str, float], path: str | Path) -> Path | None:
    """CUHK-SYSU mAP against ``TestG`` size (50 ... 4000), one line per method (plain / CBGM).
    Returns None when the metrics hold fewer than two gallery sizes."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for key, value in metrics.items():
        match = _GALLERY_KEY.match(key)
        if match:
            curves.setdefault("CBGM" if match.group(1) else "plain", []).append((int(match.group(2)), value))
    if not curves or max(len(points) for points in curves.values()) < 2:
        return None
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for label, points in sorted(curves.items(), reverse=True):
        points.sort()
        ax.plot([s for s, _ in points], [100 * v for _, v in points], marker="o", label=label)
    sizes = sorted({s for points in curves.values() for s, _ in points})
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("gallery size")
    ax.set_ylabel("mAP (%)")
    ax.set_title("CUHK-SYSU: mAP against gallery size")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


CMC_PROTOCOLS = ("g100", "full", "all", "cross_cam")  # the commonly reported ones


def plot_cmc(searches: list[SearchResults], path: str | Path, max_rank: int = 20) -> Path:
    """Cumulative matching characteristic: top-k accuracy for k = 1..max_rank, for the commonly
    reported protocols (CUHK-SYSU g100 and full set, PRW all and cross-camera; plain and CBGM),
    or for every protocol when none of those ran."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    ranks = np.arange(1, max_rank + 1)
    results = [(n, r) for s in searches for n, r in s.protocols.items()]
    shown = [(n, r) for n, r in results if n.rsplit("/", 1)[-1] in CMC_PROTOCOLS] or results
    for name, result in shown:
        ax.plot(ranks, 100 * result.cmc(max_rank), marker=".", label=name)
    ax.set_xlabel("rank k")
    ax.set_ylabel("top-k accuracy (%)")
    ax.set_title("CMC")
    ax.set_xlim(1, max_rank)
    ax.set_ylim(0, 101)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_query_matches(
    annotations: Annotations,
    gallery: Detections,
    result: ProtocolResult,
    query: int,
    path: str | Path,
    top_k: int = 5,
) -> Path | None:
    """The query image (query box in blue) beside its ``top_k`` matches (green correct, red
    wrong). Returns None, with a log message, when an image file is missing (annotation-only
    data)."""
    from PIL import Image

    images, queries = annotations.images, annotations.queries
    rows = result.top_rows[query]
    rows = rows[rows >= 0][:top_k]
    paths = [annotations.image_path(int(queries.image_index[query]))]
    paths += [annotations.image_path(int(gallery.image_index[r])) for r in rows]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        log.warning("skipping the picture of query %d: image file %s not found (annotation-only "
                    "data has no pixels)", query, missing[0])
        return None
    from matplotlib.patches import Rectangle

    fig = _figure(3 * (len(rows) + 1), 3.6)
    panels = [(paths[0], queries.box[query], "tab:blue", f"query {query}\n{images.name[queries.image_index[query]]}")]
    for j, r in enumerate(rows):
        ok = bool(result.top_correct[query, j])
        panels.append((paths[j + 1], gallery.boxes[r], "limegreen" if ok else "red",
                       f"#{j + 1}  {result.top_scores[query, j]:.3f}\n{images.name[gallery.image_index[r]]}"))
    for k, (image_path, box, colour, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        with Image.open(image_path) as img:
            ax.imshow(np.asarray(img.convert("RGB")))
        x1, y1, x2, y2 = (float(v) for v in box)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2.5))
        ax.set_title(title, fontsize=8, color="black" if k == 0 else colour)
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def pick_example_queries(result: ProtocolResult, count: int) -> list[int]:
    """Up to ``count`` queries to picture: the first failures (wrong top-1), then successes."""
    evaluated = np.flatnonzero(result.evaluated & (result.top_rows[:, 0] >= 0))
    top1 = result.first_rank[evaluated] == 0
    failures = evaluated[~top1][: (count + 1) // 2]
    successes = evaluated[top1][: count - len(failures)]
    return sorted(np.concatenate([failures, successes]).astype(int).tolist())
