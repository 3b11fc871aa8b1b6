"""Where a loop is in its run, and how it gets back there after a restart.

``Progress`` counts epochs and iterations; ``batches_done`` is how far into the current epoch
the samplers are, so a resumed worker skips exactly the batches it already trained on.
``RunState`` holds what a checkpoint captures (model, optimizer, scheduler, AMP scaler,
progress, RNG states) and writes/restores it for both training loops the same way. Every rank
saves and restores its own RNG streams (``rng_rank<r>.pt``): ranks draw different random numbers
(dropout-free models still draw in FSA jitter, proposal sampling and the samplers' fallbacks),
and a resumed rank must continue its own stream, not rank 0's.

A half-copied checkpoint never ends a run. Every rank writes ``MANIFEST.rank<r>.json`` last
(``checkpoint.write_manifest``) and ``meta.json`` records how many there are, the run's name, its
role and its config fingerprint (``run_fingerprint``). ``resume`` walks the session's candidates
newest first and takes the first that is complete (manifests, sizes, then sha256 of what it reads),
loads, and belongs to this run (same run name when both are known, same role, same fingerprint);
each one it passes over is logged as a warning naming the folder and the reason. When none is
usable and some of them are another run's or config's, the resume is refused
(``ForeignCheckpointError``): starting from scratch there would mix two runs' checkpoints in one
folder, and the newer run's retention would delete the older one's. Folders written
before manifests are accepted when ``state.pt`` loads (one warning each). Under Ray with several
workers rank 0 chooses and broadcasts its choice, so all ranks resume from the same folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from dkd_ray.config import Config
from dkd_ray.train.checkpoint import (MANIFEST_COUNT_KEY, META_FILE, STATE_FILE, CheckpointError, TrainingState,
                                      load_checkpoint, read_meta, restore_rank_rng, restore_rng_state,
                                      save_checkpoint, save_rank_rng, verify_checkpoint, write_manifest)
from dkd_ray.train.session import Session

log = logging.getLogger(__name__)


_REFUSED = "\0refused"  # rank 0's broadcast when it refuses to resume


class ForeignCheckpointError(CheckpointError):
    """A complete checkpoint of another run, role or config: never resumed from. The message
    says why (e.g. "it was written with another config: teacher.lr: 0.002 -> 0.001")."""

EPOCH_RESULTS = "epoch_results.json"

# ---------------------------------------------------------------------------------- fingerprint
FINGERPRINT_VERSION = 1
# The config sections that shape what a role's checkpoint holds (the teacher never reads the
# student's settings: a pipeline resumed with a changed student recipe keeps its teacher).
FINGERPRINT_SECTIONS = {"teacher": ("data", "teacher", "train"), "student": ("data", "student", "distill", "train")}
# Keys that legitimately change between a run and its resume, without changing what the saved
# weights and optimizer state mean: where the data is mounted and how it is read, how many and
# which workers run it (the per-rank RNG files of missing ranks are reseeded), how often it logs,
# checkpoints and evaluates, how often it is retried, and where it stops (max_iters: smoke runs
# and tests extend a run). Everything else (the recipe: data, model, loss, optimizer, schedule,
# epochs, seed) must match. The eval section and the preset label are not part of it.
FINGERPRINT_EXCLUDED = frozenset({
    "data.root", "data.loader_workers",
    "train.num_workers", "train.use_gpu", "train.cpus_per_worker", "train.max_failures", "train.max_iters",
    "train.log_every_iters", "train.checkpoint_every_iters", "train.eval_every_epochs", "train.checkpoint_upload",
})


def fingerprint_config(config: Config | dict[str, Any], role: str) -> dict[str, Any]:
    """The settings a ``role`` checkpoint must share with a run that resumes from it, flat
    (``{"teacher.lr": ...}``) and JSON-normalised (tuples are lists)."""
    data = config.to_dict() if isinstance(config, Config) else dict(config or {})
    sections = FINGERPRINT_SECTIONS.get(role, ("data", "teacher", "student", "distill", "train"))
    flat = {f"{section}.{key}": value for section in sections for key, value in (data.get(section) or {}).items()}
    return json.loads(json.dumps({k: v for k, v in sorted(flat.items()) if k not in FINGERPRINT_EXCLUDED}))


def run_fingerprint(config: Config | dict[str, Any], role: str) -> str:
    """``v<version>:<16 hex digits>``: sha256 of the role and its ``fingerprint_config``."""
    payload = json.dumps({"role": role, **fingerprint_config(config, role)}, sort_keys=True)
    return f"v{FINGERPRINT_VERSION}:{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def config_differences(saved: dict[str, Any], current: dict[str, Any], limit: int = 5) -> list[str]:
    """``key: saved -> current`` for settings both know and disagree on. A key only one side has
    is a config field added or removed by a code change, not a different run: not counted."""
    changed = [f"{key}: {saved[key]!r} -> {current[key]!r}" for key in sorted(set(saved) & set(current))
               if saved[key] != current[key]]
    return changed[:limit] + ([f"... {len(changed) - limit} more"] if len(changed) > limit else [])


_LEGACY_WARNED: set[str] = set()


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
    # names of the broken checkpoints skipped at resume: never reused (see _checkpoint_name)
    _skipped_names: set[str] = field(default_factory=set)

    def resume(self) -> None:
        """Continue from the session's latest checkpoint, if there is one.

        A checkpoint taken at an epoch's end carries that epoch's results; they are reported
        again, because whatever consumes reports (Tune's scheduler, the sweep's MLflow runs) may
        not have received them before the interruption. Consumers ignore an epoch seen twice."""
        restored, state = self._choose_checkpoint()
        if restored is None:
            return
        state.restore(self.model, self.optimizer, self.scheduler, self.scaler, restore_rng=False)
        self.progress = Progress(state.epoch, state.iteration, state.batches_done)
        self._restore_rng(restored, state)
        if self.session.is_main:
            log.info("%s: resumed from %s at epoch %d iteration %d", self.role, restored,
                     self.progress.epoch, self.progress.iteration)
        results = restored / EPOCH_RESULTS
        if self.progress.batches_done == 0 and results.is_file():
            self.session.report({**json.loads(results.read_text()), "replayed": 1})

    def _checkpoint_writers(self) -> int:
        writers = getattr(self.session, "checkpoint_writers", None)  # test sessions may lack it
        return int(writers()) if writers is not None else self.session.world_size

    # ------------------------------------------------------------------ choosing a checkpoint
    def _candidates(self) -> list[Path]:
        candidates = getattr(self.session, "checkpoint_candidates", None)
        if candidates is not None:
            return list(candidates())
        latest = self.session.latest_checkpoint()  # a session that knows only its latest one
        return [latest] if latest is not None else []

    def _choose_checkpoint(self) -> tuple[Path | None, TrainingState | None]:
        """The newest usable candidate and its loaded state (None, None: start from scratch).
        With a process group of several workers rank 0 chooses and the others follow: a rank
        that cannot read rank 0's choice fails (a retry starts over), it never resumes elsewhere."""
        candidates = self._candidates()
        shared = _process_group_size() > 1 and self.session.world_size > 1
        chosen = state = None
        skipped: list[str] = []
        if not shared or self.session.is_main:
            foreign: ForeignCheckpointError | None = None
            for directory in candidates:
                try:
                    state = self._load_if_usable(directory)
                except CheckpointError as error:
                    log.warning("%s: skipping checkpoint %s: %s; falling back to the next older checkpoint",
                                self.role, directory, error)
                    skipped.append(directory.name)
                    if isinstance(error, ForeignCheckpointError) and foreign is None:
                        foreign = ForeignCheckpointError(f"{self.role}: not resuming from {directory.parent}: "
                                                         f"checkpoint {directory.name}: {error}; none there "
                                                         "is this run's; resume with the settings it was trained "
                                                         "with, or train under another run name or storage path")
                    continue
                chosen = directory
                break
            if skipped and chosen is not None:
                log.warning("%s: resuming from %s, older than the skipped %s", self.role, chosen, ", ".join(skipped))
            elif foreign is not None:
                if shared:  # the other ranks stop with it rather than wait in the broadcast below
                    _broadcast_from_rank0((_REFUSED, []), self.session.device)
                raise foreign
            elif skipped:
                log.warning("%s: none of the %d checkpoint(s) found is usable (%s); starting from scratch",
                            self.role, len(skipped), ", ".join(skipped))
        if shared:
            name, skipped = _broadcast_from_rank0(
                (chosen.name if chosen is not None else None, skipped) if self.session.is_main else None,
                self.session.device)
        # A skipped (broken) checkpoint is still in Ray's list of this run's checkpoints: a new one
        # under its name would be one folder listed twice, and Ray's pruning would delete it twice.
        self._skipped_names = set(skipped)
        if shared:
            if not self.session.is_main:
                if name is None:
                    return None, None
                if name == _REFUSED:
                    raise ForeignCheckpointError(f"{self.role}: rank 0 refused to resume (see its error)")
                chosen = next((d for d in candidates if d.name == name), None)
                if chosen is None:
                    raise RuntimeError(f"{self.role}: rank {self.session.rank} cannot see checkpoint {name}, which "
                                       "rank 0 resumes from")
                try:
                    state = self._load_if_usable(chosen, check_run=False)
                except CheckpointError as error:
                    # not an InputError: rank 0 read it, so a retry may well read it here too
                    raise RuntimeError(f"{self.role}: rank {self.session.rank} cannot read checkpoint {chosen}, which "
                                       f"rank 0 resumes from: {error}") from error
        return chosen, state

    def _load_if_usable(self, directory: Path, check_run: bool = True) -> TrainingState:
        """Load ``directory`` if it is complete and (``check_run``) this run's; else raise a
        ``CheckpointError`` saying why not."""
        meta = read_meta(directory)
        if check_run:
            self._check_same_run(meta)
        reads = [STATE_FILE, META_FILE, EPOCH_RESULTS, f"rng_rank{self.session.rank}.pt"]  # what resume reads
        verified = verify_checkpoint(directory, hash_files=reads)  # sizes of all files, hashes of these
        state = load_checkpoint(directory, verify=False)  # just verified
        if not verified:  # written before manifests: no fingerprint either, but state.pt has the config
            if check_run:
                if state.extra.get("role") not in (None, self.role):
                    raise ForeignCheckpointError(f"it holds a {state.extra['role']}, this run trains a {self.role}")
                if state.config and "fingerprint" not in meta:
                    self._check_same_config(fingerprint_config(state.config, self.role))
            if str(directory) not in _LEGACY_WARNED:  # once per folder and process
                _LEGACY_WARNED.add(str(directory))
                log.warning("%s: checkpoint %s has no manifest (written before checkpoints had them); taking it as "
                            "complete because its %s loads", self.role, directory, STATE_FILE)
        return state

    def _check_same_run(self, meta: dict[str, Any]) -> None:
        mine = getattr(self.session, "run_name", "") or ""
        theirs = meta.get("run_name") or ""
        if mine and theirs and mine != theirs:
            raise ForeignCheckpointError(f"it belongs to run {theirs!r}, not to this run {mine!r}")
        if meta.get("role") not in (None, self.role):
            raise ForeignCheckpointError(f"it holds a {meta['role']}, this run trains a {self.role}")
        fingerprint = meta.get("fingerprint")
        if fingerprint is None:
            return
        if fingerprint == run_fingerprint(self.cfg, self.role):
            return
        saved = meta.get("fingerprint_config")
        if not isinstance(saved, dict):
            raise ForeignCheckpointError(f"it was written with another config (fingerprint {fingerprint}, this run "
                                         f"{run_fingerprint(self.cfg, self.role)})")
        self._check_same_config(saved, fingerprint)

    def _check_same_config(self, saved: dict[str, Any], fingerprint: str | None = None) -> None:
        differences = config_differences(saved, fingerprint_config(self.cfg, self.role))
        if differences:
            which = f" (fingerprint {fingerprint}, this run {run_fingerprint(self.cfg, self.role)})" if fingerprint else ""
            raise ForeignCheckpointError(f"it was written with another config{which}: {'; '.join(differences)}")

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
        files next to them (on every rank when ``every_rank_writes``, else on rank 0). Every
        rank's last file is its manifest (``MANIFEST.rank<r>.json``) of the files it wrote.

        The workers' BatchNorm statistics are made equal first, in place: a resume loads rank 0's
        copy on every worker, so the live copies must already be that copy, or a resumed run would
        end with other statistics than one never stopped."""
        from dkd_ray.train.common import equalize_batch_norm_statistics

        equalize_batch_norm_statistics(self.model, min(_process_group_size(), self.session.world_size))
        background = self.cfg.train.checkpoint_upload == "async" and getattr(self.session, "uploads_in_background", False)
        if not background:
            with tempfile.TemporaryDirectory(prefix="dkd-ckpt-") as tmp:
                self._write_and_report(Path(tmp), metrics, add_files, every_rank_writes, background=False)
            return
        # An upload in the background reads the folder after report() returns; Ray deletes it once
        # uploaded. Until report() has taken it, a failure here is ours to clean up.
        directory = Path(tempfile.mkdtemp(prefix="dkd-ckpt-"))
        try:
            self._write_and_report(directory, metrics, add_files, every_rank_writes, background=True)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def _write_and_report(self, directory: Path, metrics: dict[str, Any], add_files, every_rank_writes: bool, *,
                          background: bool) -> None:
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
                extra={"role": self.role, "num_classes": self.num_classes}), directory,
                meta={"role": self.role, "run_name": getattr(self.session, "run_name", "") or "",
                      "fingerprint": run_fingerprint(self.cfg, self.role),
                      "fingerprint_config": fingerprint_config(self.cfg, self.role),
                      MANIFEST_COUNT_KEY: self._checkpoint_writers()})
        write_manifest(directory, self.session.rank, self.session.world_size)  # last: after every file
        self.session.report({**metrics, **self.progress.to_dict()}, directory, name=self._checkpoint_name(),
                            background=background)

    def _checkpoint_name(self) -> str:
        """``<role>_e<epoch>_i<iteration>``, with ``-r<n>`` when a skipped checkpoint has that name."""
        name = base = f"{self.role}_e{self.progress.epoch:03d}_i{self.progress.iteration:07d}"
        retake = 0
        while name in self._skipped_names:
            retake += 1
            name = f"{base}-r{retake}"
        return name


def _process_group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _broadcast_from_rank0(value: Any, device: Any) -> Any:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, device=device if getattr(device, "type", "cpu") == "cuda" else None)
    return box[0]
