"""What a trained teacher does before the student needs it, sharded over the run's workers:

- ``evaluate_teacher_on_ground_truth``: the two-step reference with a perfect detector (the
  teacher's embeddings of the ground-truth boxes), with the dataset's search protocol;
- ``build_bank_shard``: this worker's part of the knowledge bank (exact crops of the labelled
  training boxes, plain and flipped), written as ``bank/part-<rank>-of-<n>.parquet`` so the
  parts of all workers land side by side in the run's checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from dkd_ray.config import Config
from dkd_ray.data.annotations import Annotations
from dkd_ray.data.datasets import PersonCropDataset, labelled_box_rows
from dkd_ray.eval.arrays import Detections
from dkd_ray.inference import teacher_embed_boxes
from dkd_ray.train.evaluation import _gather
from dkd_ray.train.session import Session

log = logging.getLogger(__name__)

BANK_DIR = "bank"


def evaluate_teacher_on_ground_truth(teacher: torch.nn.Module, annotations: Annotations, cfg: Config,
                                     session: Session, prefix: str = "teacher_gt/") -> dict[str, float]:
    """Search metrics of the teacher on ground-truth boxes, named ``<prefix><protocol metric>``
    (rank 0). With ``prefix="val/"`` (a validation view) the headline protocol's mAP and top-1
    are also reported as ``val/mAP`` / ``val/top1``, the names sweeps rank trials by."""
    from dkd_ray.eval.pipeline import headline_prefix
    from dkd_ray.eval.search import evaluate_search

    crop = (cfg.teacher.input_height, cfg.teacher.input_width)
    images = annotations.images
    rows = [int(r) for r in images.indices("test")[session.rank :: session.world_size]]
    gallery = teacher_embed_boxes(teacher, annotations, rows, [images.boxes_of(r) for r in rows],
                                  crop_size=crop, device=session.device)
    query_rows = np.arange(len(annotations.queries))[session.rank :: session.world_size]
    queries = annotations.queries
    query_emb = teacher_embed_boxes(teacher, annotations, [int(queries.image_index[q]) for q in query_rows],
                                    [queries.box[q : q + 1] for q in query_rows], crop_size=crop, device=session.device)
    parts = _gather((rows, gallery, query_rows, query_emb), session)
    if not session.is_main:
        return {}
    all_rows, all_emb, all_boxes = [], [], []
    query_embeddings = np.zeros((len(queries), teacher.embedding_dim), np.float32)
    for part_rows, part_emb, part_query_rows, part_query_emb in parts:
        all_rows += part_rows
        all_emb += part_emb
        all_boxes += [images.boxes_of(r) for r in part_rows]
        if len(part_query_rows):
            query_embeddings[part_query_rows] = np.concatenate(part_query_emb)
    dets = Detections.from_lists(all_rows, all_boxes, [np.ones(len(b), np.float32) for b in all_boxes], all_emb,
                                 num_images=len(images), dim=teacher.embedding_dim)
    search = evaluate_search(annotations, dets, query_embeddings, score_threshold=0.0)
    metrics = {f"{prefix}{k}": v for k, v in search.metrics.items()}
    if prefix == "val/":
        head = headline_prefix(search.metrics, annotations.dataset)
        metrics["val/mAP"] = search.metrics.get(f"{head}/mAP", 0.0)
        metrics["val/top1"] = search.metrics.get(f"{head}/top1", 0.0)
    return metrics


def build_bank_shard(teacher: torch.nn.Module, annotations: Annotations, cfg: Config, session: Session,
                     directory: Path, metadata: dict | None = None) -> Path:
    """This worker's part of the knowledge bank under ``directory/bank/``. Crops have the
    teacher's own input size (its stored config; ``cfg`` only for a teacher without one, i.e.
    the one this run trains). The bank records that size and the annotations' fingerprint
    (``box_index`` rows refer to ``annotations.images``; a validation view has its full table's)."""
    from dkd_ray.distill.bank import FINGERPRINT_KEY, TEACHER_INPUT_KEY, build_knowledge_bank_sharded
    from dkd_ray.models.loading import teacher_input_size

    crop_size = teacher_input_size(teacher, cfg)
    rows = labelled_box_rows(annotations, "train")[session.rank :: session.world_size]
    crops = PersonCropDataset(annotations, rows, crop_size=crop_size, on_unreadable="raise")  # every row or none
    loader = DataLoader(crops, batch_size=64, num_workers=cfg.data.loader_workers)
    batches = ((images, box_index, image_index) for images, _, box_index, image_index in loader)
    facts = {"dataset": cfg.data.dataset, TEACHER_INPUT_KEY: list(crop_size),
             FINGERPRINT_KEY: annotations.images.fingerprint()}
    return build_knowledge_bank_sharded(
        teacher, batches, directory / BANK_DIR, shard_index=session.rank, num_shards=session.world_size,
        device=session.device, metadata={**facts, **(metadata or {})}, progress=session.is_main)
