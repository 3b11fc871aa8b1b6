"""The teacher's training losses ("bag of tricks" Re-ID): label-smoothed identity cross-entropy on
the BN-neck logits, batch-hard triplet loss on the features before the BN-neck."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LabelSmoothingCrossEntropy(nn.Module):
    """Cross-entropy against ``(1 - eps) * one_hot + eps / K`` (torch's ``label_smoothing``)."""

    def __init__(self, epsilon: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {epsilon}")
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.epsilon)


class BatchHardTripletLoss(nn.Module):
    """For each anchor: its farthest positive and nearest negative in the batch (Euclidean),
    ``mean(relu(d(a, p_hard) - d(a, n_hard) + margin))``. Anchors with no other sample of their
    identity or no sample of another identity are skipped (a P x K batch has none)."""

    def __init__(self, margin: float = 0.3) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = features.float()
        squared = (x * x).sum(dim=1)
        # Clamp before sqrt: exact zeros (duplicates) would give an infinite gradient.
        dist = (squared[:, None] + squared[None, :] - 2 * x @ x.T).clamp(min=1e-12).sqrt()
        same = targets[:, None] == targets[None, :]
        positive = same & ~torch.eye(len(targets), dtype=torch.bool, device=x.device)
        valid = positive.any(dim=1) & (~same).any(dim=1)
        if not valid.any():
            return x.sum() * 0.0
        hardest_positive = dist.masked_fill(~positive, float("-inf")).amax(dim=1)
        hardest_negative = dist.masked_fill(same, float("inf")).amin(dim=1)
        return F.relu(hardest_positive - hardest_negative + self.margin)[valid].mean()


class TeacherCriterion(nn.Module):
    """``{"loss_id": CE-LS(logits), "loss_triplet": batch-hard triplet(features)}`` from the
    teacher's train-mode output dict."""

    def __init__(self, label_smoothing: float = 0.1, triplet_margin: float = 0.3) -> None:
        super().__init__()
        self.identity = LabelSmoothingCrossEntropy(label_smoothing)
        self.triplet = BatchHardTripletLoss(triplet_margin)

    def forward(self, outputs: dict[str, torch.Tensor], pids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss_id": self.identity(outputs["logits"], pids),
                "loss_triplet": self.triplet(outputs["features"], pids)}
