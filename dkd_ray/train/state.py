"""Where a loop is in its run, and how it gets back there after a restart.

``Progress`` counts epochs and iterations; ``batches_done`` is how far into the current epoch
the samplers are, so a resumed worker skips exactly the batches it already trained on.
``RunState`` holds what a checkpoint captures (model, optimizer, scheduler, AMP scaler,
progress, RNG states) and writes/restores it for both training loops the same way. Every rank
saves and restores its own RNG streams (``rng_rank<r>.pt``): ranks draw different random numbers
(dropout-free models still draw in FSA jitter, proposal sampling and the samplers' fallbacks),
and a resumed rank must continue its own stream, not rank 0's.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from dkd_ray.config import Config
from dkd_ray.train.checkpoint import (TrainingState, load_checkpoint, restore_rank_rng, restore_rng_state,
                                      save_checkpoint, save_rank_rng)
from dkd_ray.train.session import Session

log = logging.getLogger(__name__)

EPOCH_RESULTS = "epoch_results.json"


@dataclass
class Progress:
    epoch: int = 0
    iteration: int = 0  # optimizer steps taken since the start of the run
    batches_done: int = 0  # batches of `epoch` already trained on

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class RunState:
    role: str  # teacher | student: recorded so the checkpoint can be loaded as a model
    num_classes: int
    cfg: Config
    session: Session
    model: nn.Module
    optimizer: Any
    scheduler: Any
    scaler: Any
    progress: Progress

    def resume(self) -> None:
        """Continue from the session's latest checkpoint, if there is one.

        A checkpoint taken at an epoch's end carries that epoch's results; they are reported
        again, because whatever consumes reports (Tune's scheduler, the sweep's MLflow runs) may
        not have received them before the interruption. Consumers ignore an epoch seen twice."""
        restored = self.session.latest_checkpoint()
        if restored is None:
            return
        state = load_checkpoint(restored)
        state.restore(self.model, self.optimizer, self.scheduler, self.scaler, restore_rng=False)
        self.progress = Progress(state.epoch, state.iteration, state.batches_done)
        self._restore_rng(restored, state)
        if self.session.is_main:
            log.info("%s: resumed from %s at epoch %d iteration %d", self.role, restored,
                     self.progress.epoch, self.progress.iteration)
        results = restored / EPOCH_RESULTS
        if self.progress.batches_done == 0 and results.is_file():
            self.session.report({**json.loads(results.read_text()), "replayed": 1})

    def _restore_rng(self, restored: Path, state: TrainingState) -> None:
        rank = self.session.rank
        if restore_rank_rng(restored, rank):
            return
        if rank == 0 and state.rng:  # checkpoints written before per-rank streams: rank 0's is in state.pt
            restore_rng_state(state.rng)
            return
        from dkd_ray.train.common import seed_everything

        # No saved stream for this rank: a fresh one of its own, never a copy of another rank's.
        seed_everything((self.cfg.train.seed * 1_000_003 + rank * 10_007 + self.progress.iteration) % 2**31)
        log.warning("%s: checkpoint %s has no RNG state for rank %d; reseeded it", self.role, restored, rank)

    def checkpoint(self, metrics: dict[str, Any], add_files: Callable[[Path], None] | None = None,
                   every_rank_writes: bool = False) -> None:
        """Report ``metrics`` with a checkpoint (a barrier: every rank calls it). Rank 0 writes
        the training state; every rank writes its RNG streams; ``add_files(directory)`` adds
        files next to them (on every rank when ``every_rank_writes``, else on rank 0)."""
        with tempfile.TemporaryDirectory(prefix="dkd-ckpt-") as tmp:
            directory = Path(tmp)
            save_rank_rng(directory, self.session.rank)
            if add_files is not None and (self.session.is_main or every_rank_writes):
                add_files(directory)
            if self.session.is_main:
                p = self.progress
                if p.batches_done == 0:  # an epoch's end: its results travel with it (see resume)
                    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                    (directory / EPOCH_RESULTS).write_text(json.dumps({**numbers, **p.to_dict()}))
                save_checkpoint(TrainingState.capture(
                    self.model, self.optimizer, self.scheduler, self.scaler, epoch=p.epoch, iteration=p.iteration,
                    batches_done=p.batches_done, config=self.cfg,
                    extra={"role": self.role, "num_classes": self.num_classes}), directory)
            self.session.report({**metrics, **self.progress.to_dict()}, directory,
                                name=f"{self.role}_e{self.progress.epoch:03d}_i{self.progress.iteration:07d}")
