"""The student's Re-ID head: RoI box features -> L2-normalised embedding (OIM/SeqNet style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    """``Linear(in, d) -> BatchNorm1d(d) -> L2 normalise``: ``[N, in] -> [N, d]``.

    The BatchNorm uses its running statistics for a training batch of a single row (batch
    statistics are undefined there), so a step with one person does not fail.
    """

    def __init__(self, in_channels: int, embedding_dim: int) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.projection = nn.Linear(in_channels, embedding_dim)
        self.norm = nn.BatchNorm1d(embedding_dim)
        nn.init.normal_(self.projection.weight, std=0.01)
        nn.init.zeros_(self.projection.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.projection(x)
        norm = self.norm
        x = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                         training=self.training and x.shape[0] > 1, momentum=norm.momentum, eps=norm.eps)
        return F.normalize(x, dim=1)
