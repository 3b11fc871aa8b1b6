"""What a training loop needs from whatever runs it: rank, device, reporting and checkpoints.

The teacher and student loops are plain functions of a config. They run
- inside a Ray Train worker (``RaySession``: ``ray.train.report`` / ``ray.train.get_checkpoint``,
  the process group Ray Train set up, one worker per GPU), which is also how Tune trials run them;
- in-process for tests and debugging (``LocalSession``: one worker, checkpoints in a folder).
The loop never imports Ray itself, so it is testable and the ranks see one interface.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


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

    run_name: str = ""  # the run the checkpoints belong to ("" when unknown: not checked)

    def checkpoint_writers(self) -> int:
        """How many ranks' files end up in one checkpoint folder (each writes a manifest): all
        of them under Ray Train, which copies every rank's folder into the same storage folder."""
        return self.world_size

    def checkpoint_candidates(self) -> list[Path]:
        """Local folders that may hold this run's latest checkpoint, the one to try first first
        and then older ones. Not checked here beyond having a ``meta.json`` with an iteration
        (``RunState.resume`` verifies, and falls back along this list)."""
        raise NotImplementedError

    def latest_checkpoint(self) -> Path | None:
        """A local folder holding the newest checkpoint that passes its manifest's size check
        (skipped ones are logged), or None."""
        return first_complete(self.checkpoint_candidates())

    uploads_in_background = False  # whether report(background=True) can upload asynchronously

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None,
               background: bool = False) -> None:
        """Report metrics (every rank must call it: it is a barrier under Ray), with an optional
        checkpoint folder written by this rank (rank 0 writes it; others pass None)."""
        raise NotImplementedError


@dataclass
class LocalSession(Session):
    """One in-process worker; checkpoints are copied under ``checkpoint_root``."""

    checkpoint_root: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reports: list[dict[str, Any]] = field(default_factory=list)
    run_name: str = ""

    def __post_init__(self) -> None:
        self.checkpoint_root = Path(self.checkpoint_root)

    def checkpoint_writers(self) -> int:
        return 1  # this session's folders hold only its own rank's files (one session per rank)

    def checkpoint_candidates(self) -> list[Path]:
        """The folder ``LATEST`` names, then the older checkpoint folders next to it, newest
        first (none without ``LATEST``: nothing was ever reported here)."""
        marker = self.checkpoint_root / "LATEST"
        if not marker.exists():
            return []
        head = self.checkpoint_root / marker.read_text().strip()
        newest = checkpoint_iteration(head)
        older = [d for d in checkpoint_folders(self.checkpoint_root)
                 if d.name != head.name and (newest < 0 or checkpoint_iteration(d) <= newest)]
        return [head, *older]

    def report(self, metrics, checkpoint_dir=None, name=None, background=False):
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
    but unknown to ``get_checkpoint``; resuming from the newest complete one loses nothing. A
    worker killed while its checkpoint was being copied leaves an incomplete folder there too:
    the candidates are checked against their manifests, and resuming falls back to older ones.
    """

    def __init__(self, use_gpu: str = "auto", run_dir: str | Path | None = None, run_uri: str | None = None) -> None:
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
        self.run_uri = run_uri or (str(self.run_dir) if self.run_dir else None)  # where its checkpoints go
        try:
            self.run_name = context.get_experiment_name()
        except Exception:  # not every Ray version's context has it
            self.run_name = self.run_dir.name if self.run_dir else ""

    def checkpoint_candidates(self) -> list[Path]:
        """The checkpoint folders in ``run_dir`` and the one ``get_checkpoint`` returns, newest
        (highest iteration) first. The registered one is read in place when it is one of the
        scanned folders, else materialised locally (S3) and kept until the session ends."""
        scanned = checkpoint_folders(self.run_dir)
        checkpoint = self._train.get_checkpoint()
        if checkpoint is not None and not any(d.name == Path(checkpoint.path).name for d in scanned):
            if self._restored is None:
                self._restored = tempfile.TemporaryDirectory(prefix="dkd-restore-")
            registered = Path(checkpoint.to_directory(str(Path(self._restored.name) / Path(checkpoint.path).name)))
            if checkpoint_iteration(registered) >= 0:
                scanned.append(registered)
        return sorted(scanned, key=_newest_first)

    uploads_in_background = True  # Ray Train's CheckpointUploadMode.ASYNC

    def report(self, metrics, checkpoint_dir=None, name=None, background: bool = False):
        """``background``: Ray uploads ``checkpoint_dir`` in a thread, registers the checkpoint
        once the upload finished, then deletes the folder; training goes on meanwhile."""
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        if checkpoint is not None and background:
            self._train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                               checkpoint_upload_mode=self._train.CheckpointUploadMode.ASYNC,
                               delete_local_checkpoint_after_upload=True)
            return
        try:
            self._train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        except OSError as error:  # the storage did not take it: full, read-only, gone
            if checkpoint is None:
                raise
            raise self._write_failed(name, error) from error

    def _write_failed(self, name: str | None, error: OSError) -> OSError:
        """Remove the checkpoint's partial copy (a full disk gets back what it took; the folder
        scan would skip it anyway) and say which checkpoint failed where, and why."""
        where = self.run_uri or "the run's storage"
        if name and self.run_uri:  # another rank may still be copying into it: the manifests catch that
            from dkd_ray import storage

            storage.remove(storage.join(self.run_uri, name))
        full = error.errno == errno.ENOSPC or "No space left" in str(error)
        reason = "the storage is full" if full else "the write failed"
        return CheckpointWriteError(
            errno.ENOSPC if full else (error.errno or errno.EIO), f"checkpoint {name} could not be written to {where}: {reason} ({error}); its partial "
                         f"copy was removed and the older checkpoints are intact: once the storage takes it "
                         f"again, the run resumes from the newest of them (--resume {self.run_name or '<run name>'})")


class CheckpointWriteError(OSError):
    """A checkpoint the storage did not take (an ``OSError``: the run is retried like any I/O failure)."""


def checkpoint_iteration(directory: Path) -> int:
    """The iteration a checkpoint folder was taken at, from its ``meta.json`` (-1 when it has no
    readable one: not a checkpoint, e.g. Ray's ``aborted`` report or a run's own files)."""
    import json

    try:
        return int(json.loads((directory / "meta.json").read_text())["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def _newest_first(directory: Path) -> tuple[int, str]:
    return -checkpoint_iteration(directory), directory.name


def checkpoint_folders(root: Path | None) -> list[Path]:
    """The folders under ``root`` that look like checkpoints (a ``meta.json`` with an iteration),
    newest first; not verified (see ``first_complete``). Hidden folders (staging copies) are not."""
    if root is None or not Path(root).is_dir():
        return []
    folders = [d for d in Path(root).iterdir()
               if d.is_dir() and not d.name.startswith(".") and checkpoint_iteration(d) >= 0]
    return sorted(folders, key=_newest_first)


def incomplete_reason(directory: Path) -> str | None:
    """Why ``directory`` is not a complete checkpoint (cheap: ``meta.json``, manifests, file
    sizes; no hashing), or None when it is, or may be (a folder without manifests that has its
    ``state.pt``: only loading it tells)."""
    from dkd_ray.train.checkpoint import STATE_FILE, CheckpointError, verify_checkpoint

    try:
        if not verify_checkpoint(directory) and not (directory / STATE_FILE).is_file():
            return f"no {STATE_FILE}"
    except CheckpointError as error:
        return str(error)
    return None


def first_complete(candidates: list[Path]) -> Path | None:
    """The first of ``candidates`` that ``incomplete_reason`` finds nothing wrong with; each
    one skipped is logged with its reason."""
    for directory in candidates:
        reason = incomplete_reason(directory)
        if reason is None:
            return directory
        log.warning("skipping checkpoint %s: %s", directory, reason)
    return None


def newest_complete_checkpoint(run_dir: Path | None) -> Path | None:
    """The newest checkpoint folder under a run's folder that is complete (its manifests' files
    all there, of the right sizes; a folder without manifests: its ``state.pt`` is there)."""
    return first_complete(checkpoint_folders(run_dir))


def newest_complete_checkpoint_uri(run_uri: str) -> str | None:
    """``newest_complete_checkpoint`` of a run folder on object storage: the URI of its newest
    checkpoint whose manifests' files are all there with their sizes (a few small requests;
    nothing is downloaded), or None. Each one skipped is logged with its reason."""
    from dkd_ray import storage

    found = []
    try:
        names = storage.list_dir(run_uri)
    except OSError as error:
        log.warning("could not list %s (%s)", run_uri, error)
        return None
    for name in names:
        try:
            meta = None if name.startswith(".") else storage.read_json(storage.join(run_uri, name, "meta.json"))
            found.append((int(meta["iteration"]), name, meta))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a checkpoint: Ray's own files, a staging copy
    for _, name, meta in sorted(found, key=lambda item: (-item[0], item[1])):
        uri = storage.join(run_uri, name)
        try:
            reason = _remote_incomplete_reason(uri, meta)
        except (OSError, ValueError, TypeError, AttributeError) as error:
            reason = f"unreadable ({type(error).__name__}: {error})"
        if reason is None:
            return uri
        log.warning("skipping checkpoint %s: %s", uri, reason)
    return None


def _remote_incomplete_reason(uri: str, meta: dict[str, Any]) -> str | None:
    from pyarrow import fs

    from dkd_ray import storage
    from dkd_ray.train.checkpoint import MANIFEST_COUNT_KEY, STATE_FILE, manifest_name

    count = meta.get(MANIFEST_COUNT_KEY)
    if count is None:  # written before manifests existed: its state.pt must be there
        return None if storage.exists(storage.join(uri, STATE_FILE)) else f"no {STATE_FILE}"
    listed: dict[str, int] = {}
    for rank in range(int(count)):
        try:
            manifest = storage.read_json(storage.join(uri, manifest_name(rank)))
        except (OSError, ValueError):
            manifest = None
        if not manifest:
            return f"{manifest_name(rank)} is missing or unreadable (meta.json names {count} manifests)"
        listed.update({name: entry.get("size") for name, entry in manifest.get("files", {}).items()})
    filesystem, root = storage.filesystem(uri)
    for (name, size), info in zip(listed.items(), filesystem.get_file_info([f"{root}/{n}" for n in listed])):
        if info.type != fs.FileType.File:
            return f"{name} is missing (listed in the manifest)"
        if info.size != size:
            return f"{name} is {info.size} bytes, its manifest says {size} (truncated or partly uploaded)"
    return None


def current_session(use_gpu: str = "auto", checkpoint_root: str | Path | None = None,
                    run_dir: str | Path | None = None, run_uri: str | None = None) -> Session:
    """A ``RaySession`` inside a Ray Train worker, else a ``LocalSession``."""
    try:
        import ray.train

        ray.train.get_context().get_world_rank()
        return RaySession(use_gpu, run_dir, run_uri)
    except Exception:  # not in a Ray Train worker (or Ray not importable): run in-process
        root = Path(checkpoint_root or tempfile.mkdtemp(prefix="dkd-checkpoints-"))
        return LocalSession(checkpoint_root=root, device=pick_device(use_gpu))
