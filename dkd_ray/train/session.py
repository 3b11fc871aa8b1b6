"""What a training loop needs from whatever runs it: rank, device, reporting and checkpoints.

The teacher and student loops are plain functions of a config. They run
- inside a Ray Train worker (``RaySession``: ``ray.train.report`` / ``ray.train.get_checkpoint``,
  the process group Ray Train set up, one worker per GPU), which is also how Tune trials run them;
- in-process for tests and debugging (``LocalSession``: one worker, checkpoints in a folder).
The loop never imports Ray itself, so it is testable and the ranks see one interface.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def pick_device(use_gpu: str, local_rank: int = 0) -> torch.device:
    if use_gpu == "true" and not torch.cuda.is_available():
        raise RuntimeError("train.use_gpu=true but CUDA is not available on this worker")
    if use_gpu in ("true", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


class Session:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def latest_checkpoint(self) -> Path | None:  # a local folder holding the last checkpoint
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None) -> None:
        """Report metrics (every rank must call it: it is a barrier under Ray), with an optional
        checkpoint folder written by this rank (rank 0 writes it; others pass None)."""
        raise NotImplementedError


@dataclass
class LocalSession(Session):
    """One in-process worker; checkpoints are copied under ``checkpoint_root``."""

    checkpoint_root: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reports: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.checkpoint_root = Path(self.checkpoint_root)

    def latest_checkpoint(self) -> Path | None:
        marker = self.checkpoint_root / "LATEST"
        return self.checkpoint_root / marker.read_text().strip() if marker.exists() else None

    def report(self, metrics, checkpoint_dir=None, name=None):
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            name = name or f"checkpoint_{len(self.reports):06d}"
            target = self.checkpoint_root / name
            self.checkpoint_root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=self.checkpoint_root, prefix=".staging-"))
            shutil.copytree(checkpoint_dir, staging, dirs_exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
            tmp_marker = self.checkpoint_root / ".LATEST.tmp"
            tmp_marker.write_text(name)
            os.replace(tmp_marker, self.checkpoint_root / "LATEST")


class RaySession(Session):
    """Inside a Ray Train worker (TorchTrainer has already initialised the process group).

    ``run_dir`` (the run's folder on local or shared-file storage) is also scanned for
    checkpoints: Ray registers a reported checkpoint when its controller next polls the workers,
    so a worker that dies right after reporting can leave a checkpoint that is complete in storage
    but unknown to ``get_checkpoint``; resuming from the newest complete one loses nothing.
    """

    def __init__(self, use_gpu: str = "auto", run_dir: str | Path | None = None) -> None:
        import ray.train

        self._train = ray.train
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.local_rank = context.get_local_rank()
        if torch.cuda.is_available() and use_gpu != "false":
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        else:
            self.device = pick_device(use_gpu, self.local_rank)
        self._restored: tempfile.TemporaryDirectory | None = None
        self.run_dir = Path(run_dir) if run_dir else None

    def latest_checkpoint(self) -> Path | None:
        checkpoint = self._train.get_checkpoint()
        registered = None
        if checkpoint is not None:
            # Materialise locally (storage may be S3/NFS); kept until the session ends.
            self._restored = tempfile.TemporaryDirectory(prefix="dkd-restore-")
            registered = Path(checkpoint.to_directory(self._restored.name))
        candidates = [c for c in (registered, newest_complete_checkpoint(self.run_dir)) if c is not None]
        return max(candidates, key=checkpoint_iteration) if candidates else None

    def report(self, metrics, checkpoint_dir=None, name=None):
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def checkpoint_iteration(directory: Path) -> int:
    """The iteration a checkpoint folder was taken at (-1 when it is not a complete checkpoint)."""
    import json

    try:
        return int(json.loads((directory / "meta.json").read_text())["iteration"])
    except (OSError, ValueError, KeyError):
        return -1


def newest_complete_checkpoint(run_dir: Path | None) -> Path | None:
    """The newest checkpoint folder under a run's folder whose state was written completely."""
    if run_dir is None or not run_dir.is_dir():
        return None
    complete = [d for d in run_dir.iterdir() if d.is_dir() and (d / "state.pt").is_file() and checkpoint_iteration(d) >= 0]
    return max(complete, key=checkpoint_iteration, default=None)


def current_session(use_gpu: str = "auto", checkpoint_root: str | Path | None = None,
                    run_dir: str | Path | None = None) -> Session:
    """A ``RaySession`` inside a Ray Train worker, else a ``LocalSession``."""
    try:
        import ray.train

        ray.train.get_context().get_world_rank()
        return RaySession(use_gpu, run_dir)
    except Exception:  # not in a Ray Train worker (or Ray not importable): run in-process
        root = Path(checkpoint_root or tempfile.mkdtemp(prefix="dkd-checkpoints-"))
        return LocalSession(checkpoint_root=root, device=pick_device(use_gpu))
