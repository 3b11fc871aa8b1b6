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


def scaled_lr(base_lr: float, world_size: int, rule: str = "linear") -> float:
    """``base_lr`` is for one worker's batch; N workers see N times the batch.
    ``linear`` (Goyal et al.: SGD, the student), ``sqrt`` (the square-root rule for adaptive
    optimisers such as Adam, whose update size does not grow with the gradient: the teacher),
    or ``none``."""
    factors = {"linear": float(world_size), "sqrt": float(world_size) ** 0.5, "none": 1.0}
    if rule not in factors:
        raise ValueError(f"unknown LR scaling rule {rule!r}; expected one of {sorted(factors)}")
    return base_lr * factors[rule]


def amp_dtype(capability_major: int, is_rocm: bool = False) -> torch.dtype:
    """bf16 where the GPU computes it natively (compute capability 8.0+: A100, H100, L4, ...; ROCm),
    else fp16 with a GradScaler. V100 (7.0) and T4 (7.5) only emulate bf16, many times slower,
    which ``torch.cuda.is_bf16_supported()`` counts as supported by default."""
    return torch.bfloat16 if is_rocm or capability_major >= 8 else torch.float16


class Precision:
    """Autocast on CUDA (bf16 where native, else fp16 with a GradScaler), plain fp32 on CPU."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled = enabled and device.type == "cuda"
        self.dtype = torch.float32
        if self.enabled:
            self.dtype = amp_dtype(torch.cuda.get_device_capability(device)[0], bool(torch.version.hip))
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


class TrainingAborted(RuntimeError):
    """A deterministic failure every rank agreed on (e.g. a non-finite loss): restarting from the
    last checkpoint would fail the same way, so the run ends at once instead of being retried."""


def check_finite_loss(role: str, losses: dict[str, torch.Tensor], iteration: int, device: torch.device,
                      world_size: int) -> None:
    """Raise ``TrainingAborted`` on every rank when the loss is non-finite on any rank (every rank
    must call it each step: one all-reduce of one number). All ranks stop together: a rank that
    raised alone would leave the others waiting in the next collective until a timeout."""
    local = [name for name, value in losses.items() if not bool(torch.isfinite(value.detach()).all())]
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    if world_size > 1:
        torch.distributed.all_reduce(flag)
    if float(flag) > 0:
        values = {k: float(v.detach()) for k, v in losses.items()}
        raise TrainingAborted(
            f"{role} loss is non-finite at iteration {iteration} on {int(float(flag))} of {world_size} worker(s) "
            f"(this worker's terms: {values}); the run is stopped, not retried. Usual causes: a learning "
            f"rate too high for this batch size (see the config's lr and lr_scaling), or bad input values.")


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
    broadcast off, the copies drift. Every checkpoint calls it too (``RunState.checkpoint``), as a
    resumed run loads rank 0's copy on every worker."""
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


def injected_faults(losses: dict[str, torch.Tensor], iteration: int, rank: int) -> dict[str, torch.Tensor]:
    """Test hook, off unless ``DKD_NAN_AT_ITERATION`` is set (it reaches Ray workers too): at that
    iteration (0-based, before the step) the worker of rank ``DKD_NAN_RANK`` (default 1, else 0
    when alone) sees a NaN loss, as a diverging run would."""
    import os

    at = os.environ.get("DKD_NAN_AT_ITERATION")
    if not at or iteration != int(at) or rank != int(os.environ.get("DKD_NAN_RANK", "1")):
        return losses
    first = next(iter(losses))
    return {**losses, first: losses[first] * float("nan")}


def loader_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The DataLoader's own RNG: creating an iterator otherwise draws from the global RNG, which
    would shift every later random draw of a run resumed mid-epoch. One stream per rank: it seeds
    the loader processes, and ranks must not share their random draws."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_009 + rank)
