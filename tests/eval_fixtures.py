"""Tiny hand-made Annotations and Detections for the evaluation tests.

Scenes are described by image name; similarities are made exact by giving the query the
embedding e0 and a detection the unit vector ``sim_vector(s)`` whose dot product with e0 is s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dkd_ray.data.annotations import Annotations, GalleryProtocol, ImageTable, QueryTable
from dkd_ray.eval.arrays import Detections

DIM = 4
QUERY = np.eye(DIM, dtype=np.float32)[0]


def sim_vector(s: float, axis: int = 1) -> np.ndarray:
    """A unit vector whose dot product with ``QUERY`` (e0) is ``s``."""
    v = np.zeros(DIM, np.float64)
    v[0] = s
    v[axis] = np.sqrt(max(0.0, 1.0 - s * s))
    return v.astype(np.float32)


def build_annotations(
    dataset: str,
    images: list[dict],
    queries: list[tuple[str, tuple, int]],
    galleries: dict[int, tuple[list[list[str]], list[tuple[int, str, tuple]]]] | None = None,
    root: Path = Path("/nonexistent-dataset-root"),
) -> Annotations:
    """``images``: dicts with ``name``, ``boxes`` [(x1, y1, x2, y2, pid)], optional ``split``
    ('test'), ``camera`` (-1), ``size`` ((200, 200)). ``queries``: (image name, box, pid).
    ``galleries``: size -> (per-query lists of image names, positives (query, image name, box))."""
    names = [im["name"] for im in images]
    row = {n: i for i, n in enumerate(names)}
    offsets, boxes, pids = [0], [], []
    for im in images:
        for x1, y1, x2, y2, pid in im["boxes"]:
            boxes.append((x1, y1, x2, y2))
            pids.append(pid)
        offsets.append(len(boxes))
    table = ImageTable(
        name=np.array(names, dtype=object),
        path=np.array([f"img/{x}" for x in names], dtype=object),
        split=np.array([im.get("split", "test") for im in images], dtype=object),
        width=np.array([im.get("size", (200, 200))[0] for im in images], np.int32),
        height=np.array([im.get("size", (200, 200))[1] for im in images], np.int32),
        camera=np.array([im.get("camera", -1) for im in images], np.int16),
        box_offsets=np.array(offsets, np.int64),
        boxes=np.array(boxes, np.float32).reshape(-1, 4),
        pids=np.array(pids, np.int32),
    )
    query_table = QueryTable(
        image_index=np.array([row[name] for name, _, _ in queries], np.int64),
        box=np.array([box for _, box, _ in queries], np.float32).reshape(-1, 4),
        pid=np.array([pid for _, _, pid in queries], np.int32),
    )
    protocols = {}
    for size, (lists, positives) in (galleries or {}).items():
        protocols[size] = GalleryProtocol(
            size=size,
            image_index=np.array([[row[x] for x in lst] for lst in lists], np.int64),
            positive_query=np.array([q for q, _, _ in positives], np.int64),
            positive_image=np.array([row[x] for _, x, _ in positives], np.int64),
            positive_box=np.array([b for _, _, b in positives], np.float32).reshape(-1, 4),
        )
    return Annotations(dataset=dataset, root=Path(root), images=table, queries=query_table,
                       galleries=protocols)


def build_detections(annotations: Annotations, per_image: dict[str, list[tuple]]) -> Detections:
    """``per_image``: image name -> [(box, score, embedding or similarity to QUERY)]."""
    row = {n: i for i, n in enumerate(annotations.images.name)}
    indices, boxes, scores, embeddings = [], [], [], []
    for name, dets in per_image.items():
        indices.append(row[name])
        boxes.append(np.array([d[0] for d in dets], np.float32).reshape(-1, 4))
        scores.append(np.array([d[1] for d in dets], np.float32))
        embeddings.append(np.array([d[2] if np.ndim(d[2]) else sim_vector(d[2]) for d in dets],
                                   np.float32).reshape(-1, DIM))
    return Detections.from_lists(indices, boxes, scores, embeddings,
                                 num_images=len(annotations.images), dim=DIM)


A1 = (10, 10, 60, 110)  # person A (pid 1) in the query image and image a
A2 = (100, 10, 150, 110)  # person A in image b
X = (120, 120, 170, 190)  # somebody else
Y = (5, 130, 45, 195)


def cuhk_case(extra_dets: dict | None = None, listed=("a", "b", "c")):
    """Query A in image q; TestG3 lists a, b (both with A) and c; d is pool only."""
    images = [
        dict(name="q", boxes=[(*A1, 1), (*X, -1)]),
        dict(name="a", boxes=[(*A1, 1), (*X, -1)]),
        dict(name="b", boxes=[(*A2, 1), (*X, -1)]),
        dict(name="c", boxes=[(*X, -1)]),
        dict(name="d", boxes=[(*X, -1)]),
        dict(name="t", boxes=[(*X, 7)], split="train"),
    ]
    ann = build_annotations("cuhk_sysu", images, [("q", A1, 1)],
                            {3: ([list(listed)], [(0, "a", A1), (0, "b", A2)])})
    dets = {
        "q": [(A1, 0.9, 0.99), (X, 0.9, 0.2)],
        "a": [(A1, 0.9, 0.9), (X, 0.9, 0.3)],
        "b": [(A2, 0.9, 0.6), (X, 0.9, 0.7)],
        "c": [(X, 0.9, 0.8)],
        "d": [(X, 0.9, 0.85)],
        "t": [(X, 0.9, 0.98)],  # a training image is never searched
    }
    dets.update(extra_dets or {})
    return ann, build_detections(ann, dets)
