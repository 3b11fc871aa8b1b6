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

    ``epoch_unit="crops"`` (default, BoT's ``RandomIdentitySampler``): each identity's samples
    are shuffled and cut into groups of ``k`` (an identity with fewer than ``k`` is drawn up to
    ``k`` with replacement; a remainder under ``k`` is left out), and batches take one group from
    each of ``p`` identities drawn at random among those with groups left. So an epoch covers
    about every sample once. BoT's epoch ends when fewer than ``p`` identities have groups left,
    a length that varies from epoch to epoch; here the length is fixed at ``#groups // p`` (what
    the LR schedule counts in), and the last few batches draw from a reshuffled second pass.
    ``epoch_unit="identities"``: one group per identity per epoch (``#identities // p`` batches).

    Batches are dealt round-robin to the ``world_size`` workers, and every worker gets the same
    number, so no worker waits on another at the end of an epoch.
    """

    def __init__(self, pids: Sequence[int] | np.ndarray, p: int, k: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, epoch_unit: str = "crops") -> None:
        pids = np.asarray(pids)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if epoch_unit not in ("crops", "identities"):
            raise ValueError(f"epoch_unit must be crops or identities, got {epoch_unit!r}")
        identities, inverse = np.unique(pids, return_inverse=True)
        if len(identities) < p:
            raise ValueError(f"P x K sampler needs at least p={p} identities, the data has {len(identities)}")
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(identities) + 1))
        self.members = [order[bounds[i]:bounds[i + 1]] for i in range(len(identities))]
        self.p, self.k, self.rank, self.world_size, self.seed, self.epoch = p, k, rank, world_size, seed, 0
        self.epoch_unit = epoch_unit
        groups = sum(max(1, len(m) // k) for m in self.members) if epoch_unit == "crops" else len(self.members)
        self._batches_per_worker = (groups // p) // world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._batches_per_worker

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        make = self._crop_batches if self.epoch_unit == "crops" else self._identity_batches
        batches = make(rng, len(self) * self.world_size)
        for batch in batches[self.rank :: self.world_size]:
            yield [int(i) for i in batch]

    def _group(self, rng: np.random.Generator, identity: int, count: int | None = None) -> list[np.ndarray]:
        members = self.members[identity]
        if len(members) < self.k:
            return [rng.choice(members, self.k, replace=True)]
        shuffled = rng.permutation(members)
        groups = len(members) // self.k if count is None else count
        return [shuffled[g * self.k:(g + 1) * self.k] for g in range(groups)]

    def _identity_batches(self, rng: np.random.Generator, total: int) -> list[np.ndarray]:
        identities = rng.permutation(len(self.members))[: total * self.p].reshape(total, self.p)
        return [np.concatenate([self._group(rng, int(i), 1)[0] for i in batch]) for batch in identities]

    def _crop_batches(self, rng: np.random.Generator, total: int) -> list[np.ndarray]:
        batches: list[np.ndarray] = []
        while len(batches) < total:  # one BoT pass, then (rarely more than a few batches) another
            queues = {i: self._group(rng, i) for i in range(len(self.members))}
            available = list(queues)
            while len(available) >= self.p and len(batches) < total:
                chosen = rng.choice(len(available), self.p, replace=False)
                picked = [available[c] for c in chosen]
                batches.append(np.concatenate([queues[i].pop() for i in picked]))
                available = [i for i in available if queues[i]]
        return batches


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
