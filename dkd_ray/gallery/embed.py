"""The student over decoded frames, as a Ray Data actor (one model per actor, loaded once).

A batch of frames in, one row per detected person out: where it was found (source, frame,
timestamp, box in original pixels, image size), the detection score and the L2-normalised
embedding. Frames are resized as in training and evaluation (``resize_scene`` with the model's
own ``short_side``/``max_side``), so an index over a test split holds exactly what the evaluator
scores (see ``index.evaluation_arrays``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import torch

FRAME_MARKER = -1.0  # the score of a frame's marker row (never a detection's: scores are in [0, 1])
SCHEMA_FIELDS = ("source", "content_hash", "frame", "timestamp", "box", "score", "image_width", "image_height",
                 "embedding")


def model_digest(model: torch.nn.Module) -> str:
    """sha256 over the weights (names, shapes, bytes), 16 hex digits: which model built an index,
    whatever reference (URI, run, path) loaded it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def scene_sizes(model: torch.nn.Module) -> tuple[int, int]:
    data = (getattr(model, "spec", {}).get("config") or {}).get("data", {})
    return int(data.get("short_side", 900)), int(data.get("max_side", 1500))


def empty_table(dim: int) -> pa.Table:
    return pa.table({
        "source": pa.array([], pa.string()), "content_hash": pa.array([], pa.string()),
        "frame": pa.array([], pa.int64()), "timestamp": pa.array([], pa.float64()),
        "box": pa.array([], pa.list_(pa.float32(), 4)), "score": pa.array([], pa.float32()),
        "image_width": pa.array([], pa.int32()), "image_height": pa.array([], pa.int32()),
        "embedding": pa.array([], pa.list_(pa.float32(), dim))})


@torch.no_grad()
def detect_and_embed(model: torch.nn.Module, image: np.ndarray, device: torch.device,
                     sizes: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes [n,4] original pixels, scores [n], embeddings [n,d])`` of one uint8 RGB frame."""
    from dkd_ray.data.transforms import resize_scene

    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    resized, _ = resize_scene(tensor, torch.zeros(0, 4), *sizes)
    scale = resized.shape[-1] / tensor.shape[-1]
    output = model([resized.to(device)])[0]
    return ((output["boxes"].float() / scale).cpu().numpy(), output["scores"].float().cpu().numpy(),
            output["embeddings"].float().cpu().numpy())


class GalleryEmbedder:
    """Ray Data callable class: ``__call__(batch of frames) -> pyarrow.Table`` of detections."""

    def __init__(self, model_ref: str, tracking_uri: str | None = None, score_threshold: float | None = None,
                 use_gpu: bool = False) -> None:
        from dkd_ray.models.loading import load_model

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_model(model_ref, role="student", map_location=self.device, uri=tracking_uri).to(self.device)
        if score_threshold is not None:
            self.model.roi_heads.score_thresh = float(score_threshold)
        self.sizes = scene_sizes(self.model)
        self.dim = int(self.model.roi_heads.reid_head.embedding_dim)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        parts = []
        for i in range(len(batch["source"])):
            image = batch["image"][i]
            boxes, scores, embeddings = detect_and_embed(self.model, image, self.device, self.sizes)
            # One marker row per frame first (score FRAME_MARKER): the driver counts frames by them
            # and drops them before writing, so frames without anyone in them are counted too.
            boxes = np.concatenate([np.zeros((1, 4), np.float32), boxes])
            scores = np.concatenate([np.float32([FRAME_MARKER]), scores])
            embeddings = np.concatenate([np.zeros((1, self.dim), np.float32), embeddings])
            parts.append(detections_table({name: _scalar(batch[name][i]) for name in SCHEMA_FIELDS[:4]},
                                          image.shape, boxes, scores, embeddings))
        return pa.concat_tables(parts) if parts else empty_table(self.dim)


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def detections_table(where: dict[str, Any], image_shape: tuple[int, ...], boxes: np.ndarray, scores: np.ndarray,
                     embeddings: np.ndarray) -> pa.Table:
    """One frame's detections as index rows (``where``: source, content_hash, frame, timestamp)."""
    n, dim = embeddings.shape
    fixed = pa.FixedSizeListArray.from_arrays
    return pa.table({
        **{name: pa.array([where[name]] * n, empty_table(dim).schema.field(name).type) for name in SCHEMA_FIELDS[:4]},
        "box": fixed(pa.array(boxes.astype(np.float32).ravel()), 4),
        "score": pa.array(scores.astype(np.float32)),
        "image_width": pa.array([int(image_shape[1])] * n, pa.int32()),
        "image_height": pa.array([int(image_shape[0])] * n, pa.int32()),
        "embedding": fixed(pa.array(embeddings.astype(np.float32).ravel()), dim)})
