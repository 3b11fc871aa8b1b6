"""Pieces both training loops share: seeding, LR schedule, AMP, DDP wrapping, batch transfer."""

from __future__ import annotations

import contextlib
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


def wrap_ddp(model: nn.Module, device: torch.device, world_size: int, *, broadcast_buffers: bool) -> nn.Module:
    """DDP over the process group Ray Train created (NCCL on GPU, gloo on CPU); as-is for one worker."""
    model.to(device)
    if world_size <= 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=broadcast_buffers)


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
