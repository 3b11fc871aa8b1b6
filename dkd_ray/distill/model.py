"""The distillation training wrapper: the student plus the KD terms, as one module for DDP.

``DistilledStudent.forward(images, targets, teacher_emb, teacher_logits)`` returns every loss of
a student step: detection + OIM (from the student) and the weighted KD terms computed on the
labelled ground-truth boxes (docs/METHOD.md, "The three distillation terms"), or with
``distill.rows="matched"`` on every Re-ID row of a labelled person (its matched proposals and
FSA copies too), each against the teacher's view of its box. The teacher
outputs must be given for those boxes in ``labelled_ground_truth(targets)`` order, e.g.::

    keys = labelled_ground_truth(targets)
    teacher_emb, teacher_logits = bank.lookup(keys["box_index"], keys["flipped"])
    losses = model(images, targets, teacher_emb, teacher_logits)

DDP wraps this module (so the training-only projection of the triplet-wise KD is averaged
across workers too); only ``.student`` is saved for inference.
"""

from __future__ import annotations

import torch
from torch import nn

from dkd_ray.config import Config
from dkd_ray.models.student import PersonSearchNet, build_student, labelled_ground_truth
from dkd_ray.models.teacher import teacher_embedding_dim

__all__ = ["DistilledStudent", "build_distilled_student", "labelled_ground_truth"]


class DistilledStudent(nn.Module):
    """``student`` plus an optional ``distill_loss`` (a ``DistillationLoss``; None: no KD)."""

    def __init__(self, student: PersonSearchNet, distill_loss: nn.Module | None = None) -> None:
        super().__init__()
        self.student = student
        self.distill_loss = distill_loss

    def forward(self, images: list[torch.Tensor], targets: list[dict], teacher_emb: torch.Tensor | None = None,
                teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        losses, gt = self.student(images, targets)
        if self.distill_loss is None:
            return losses
        m = len(gt["pids"])
        if teacher_emb is None or teacher_emb.shape[0] != m:
            got = None if teacher_emb is None else tuple(teacher_emb.shape)
            raise ValueError(f"distillation needs the teacher embeddings of the batch's {m} labelled boxes "
                             f"(labelled_ground_truth(targets) order), got {got}")
        device = gt["embeddings"].device
        teacher_emb = teacher_emb.to(device, non_blocking=True)
        if teacher_logits is not None:
            if teacher_logits.shape != gt["oim_logits"].shape:
                raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                                 f"{tuple(gt['oim_logits'].shape)}: the teacher must score the same "
                                 f"{self.student.num_train_ids} training identities")
            teacher_logits = teacher_logits.to(device, non_blocking=True)
        if self.distill_loss.cfg.rows == "matched":  # every Re-ID row of a labelled person, its box's teacher view
            rows = gt["matched_rows"]
            losses.update(self.distill_loss(
                gt["matched_embeddings"], gt["matched_oim_logits"], teacher_emb[rows],
                None if teacher_logits is None else teacher_logits[rows], gt["pids"][rows],
                keys=(teacher_emb, gt["pids"])))  # one key per box: copies would outweigh lone boxes
        else:
            losses.update(self.distill_loss(gt["embeddings"], gt["oim_logits"], teacher_emb, teacher_logits,
                                            gt["pids"]))
        return losses


def build_distilled_student(cfg: Config, num_train_ids: int, teacher_dim: int | None = None) -> DistilledStudent:
    """The student of ``cfg`` with the KD terms of ``cfg.distill`` (none when disabled or all
    weights are 0). ``teacher_dim`` defaults to the embedding size of ``cfg.teacher.backbone``."""
    student = build_student(cfg, num_train_ids)
    d = cfg.distill
    if not d.active:
        return DistilledStudent(student, None)
    from dkd_ray.distill.losses import DistillationLoss

    dim = teacher_dim if teacher_dim is not None else teacher_embedding_dim(cfg.teacher)
    return DistilledStudent(student, DistillationLoss(d, student.embedding_dim, dim))
