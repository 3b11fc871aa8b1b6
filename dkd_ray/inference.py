"""Run models over a dataset's images and hand evaluation what it takes: arrays.

``student_gallery``: the end-to-end student's detections, scores and embeddings per image;
``student_queries``: its embeddings of the queries' ground-truth boxes; ``teacher_embed_boxes``:
a Re-ID model's embeddings of given boxes (the two-step reference; the teacher on ground truth).
Images are resized as in training and results mapped back to the original pixel coordinates.
Each function works on any subset of images, so data-parallel workers each take a shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from dkd_ray.data.annotations import Annotations
from dkd_ray.data.datasets import crop_and_resize
from dkd_ray.data.datasets import load_image as _decode
from dkd_ray.data.matlab import DatasetError
from dkd_ray.data.transforms import resize_scene

PerImage = tuple[list[int], list[np.ndarray], list[np.ndarray], list[np.ndarray]]


def load_image(path) -> torch.Tensor:
    """An evaluation image, or bad input naming it: a test image cannot be skipped without
    changing the protocol, and a retry would read the same bytes."""
    try:
        return _decode(path)
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetError(path, f"unreadable image ({type(error).__name__}: {error}); run "
                                 "jobs/validate_dataset.py for the full list") from None


def _scaled_images(annotations: Annotations, rows: Iterable[int], short_side: int, max_side: int):
    for row in rows:
        image = load_image(annotations.image_path(int(row)))
        resized, _ = resize_scene(image, torch.zeros(0, 4), short_side, max_side)
        yield int(row), resized, resized.shape[-1] / image.shape[-1]


@torch.no_grad()
def student_gallery(student: torch.nn.Module, annotations: Annotations, rows: Iterable[int], *,
                    short_side: int, max_side: int, device: torch.device,
                    progress: Callable[[int], None] | None = None) -> PerImage:
    """Per image row: detected boxes [n,4] (original pixels), scores [n], embeddings [n,d]."""
    student.eval()
    indices, boxes, scores, embeddings = [], [], [], []
    for count, (row, image, scale) in enumerate(_scaled_images(annotations, rows, short_side, max_side), 1):
        output = student([image.to(device)])[0]
        indices.append(row)
        boxes.append((output["boxes"].float() / scale).cpu().numpy())
        scores.append(output["scores"].float().cpu().numpy())
        embeddings.append(output["embeddings"].float().cpu().numpy())
        if progress:
            progress(count)
    return indices, boxes, scores, embeddings


@torch.no_grad()
def student_queries(student: torch.nn.Module, annotations: Annotations, query_rows: Iterable[int], *,
                    short_side: int, max_side: int, device: torch.device) -> tuple[list[int], np.ndarray]:
    """The student's embedding of each query's ground-truth box, pooled from the query image."""
    student.eval()
    query_rows = [int(q) for q in query_rows]
    queries = annotations.queries
    out = []
    for q in query_rows:
        image = load_image(annotations.image_path(int(queries.image_index[q])))
        resized, box = resize_scene(image, torch.from_numpy(queries.box[q : q + 1].copy()), short_side, max_side)
        out.append(student.embed_boxes([resized.to(device)], [box.to(device)])[0].float().cpu().numpy())
    dim = out[0].shape[1] if out else 0
    return query_rows, np.concatenate(out) if out else np.zeros((0, dim), np.float32)


@torch.no_grad()
def teacher_embed_boxes(teacher: torch.nn.Module, annotations: Annotations, rows: list[int],
                        boxes: list[np.ndarray], *, crop_size: tuple[int, int], device: torch.device,
                        batch_size: int = 64) -> list[np.ndarray]:
    """A Re-ID model's L2-normalised embeddings of ``boxes[k]`` (original pixels) of image ``rows[k]``."""
    teacher.eval()
    out: list[np.ndarray] = []
    for row, image_boxes in zip(rows, boxes):
        if len(image_boxes) == 0:
            out.append(np.zeros((0, teacher.embedding_dim), np.float32))
            continue
        image = load_image(annotations.image_path(int(row)))
        crops = torch.stack([crop_and_resize(image, torch.from_numpy(np.asarray(b, np.float32)), crop_size)
                             for b in image_boxes])
        parts = [teacher(crops[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(crops), batch_size)]
        out.append(torch.cat(parts).numpy())
    return out
