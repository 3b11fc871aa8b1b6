"""Online Instance Matching (OIM) loss (Xiao et al., CVPR 2017), as in OIM/SeqNet.

Two non-learned memories, registered as buffers so they are saved and restored with the model:
- ``lut`` ``[K, d]``: one L2-normalised feature per labelled training identity;
- ``queue`` ``[Q, d]``: the most recent features of unlabelled persons (circular, ``queue_ptr``).

A sample's logits are its cosine similarities to ``[lut; queue]`` times ``scalar``; the loss is
cross-entropy on the labelled samples (unlabelled ones are negatives only, via the queue).
Gradients reach the features, never the memories.

Memory update after each training forward (no gradient), with the batch's features:
- ``update="sample"`` (the default, as OIM and SeqNet): one momentum step per labelled sample, in
  batch order, ``lut[y] <- normalise(m * lut[y] + (1 - m) * x)``. A person seen by dozens of
  proposals and FSA copies in one step moves its entry dozens of times (m^n of the old entry
  survives). Computed in rounds: round r applies every identity's r-th sample at once, which
  equals the sequential loop because different identities' updates commute;
- ``update="mean"`` (an option): one step per identity towards the mean of its batch features;
- unlabelled features are written at ``queue_ptr`` in batch order, wrapping around; if a batch
  holds more than ``Q`` of them only the last ``Q`` are kept.
Under ``torch.distributed`` the features and labels of all workers are gathered first (rank
order), so every worker applies the same update and the memories stay identical.

All OIM math runs in float32 with autocast off.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

UNLABELLED = -1
OIM_UPDATES = ("sample", "mean")


class OIMLoss(nn.Module):
    """``forward(features [N, d], pids [N]) -> scalar loss`` (``pids``: 0..K-1 labelled, -1 unlabelled)."""

    def __init__(self, embedding_dim: int, num_labelled: int, queue_size: int,
                 scalar: float = 30.0, momentum: float = 0.5, update: str = "sample") -> None:
        super().__init__()
        if update not in OIM_UPDATES:
            raise ValueError(f"OIM update must be one of {OIM_UPDATES}, got {update!r}")
        self.update_rule = update
        if num_labelled < 1 or queue_size < 1:
            raise ValueError(f"OIM needs num_labelled >= 1 and queue_size >= 1, got {num_labelled}, {queue_size}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"OIM momentum must be in [0, 1), got {momentum}")
        self.embedding_dim, self.num_labelled, self.queue_size = embedding_dim, num_labelled, queue_size
        self.scalar, self.momentum = scalar, momentum
        self.register_buffer("lut", torch.zeros(num_labelled, embedding_dim))
        self.register_buffer("queue", torch.zeros(queue_size, embedding_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def labelled_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Scaled cosine logits ``[N, K]`` against the lookup table only: the student's identity
        scores over the training identities (probability-aware KD)."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            # clone: the table is updated in place later in the step, after autograd saved it
            return self.scalar * features.float() @ self.lut.clone().T

    def forward(self, features: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.embedding_dim or pids.shape != features.shape[:1]:
            raise ValueError(f"OIM expects features [N, {self.embedding_dim}] and pids [N], got "
                             f"{tuple(features.shape)} and {tuple(pids.shape)}")
        if pids.numel() and int(pids.max()) >= self.num_labelled:
            raise ValueError(f"OIM got identity {int(pids.max())} but has only {self.num_labelled} labelled identities")
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = features.float()
            logits = self.scalar * x @ torch.cat([self.lut, self.queue]).T
            labelled = pids >= 0
            if labelled.any():
                loss = F.cross_entropy(logits[labelled], pids[labelled])
            else:  # still a graph through the features, so backward (and DDP) see the head used
                loss = logits.sum() * 0.0
            if self.training:
                self.update(x.detach(), pids)
        return loss

    @torch.no_grad()
    def update(self, features: torch.Tensor, pids: torch.Tensor) -> None:
        """Apply the momentum / queue update with this batch (gathered over all workers)."""
        features, pids = gather_from_workers(features.float(), pids)
        labelled = pids >= 0
        if labelled.any():
            if self.update_rule == "sample":
                self._update_per_sample(features[labelled], pids[labelled])
            else:
                self._update_per_identity_mean(features[labelled], pids[labelled])
        unlabelled = features[pids == UNLABELLED][-self.queue_size:]
        n = unlabelled.shape[0]
        if n:
            slots = (self.queue_ptr + torch.arange(n, device=features.device)) % self.queue_size
            self.queue[slots] = unlabelled
            self.queue_ptr.copy_((self.queue_ptr + n) % self.queue_size)

    def _update_per_sample(self, features: torch.Tensor, pids: torch.Tensor) -> None:
        order = torch.argsort(pids, stable=True)  # stable: each identity's samples keep batch order
        sorted_pids = pids[order]
        starts = torch.searchsorted(sorted_pids, sorted_pids)  # first position of each sample's identity
        occurrence = torch.empty_like(pids)
        occurrence[order] = torch.arange(len(pids), device=pids.device) - starts
        for r in range(int(occurrence.max()) + 1):
            chosen = occurrence == r  # at most one sample per identity
            ids = pids[chosen]
            mixed = self.momentum * self.lut[ids] + (1 - self.momentum) * features[chosen]
            self.lut[ids] = F.normalize(mixed, dim=1)

    def _update_per_identity_mean(self, features: torch.Tensor, pids: torch.Tensor) -> None:
        ids, inverse = torch.unique(pids, return_inverse=True)
        sums = features.new_zeros(len(ids), features.shape[1]).index_add_(0, inverse, features)
        counts = torch.bincount(inverse, minlength=len(ids)).to(features.dtype)
        mixed = self.momentum * self.lut[ids] + (1 - self.momentum) * sums / counts[:, None]
        self.lut[ids] = F.normalize(mixed, dim=1)


def gather_from_workers(features: torch.Tensor, pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``(features, pids)`` of all workers in rank order (identity without distributed).

    Workers hold different counts, so rows are padded to the largest count for ``all_gather``
    and trimmed after. Every worker must call this in every training step (it is a collective).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, pids
    world = dist.get_world_size()
    count = torch.tensor([features.shape[0]], device=features.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    # One tensor per worker: features and the pid as an extra float32 column (ids < 2^24: exact).
    packed = features.new_zeros(max(counts), features.shape[1] + 1)
    packed[: features.shape[0], :-1] = features
    packed[: features.shape[0], -1] = pids.to(features.dtype)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed)
    rows = torch.cat([g[:c] for g, c in zip(gathered, counts)])
    return rows[:, :-1].contiguous(), rows[:, -1].round().to(pids.dtype)
