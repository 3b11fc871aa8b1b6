"""A query's embedding and the search over an index.

A query is a person crop (the whole image is the box), or an image plus a box, or several of
them (the same person: their embeddings are averaged, then renormalised). The student embeds a
query's box from the scene features, as the evaluator embeds a protocol query's ground truth.

Search: cosine similarity (embeddings are L2-normalised, so an inner product). ``exact``
computes it in blocks of rows (one matrix product per block, top-k kept per block: memory stays
bounded on any gallery size); ``faiss-flat`` is faiss's exact inner-product index, ``faiss-hnsw``
its approximate graph index. ``auto`` takes exact below ``AUTO_APPROXIMATE`` rows and HNSW (when
faiss is installed) above. Measured (bench/bench_search.py, BENCHMARKS.md): exact is 76 ms a query
over 1M 256-d rows on 2 CPU cores, while an HNSW graph is built per search (minutes at 1M rows:
it is not stored in the index yet) and its recall@10 on random embeddings was poor, hence the
high threshold.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import torch

from .errors import GalleryInputError

METHODS = ("auto", "exact", "faiss-flat", "faiss-hnsw")
AUTO_APPROXIMATE = 10_000_000
BLOCK_ROWS = 65_536


@dataclass(frozen=True)
class Query:
    image: str
    box: tuple[float, float, float, float] | None = None  # None: the whole image is the person


def load_rgb(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:
        raise GalleryInputError(f"{path}: unreadable query image ({type(error).__name__}: {error})") from None


def check_box(box: tuple[float, ...], width: int, height: int, path: str) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite([x1, y1, x2, y2])) or x2 <= x1 or y2 <= y1:
        raise GalleryInputError(f"--box {x1:g} {y1:g} {x2:g} {y2:g} for {path}: expected x1 < x2 and y1 < y2")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise GalleryInputError(f"--box {x1:g} {y1:g} {x2:g} {y2:g} lies outside {path} ({width}x{height} pixels)")
    return x1, y1, x2, y2


@torch.no_grad()
def embed_queries(model: torch.nn.Module, queries: list[Query], sizes: tuple[int, int],
                  device: torch.device | None = None) -> np.ndarray:
    """The L2-normalised mean embedding ``[d]`` of the queries (one person)."""
    from dkd_ray.data.transforms import resize_scene

    if not queries:
        raise GalleryInputError("no query given: pass --query CROP (repeatable) or --query IMAGE --box x1 y1 x2 y2")
    device = device or torch.device("cpu")
    model.eval()
    rows = []
    for query in queries:
        rgb = load_rgb(query.image)
        height, width = rgb.shape[:2]
        box = check_box(query.box, width, height, query.image) if query.box else (0.0, 0.0, float(width), float(height))
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)
        resized, scaled = resize_scene(image, torch.tensor([box], dtype=torch.float32), *sizes)
        rows.append(model.embed_boxes([resized.to(device)], [scaled.to(device)])[0].float().cpu().numpy()[0])
    mean = np.mean(rows, axis=0)
    return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)


def filter_mask(sources: np.ndarray, timestamps: np.ndarray, scores: np.ndarray, *, source_glob: str = "",
                time_range: tuple[float, float] | None = None, min_score: float = 0.0) -> np.ndarray:
    """Rows kept by the filters: source path matching a glob, timestamp in [start, end], detection score."""
    keep = scores >= min_score
    if source_glob:
        keep &= np.array([fnmatch.fnmatch(s, source_glob) or fnmatch.fnmatch(s.rsplit("/", 1)[-1], source_glob)
                          for s in sources], dtype=bool)
    if time_range is not None:
        keep &= (timestamps >= time_range[0]) & (timestamps <= time_range[1])
    return keep


def exact_top_k(gallery: np.ndarray, query: np.ndarray, k: int, block_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, similarities)`` of the ``k`` most similar gallery rows, best first (ties: lower row first)."""
    best_rows = np.zeros(0, np.int64)
    best_sims = np.zeros(0, np.float32)
    for start in range(0, len(gallery), block_rows):
        sims = gallery[start:start + block_rows] @ query
        take = min(k, len(sims))
        part = np.argpartition(-sims, take - 1)[:take] if take < len(sims) else np.arange(len(sims))
        best_rows = np.concatenate([best_rows, part + start])
        best_sims = np.concatenate([best_sims, sims[part].astype(np.float32)])
        order = np.lexsort((best_rows, -best_sims))[:k]
        best_rows, best_sims = best_rows[order], best_sims[order]
    return best_rows, best_sims


def faiss_top_k(gallery: np.ndarray, query: np.ndarray, k: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        import faiss
    except ImportError:
        raise GalleryInputError(f"--method {method} needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
    dim = gallery.shape[1]
    if method == "faiss-flat":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(64, 2 * k)
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    sims, rows = index.search(np.ascontiguousarray(query[None], dtype=np.float32), min(k, len(gallery)))
    keep = rows[0] >= 0
    return rows[0][keep].astype(np.int64), sims[0][keep].astype(np.float32)


def top_k(gallery: np.ndarray, query: np.ndarray, k: int, method: str = "auto") -> tuple[np.ndarray, np.ndarray, str]:
    """``(rows, similarities, method used)``."""
    if method not in METHODS:
        raise GalleryInputError(f"--method {method!r}: expected one of {METHODS}")
    if k < 1:
        raise GalleryInputError(f"--top-k must be >= 1, got {k}")
    if len(gallery) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), "exact"
    if gallery.shape[1] != query.shape[0]:
        raise GalleryInputError(f"the index holds {gallery.shape[1]}-d embeddings, the query {query.shape[0]}-d")
    if method == "auto":
        try:
            import faiss  # noqa: F401
            method = "faiss-hnsw" if len(gallery) >= AUTO_APPROXIMATE else "exact"
        except ImportError:
            method = "exact"
    if method == "exact":
        rows, sims = exact_top_k(gallery, query, k)
    else:
        rows, sims = faiss_top_k(gallery, query, k, method)
    return rows, sims, method
