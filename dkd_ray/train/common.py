"""Pieces both training loops share: seeding, LR schedule, AMP, DDP wrapping, batch transfer."""

from __future__ import annotations

import contextlib
import inspect
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def warmup_multistep(optimizer: torch.optim.Optimizer, *, warmup_iters: int, milestones: Sequence[int],
                     gamma: float = 0.1, warmup_factor: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_iters`` steps, then x``gamma`` at each milestone (in steps).
    The schedule is a pure function of the step, so it resumes exactly from a checkpoint."""
    milestones = sorted(milestones)

    def factor(step: int) -> float:
        warm = warmup_factor + (1 - warmup_factor) * step / warmup_iters if step < warmup_iters else 1.0
        return warm * gamma ** sum(step >= m for m in milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def scaled_lr(base_lr: float, world_size: int) -> float:
    """Linear scaling rule: ``base_lr`` is for one worker's batch; N workers see N times the batch."""
    return base_lr * world_size


class Precision:
    """Autocast + GradScaler on CUDA (bf16 where supported: no scaler needed), plain fp32 on CPU."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled = enabled and device.type == "cuda"
        self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)
        self.device_type = device.type

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None) -> None:
        self.scaler.scale(loss).backward()
        if max_grad_norm:
            self.scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()


def wrap_ddp(model: nn.Module, device: torch.device, world_size: int, *, sync_buffers_each_forward: bool) -> nn.Module:
    """DDP over the process group Ray Train created (NCCL on GPU, gloo on CPU); as-is for one worker.
    Buffers are always made equal at wrap time; ``sync_buffers_each_forward`` also broadcasts
    rank 0's before every forward (BatchNorm statistics)."""
    model.to(device)
    if world_size <= 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               **_buffer_sync_kwargs(sync_buffers_each_forward))


def _buffer_sync_kwargs(each_forward: bool) -> dict[str, bool]:
    # torch 2.14 renamed broadcast_buffers to forward_sync_buffers (which keeps the sync at
    # wrap time); older torch, which the package ranges allow, only has the old name.
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": each_forward}
    return {"broadcast_buffers": each_forward}


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def targets_to(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]


def mean_across_workers(values: dict[str, float], device: torch.device, world_size: int) -> dict[str, float]:
    """Average scalar metrics over workers (every rank must call it)."""
    if world_size <= 1 or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return {k: float(v) / world_size for k, v in zip(keys, tensor.tolist())}


def equalize_batch_norm_statistics(model: nn.Module, world_size: int) -> None:
    """Set every BatchNorm's running mean and variance to their mean over workers (every rank must
    call it; the loops do at each epoch end). Training normalises by batch statistics, so the
    running ones only steer inference; but each worker evaluates its shard of the test set (and
    writes its part of the knowledge bank) with its own copy, and rank 0's copy is checkpointed.
    Without this, results would depend on the sharding: with the student's per-forward buffer
    broadcast off, the copies drift. Mid-epoch checkpoints need no call: nothing sharded follows
    them, and a resumed run loads rank 0's copy on every worker."""
    if world_size <= 1:
        return
    stats = [t for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
             for t in (m.running_mean, m.running_var)]
    if not stats:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in stats])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    for tensor, mean in zip(stats, flat.split([t.numel() for t in stats])):
        tensor.copy_(mean.view_as(tensor))


def after_step_hooks(iteration: int, rank: int, batch_key: str) -> None:
    """Test hooks, off unless their environment variables are set (they reach Ray workers too):
    ``DKD_TRACE_FILE``: rank 0 appends ``iteration batch_key`` after every optimizer step, so a
    test can check that a resumed run trains on every batch exactly once;
    ``DKD_KILL_AT_ITERATION`` + ``DKD_KILL_MARKER``: the worker process dies abruptly right after
    that iteration, once (the marker file records that it happened) - a crashed machine."""
    import os

    trace = os.environ.get("DKD_TRACE_FILE")
    if trace and rank == 0:
        with open(trace, "a") as f:
            f.write(f"{iteration} {batch_key}\n")
    kill_at, marker = os.environ.get("DKD_KILL_AT_ITERATION"), os.environ.get("DKD_KILL_MARKER")
    if kill_at and marker and iteration == int(kill_at) and rank == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(17)


def loader_generator(seed: int, epoch: int) -> torch.Generator:
    """The DataLoader's own RNG: creating an iterator otherwise draws from the global RNG, which
    would shift every later random draw of a run resumed mid-epoch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)
