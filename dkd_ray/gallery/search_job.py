"""``jobs/search.py``'s work: load the model and index, embed the query, filter, search, render."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import pyarrow as pa

from .embed import model_digest, scene_sizes
from .errors import GalleryInputError
from .index import boxes_of, check_same_model, embeddings_of, read_index
from .query import Query, check_box, embed_queries, filter_mask, load_rgb, top_k
from .report import render


def run_search(args: argparse.Namespace) -> dict[str, Any]:
    from dkd_ray.models.loading import load_model

    if args.box is not None and len(args.query) != 1:
        raise GalleryInputError(f"--box goes with one --query image, got {len(args.query)}")
    info, table = read_index(args.index)  # before the model: a missing index is named at once
    model = load_model(args.model, role="student", uri=args.tracking_uri)
    check_same_model(info, model_digest(model), str(args.model), args.index)
    queries = [Query(path, tuple(args.box) if args.box is not None else None) for path in args.query]
    query = embed_queries(model, queries, scene_sizes(model))

    keep = filter_mask(np.asarray(table.column("source").to_pylist(), dtype=object),
                       table.column("timestamp").to_numpy(), table.column("score").to_numpy(),
                       source_glob=args.source, time_range=tuple(args.time_range) if args.time_range else None,
                       min_score=args.min_score)
    kept = table.filter(pa.array(keep)) if len(table) else table
    rows, sims, method = top_k(embeddings_of(kept), query, args.top_k, args.method)
    boxes = boxes_of(kept)
    hits = [{"rank": rank, "similarity": float(sim), "source": kept.column("source")[int(r)].as_py(),
             "frame": int(kept.column("frame")[int(r)].as_py()),
             "timestamp": float(kept.column("timestamp")[int(r)].as_py()),
             "box": [float(v) for v in boxes[int(r)]], "score": float(kept.column("score")[int(r)].as_py())}
            for rank, (r, sim) in enumerate(zip(rows, sims), 1)]
    query_images = []
    for q in queries:
        rgb = load_rgb(q.image)
        box = check_box(q.box, rgb.shape[1], rgb.shape[0], q.image) if q.box else (0, 0, rgb.shape[1], rgb.shape[0])
        query_images.append((rgb, list(box)))
    files = render(query_images, hits, args.output_dir, f"search of {args.index} ({info.model_ref})")
    return {"hits": hits, "searched": int(keep.sum()), "method": method, "files": files}
