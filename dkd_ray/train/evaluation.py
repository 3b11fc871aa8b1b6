"""Evaluation inside a training run: every worker runs inference on its shard of the test images
and queries, rank 0 gathers the arrays and computes the dataset's full protocol.

Returns the metrics (stable names from ``dkd_ray.eval``) and, on rank 0, the arrays themselves,
which the loop stores with its final checkpoint so the job can write per-query results and
plots without running the model again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dkd_ray.config import Config
from dkd_ray.data.annotations import Annotations
from dkd_ray.eval.arrays import Detections
from dkd_ray.inference import student_gallery, student_queries
from dkd_ray.train.common import unwrap
from dkd_ray.train.session import Session

log = logging.getLogger(__name__)


@dataclass
class EvaluationArrays:
    gallery: Detections
    query_embeddings: np.ndarray

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.gallery.save(directory / "gallery.npz")
        np.save(directory / "query_embeddings.npy", self.query_embeddings)

    @classmethod
    def load(cls, directory: str | Path) -> EvaluationArrays:
        directory = Path(directory)
        return cls(Detections.load(directory / "gallery.npz"), np.load(directory / "query_embeddings.npy"))


def _gather(obj, session: Session) -> list:
    if session.world_size <= 1:
        return [obj]
    parts: list = [None] * session.world_size
    torch.distributed.all_gather_object(parts, obj)
    return parts


def student_arrays(student: torch.nn.Module, annotations: Annotations, cfg: Config,
                   session: Session) -> EvaluationArrays | None:
    """Sharded inference over the test split; the gathered arrays on rank 0, None elsewhere."""
    test_rows = annotations.images.indices("test")
    sizes = dict(short_side=cfg.data.short_side, max_side=cfg.data.max_side, device=session.device)
    every = max(1, len(test_rows) // session.world_size // 5)

    def progress(count: int) -> None:
        if session.is_main and count % every == 0:
            log.info("evaluation: %d / ~%d gallery images on this worker", count, len(test_rows) // session.world_size)

    shard = student_gallery(student, annotations, test_rows[session.rank :: session.world_size], progress=progress, **sizes)
    query_shard = student_queries(student, annotations, np.arange(len(annotations.queries))[session.rank :: session.world_size], **sizes)
    gallery_parts, query_parts = _gather(shard, session), _gather(query_shard, session)
    if not session.is_main:
        return None
    rows, boxes, scores, embeddings = ([x for part in gallery_parts for x in part[i]] for i in range(4))
    dim = student.embedding_dim
    gallery = Detections.from_lists(rows, boxes, scores, embeddings, num_images=len(annotations.images), dim=dim)
    query_embeddings = np.zeros((len(annotations.queries), dim), np.float32)
    for query_rows, values in query_parts:
        query_embeddings[query_rows] = values
    return EvaluationArrays(gallery, query_embeddings)


def evaluate_student(model: torch.nn.Module, annotations: Annotations, cfg: Config, session: Session,
                     prefix: str = "") -> tuple[dict[str, float], EvaluationArrays | None]:
    """The full protocol of the dataset for the (possibly DDP-wrapped) distilled student.
    With ``prefix`` (``"val/"`` on a validation view) the headline protocol's mAP and top-1 are
    also reported as ``<prefix>mAP`` / ``<prefix>top1``, the names sweeps rank trials by."""
    from dkd_ray.eval.pipeline import evaluate_arrays, headline_prefix

    wrapped = unwrap(model)
    student = getattr(wrapped, "student", wrapped)
    was_training = student.training
    arrays = student_arrays(student, annotations, cfg, session)
    student.train(was_training)
    if arrays is None:
        return {}, None
    report = evaluate_arrays(annotations, arrays.gallery, arrays.query_embeddings,
                             score_threshold=cfg.eval.score_threshold, cbgm=cfg.eval.cbgm, plots=False)
    metrics = {f"{prefix}{k}": v for k, v in report.metrics.items()}
    if prefix:
        head = headline_prefix(report.metrics, annotations.dataset)
        metrics[f"{prefix}mAP"] = report.metrics.get(f"{head}/mAP", 0.0)
        metrics[f"{prefix}top1"] = report.metrics.get(f"{head}/top1", 0.0)
    return metrics, arrays
