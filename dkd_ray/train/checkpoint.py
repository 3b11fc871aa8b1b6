"""Training state: capture it, write it atomically, read it back safely, restore it.

A checkpoint is a directory holding

- ``state.pt``: one ``torch.save`` of plain data (tensors, numbers, strings, lists, dicts):
  model weights (DDP unwrapped), optimizer, LR scheduler, AMP GradScaler, epoch, iteration,
  the sampler position, the RNG states of the saving rank and the config dict. Plain data
  only, so it is read back with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
- ``meta.json``: ``{"epoch", "iteration", "batches_done", "format"}`` for people and tools that
  want to look without loading tensors. ``state.pt`` is the source of truth. A training run's
  checkpoints (``RunState.checkpoint``) add ``role``, ``run_name``, ``fingerprint`` and
  ``fingerprint_config`` (which run and recipe wrote it) and ``manifests`` (see below).
- ``rng_rank<r>.pt`` (optional): the RNG states of worker ``r`` (``save_rank_rng``), so that a
  multi-worker run resumes every worker's random stream, not only rank 0's.
- ``MANIFEST.rank<r>.json`` (checkpoints of a training run, ``write_manifest``): the last file
  worker ``r`` writes into its part of the folder, listing every other file it wrote (relative
  path, size, sha256). Ray Train copies each worker's folder into the same storage folder, so the
  final folder holds one manifest per worker; ``meta.json`` says how many (``"manifests": N``).

Each file is written to a temporary name, fsynced and ``os.replace``-d into place: a crash
while saving leaves the previous checkpoint in the same directory intact and loadable.

Completeness. A checkpoint whose ``meta.json`` names N manifests is complete only when all N are
there and every file they list has its size (``verify_checkpoint``: a stat per file, cheap enough
for a folder scan) and, for the files that are about to be read, its sha256 (``hash_files``;
``load_checkpoint`` hashes ``state.pt``: ~1 s for a ResNet-50 state of ~300 MB, once per resume
or model load). A manifest is a statement to check, not a completion flag: the uploader
(``pyarrow.fs.copy_files``, threaded) copies files in any order, so the manifest of a worker killed
mid-copy (or on a disk that filled) can be in storage while the ``state.pt`` it describes is cut
short; the size check catches that at scan time, the hash a copy of the right size but wrong bytes.
Folders written before manifests existed (no ``manifests`` in ``meta.json``) are taken as they are
("legacy"): complete if ``state.pt`` loads.

Sampler position: ``epoch`` is the epoch in progress (0-based) and ``batches_done`` the number
of batches of that epoch already consumed. A loop resumes with ``sampler.set_epoch(epoch)`` and
skips ``batches_done`` batches (``dkd_ray.data.samplers.SkipBatches``). A checkpoint taken at the
end of an epoch is stored as ``(epoch + 1, 0)``.

Use with Ray Train V2 (ray 2.60: ``ray.train.torch.TorchTrainer``, V2 is the default)::

    import tempfile, ray.train
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    def train_loop_per_worker(config):
        rank = ray.train.get_context().get_world_rank()
        model = ray.train.torch.prepare_model(build_model(config))   # DDP-wrapped
        optimizer, scheduler, scaler = ...
        epoch = iteration = batches_done = 0
        checkpoint = ray.train.get_checkpoint()   # latest reported one after a failure or resume
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                state = load_checkpoint(directory)
                state.restore(model, optimizer, scheduler, scaler)
                restore_rank_rng(directory, rank)    # this worker's own stream, if saved
            epoch, iteration, batches_done = state.epoch, state.iteration, state.batches_done
        ...
        # every cfg.train.checkpoint_every_iters iterations and at epoch ends, on ALL ranks
        # (ray.train.report is a barrier; the per-rank directories are merged in storage):
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                save_checkpoint(TrainingState.capture(model, optimizer, scheduler, scaler,
                                epoch=epoch, iteration=iteration, batches_done=batches_done,
                                config=config), directory,
                                meta={"manifests": world_size})   # complete = all ranks' manifests
            save_rank_rng(directory, rank)
            write_manifest(directory, rank, world_size)    # last: lists every file this rank wrote
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))

    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker, train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=run_name,                      # the SAME name + storage_path resumes a run
            storage_path=args.storage_path,     # shared storage (NFS/EFS path or s3://...)
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()      # result.checkpoint: the last reported checkpoint

Worker failures are retried up to ``max_failures`` times from the latest checkpoint
(``get_checkpoint`` returns it in the restarted workers). To resume a run whose job died,
submit the job again with the same ``--storage-path`` and run name (``--resume NAME``): the V2
controller reloads its checkpoint-manager snapshot from ``<storage_path>/<name>/`` and
``get_checkpoint`` returns the latest checkpoint (``Trainer.restore`` is deprecated in V2).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dkd_ray.errors import InputError

STATE_FILE = "state.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1
MANIFEST_FORMAT = 1
MANIFEST_COUNT_KEY = "manifests"  # meta.json: how many per-rank manifests the folder must hold
_MANIFEST_NAME = re.compile(r"MANIFEST\.rank(\d+)\.json")


class CheckpointError(InputError, RuntimeError):
    """A checkpoint is missing, unreadable or holds something other than plain data."""


@dataclass
class TrainingState:
    """Everything a training loop needs to continue exactly where it stopped."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    epoch: int = 0
    iteration: int = 0
    batches_done: int = 0
    rng: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. a memory bank the model lacks

    @classmethod
    def capture(cls, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                scheduler: Any = None, scaler: Any = None, *, epoch: int, iteration: int,
                batches_done: int = 0, config: Any = None,
                extra: dict[str, Any] | None = None) -> TrainingState:
        """Snapshot the state now (tensors copied to CPU, so training may go on while it is saved).

        ``config``: a ``Config``, its ``to_dict()``, or None.
        """
        if config is not None and not isinstance(config, dict):
            config = config.to_dict()
        return cls(
            model=cpu_copy(unwrap_model(model).state_dict()),
            optimizer=cpu_copy(optimizer.state_dict()) if optimizer is not None else None,
            scheduler=cpu_copy(scheduler.state_dict()) if scheduler is not None else None,
            scaler=cpu_copy(scaler.state_dict()) if scaler is not None else None,
            epoch=int(epoch), iteration=int(iteration), batches_done=int(batches_done),
            rng=capture_rng(), config=config or {}, extra=dict(extra or {}),
        )

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                scheduler: Any = None, scaler: Any = None, *, restore_rng: bool = True) -> None:
        """Load the snapshot into live objects (any of optimizer/scheduler/scaler may be None)."""
        unwrap_model(model).load_state_dict(self.model)
        for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            saved = getattr(self, name)
            if target is not None and saved:
                target.load_state_dict(saved)
        if restore_rng and self.rng:
            restore_rng_state(self.rng)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "model": self.model, "optimizer": self.optimizer,
                "scheduler": self.scheduler, "scaler": self.scaler, "epoch": self.epoch,
                "iteration": self.iteration, "batches_done": self.batches_done, "rng": self.rng,
                "config": self.config, "extra": self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> TrainingState:
        if "model" not in data:
            raise CheckpointError(f"{source}: not a dkd-ray training state (no 'model' entry)")
        names = ("model", "optimizer", "scheduler", "scaler", "epoch", "iteration",
                 "batches_done", "rng", "config", "extra")
        return cls(**{name: data[name] for name in names if name in data})


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def cpu_copy(obj: Any) -> Any:
    """Deep copy with every tensor detached and copied to CPU (containers rebuilt, rest shared)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copied = type(obj)()  # same mapping type (OrderedDict, Counter for MultiStepLR, ...)
        for key, value in obj.items():
            copied[key] = cpu_copy(value)
        if hasattr(obj, "_metadata"):  # module state_dict versions, read by load_state_dict
            copied._metadata = obj._metadata
        return copied
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(value) for value in obj)
    return obj


# ---------------------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """RNG states of python ``random``, numpy's global generator, torch CPU and CUDA, as plain data."""
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"bit_generator": bit_generator, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["bit_generator"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


# ---------------------------------------------------------------------------------- files
def save_checkpoint(state: TrainingState | dict[str, Any], directory: str | os.PathLike,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ``state.pt`` and ``meta.json`` atomically into ``directory``; returns state.pt's path.
    ``meta``: extra JSON entries for ``meta.json`` (a training run's fingerprint, run name, and
    ``"manifests"``: the number of per-rank manifests that make the folder complete)."""
    data = state.to_dict() if isinstance(state, TrainingState) else dict(state)
    _check_plain(data, "state")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    _atomic_write(path, lambda f: torch.save(data, f))
    info = {key: data.get(key) for key in ("epoch", "iteration", "batches_done")}
    info["format"] = FORMAT_VERSION
    info.update(meta or {})
    _atomic_write(directory / META_FILE, lambda f: f.write(json.dumps(info, indent=2).encode()))
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, verify: bool = True) -> TrainingState:
    """Read a checkpoint directory (or its ``state.pt``) with ``torch.load(weights_only=True)``.

    ``verify``: when the folder has manifests, ``state.pt`` must have the size and sha256 they
    record (a cut-short or altered file is refused with a ``CheckpointError`` saying so, instead
    of whatever ``torch.load`` makes of it). Folders without manifests load as before."""
    file = _state_file(path)
    if verify and (file.parent / META_FILE).is_file():
        verify_checkpoint(file.parent, hash_files=(file.name,), check_files=(file.name,))
    return TrainingState.from_dict(_safe_load(file, map_location), source=str(file))


def save_rank_rng(directory: str | os.PathLike, rank: int) -> Path:
    """Write this worker's RNG states as ``rng_rank<rank>.pt`` (atomically)."""
    path = Path(directory) / f"rng_rank{int(rank)}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = capture_rng()
    _atomic_write(path, lambda f: torch.save(rng, f))
    return path


def restore_rank_rng(directory: str | os.PathLike, rank: int) -> bool:
    """Restore ``rng_rank<rank>.pt`` if the checkpoint has it; returns whether it did."""
    path = Path(directory) / f"rng_rank{int(rank)}.pt"
    if not path.is_file():
        return False
    restore_rng_state(_safe_load(path, "cpu"))
    return True


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint metadata {path}: {error}") from error
    if not isinstance(meta, dict):
        raise CheckpointError(f"cannot read checkpoint metadata {path}: not a JSON object")
    return meta


# ---------------------------------------------------------------------------------- manifests
def manifest_name(rank: int) -> str:
    return f"MANIFEST.rank{int(rank)}.json"


def write_manifest(directory: str | os.PathLike, rank: int, world_size: int = 1) -> Path:
    """Write ``MANIFEST.rank<rank>.json`` listing every file under ``directory`` (this rank's
    part of a checkpoint): relative path, size and sha256. Call it LAST, once every file of this
    rank is in place; the folder counts as complete only when all ranks' manifests check out.
    Hashing is a read of what was just written (page cache): ~1 s per 300 MB of ``state.pt``."""
    directory = Path(directory)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not _MANIFEST_NAME.fullmatch(path.name):
            files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "rank": int(rank), "world_size": int(world_size), "files": files}
    target = directory / manifest_name(rank)
    _atomic_write(target, lambda f: f.write(json.dumps(manifest, indent=1, sort_keys=True).encode()))
    return target


def read_manifests(directory: str | os.PathLike, meta: dict[str, Any] | None = None) -> dict[str, dict[str, Any]] | None:
    """``{relative path: {"size", "sha256"}}`` over all of the folder's manifests, or None for a
    folder written without them (its ``meta.json`` names no manifest count). Raises
    ``CheckpointError`` when a manifest ``meta.json`` promises is missing or unreadable."""
    directory = Path(directory)
    meta = read_meta(directory) if meta is None else meta
    count = meta.get(MANIFEST_COUNT_KEY)
    if count is None:
        return None
    if not isinstance(count, int) or count < 1:
        raise CheckpointError(f"{directory / META_FILE}: {MANIFEST_COUNT_KEY}={count!r} is not a positive count")
    files: dict[str, dict[str, Any]] = {}
    for rank in range(count):
        path = directory / manifest_name(rank)
        try:
            manifest = json.loads(path.read_text())
            listed = manifest["files"]
            if not isinstance(listed, dict):
                raise ValueError("'files' is not an object")
        except FileNotFoundError:
            raise CheckpointError(f"{path.name} is missing ({count} manifest(s) expected): the checkpoint was not "
                                  "completely written or copied") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{path.name} is unreadable ({error}): the checkpoint was not completely written "
                                  "or copied") from error
        files.update(listed)
    return files


def verify_checkpoint(directory: str | os.PathLike, *, hash_files: Any = (), check_files: Any = None) -> bool:
    """Check a checkpoint folder against its manifests: every listed file (or only those in
    ``check_files``) exists with the listed size, and those in ``hash_files`` (relative paths, or
    ``"all"``) have the listed sha256. Returns True when verified, False for a folder written
    before manifests existed (nothing to check against); raises ``CheckpointError`` naming the
    first file that is missing, of the wrong size or of the wrong content."""
    directory = Path(directory)
    files = read_manifests(directory)
    if files is None:
        return False
    wanted = files if check_files is None else {k: files[k] for k in check_files if k in files}
    for name in wanted:  # all sizes first: a cut-short file is found without hashing anything
        expected, path = wanted[name], directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{name} is missing (listed in the manifest): the checkpoint was not completely "
                                  "written or copied") from None
        except OSError as error:
            raise CheckpointError(f"cannot stat {name}: {error}") from error
        if size != expected.get("size"):
            raise CheckpointError(f"{name} is {size} bytes, its manifest says {expected.get('size')} (truncated or "
                                  "partly copied)")
    hashed = wanted if hash_files == "all" else [name for name in hash_files if name in wanted]
    for name in hashed:
        try:
            digest = _sha256(directory / name)
        except OSError as error:
            raise CheckpointError(f"cannot read {name}: {error}") from error
        if digest != wanted[name].get("sha256"):
            raise CheckpointError(f"{name} does not match its manifest's sha256 (corrupted or partly copied)")
    return True


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _state_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected a directory with {STATE_FILE} "
                              f"or a {STATE_FILE} file)")
    return file


def _safe_load(file: Path, map_location: Any) -> Any:
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's text is a page of advice; its reason is the line after "WeightsUnpickler error:"
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if "WeightsUnpickler error" in line), lines[0]
                      if lines else "")
        raise CheckpointError(f"{file} is not a plain-tensor checkpoint and is refused (torch.load "
                              f"weights_only=True: {reason})") from error
    except (OSError, RuntimeError, EOFError) as error:
        raise CheckpointError(f"cannot read checkpoint {file}: {error}") from error


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a temp file in the same directory, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)  # make the rename itself durable


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every filesystem/OS; the data itself is already synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_PLAIN = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.Size, torch.dtype, torch.device)


def _check_plain(obj: Any, where: str) -> None:
    """Fail at save time, naming the key, if something would be refused by weights_only loading."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where}: key {key!r} is a {type(key).__name__}; "
                                      "checkpoint keys must be str or int")
            _check_plain(value, f"{where}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise CheckpointError(f"{where} is a {type(obj).__name__}; checkpoints hold only tensors, "
                              "numbers, strings and lists/dicts of them (convert it first)")
