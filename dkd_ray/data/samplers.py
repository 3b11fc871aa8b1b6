"""Samplers for data-parallel training: each worker a disjoint shard, reshuffled per epoch from a seed.

Scenes use torch's ``DistributedSampler`` (via ``scene_sampler``); the teacher uses
``PKBatchSampler`` (P identities x K instances per batch). Both are pure functions of
``(seed, epoch, rank, world_size)``, and ``SkipBatches`` resumes an epoch part-way through, so a
restarted worker continues with exactly the batches it had not yet seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import DistributedSampler, Sampler


def scene_sampler(dataset, *, rank: int, world_size: int, seed: int, shuffle: bool = True) -> DistributedSampler:
    """Disjoint shard of ``dataset`` for ``rank``; padded so every worker gets the same count."""
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)


class PKBatchSampler(Sampler[list[int]]):
    """Batches of ``p`` identities with ``k`` samples each, sharded across workers.

    Per epoch the identities are shuffled and grouped into batches of ``p``; each identity draws
    ``k`` of its samples (without replacement where it has ``k`` or more). Batches are dealt
    round-robin to the ``world_size`` workers, and every worker gets the same number of batches,
    so no worker waits on another at the end of an epoch.
    """

    def __init__(self, pids: Sequence[int] | np.ndarray, p: int, k: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0) -> None:
        pids = np.asarray(pids)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        identities, inverse = np.unique(pids, return_inverse=True)
        if len(identities) < p:
            raise ValueError(f"P x K sampler needs at least p={p} identities, the data has {len(identities)}")
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(identities) + 1))
        self.members = [order[bounds[i]:bounds[i + 1]] for i in range(len(identities))]
        self.p, self.k, self.rank, self.world_size, self.seed, self.epoch = p, k, rank, world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.members) // self.p) // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        identities = rng.permutation(len(self.members))
        per_worker = len(self)
        usable = identities[: per_worker * self.world_size * self.p]
        batches = usable.reshape(per_worker * self.world_size, self.p)
        for batch in batches[self.rank :: self.world_size]:
            indices: list[int] = []
            for identity in batch:
                members = self.members[identity]
                replace = len(members) < self.k
                indices.extend(int(i) for i in rng.choice(members, self.k, replace=replace))
            yield indices


class SkipBatches(Sampler):
    """Wraps a (batch) sampler and drops its first ``skip`` items: resuming mid-epoch."""

    def __init__(self, sampler: Sampler, skip: int) -> None:
        self.sampler, self.skip = sampler, max(0, skip)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)

    def __iter__(self) -> Iterator:
        for position, item in enumerate(self.sampler):
            if position >= self.skip:
                yield item
