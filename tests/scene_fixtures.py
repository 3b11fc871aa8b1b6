"""Tiny hand-made annotation sets with real image files, for data-layer tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dkd_ray.data.annotations import Annotations, ImageTable, QueryTable


def painted_scene(root: Path, boxes_per_image: list[list[tuple[int, int, int, int, int]]],
                  size: tuple[int, int] = (120, 80)) -> Annotations:
    """Write PNG scenes (lossless) where each box ``(x1, y1, x2, y2, pid)`` is painted a unique
    solid colour on a black background, and return their Annotations (all in the train split)."""
    width, height = size
    names, paths, offsets, boxes, pids = [], [], [0], [], []
    colour = 0
    for i, image_boxes in enumerate(boxes_per_image):
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        for x1, y1, x2, y2, pid in image_boxes:
            colour += 1
            pixels[y1:y2, x1:x2] = box_colour(colour)
            boxes.append((x1, y1, x2, y2))
            pids.append(pid)
        name = f"scene{i}.png"
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "img" / name)
        names.append(name)
        paths.append(f"img/{name}")
        offsets.append(len(boxes))
    n = len(names)
    images = ImageTable(
        name=np.array(names, dtype=object), path=np.array(paths, dtype=object),
        split=np.array(["train"] * n, dtype=object), width=np.full(n, width, np.int32),
        height=np.full(n, height, np.int32), camera=np.full(n, -1, np.int16),
        box_offsets=np.array(offsets, np.int64), boxes=np.array(boxes, np.float32).reshape(-1, 4),
        pids=np.array(pids, np.int32))
    queries = QueryTable(image_index=np.zeros(0, np.int64), box=np.zeros((0, 4), np.float32), pid=np.zeros(0, np.int32))
    return Annotations(dataset="cuhk_sysu", root=root, images=images, queries=queries,
                       num_train_ids=int(max([p for p in pids if p >= 0], default=-1)) + 1)


def box_colour(k: int) -> tuple[int, int, int]:
    """Distinct, saturated colours for painted boxes (k >= 1)."""
    return (40 * k % 256, 255 - 30 * k % 200, 90 + 50 * k % 160)
