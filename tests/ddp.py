"""Data-parallel training without Ray: processes joined by gloo on 127.0.0.1, one thread each,
as Ray Train sets up its CPU workers. For tests that compare a Ray run with a plain one."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.harness import free_port


def _worker(rank: int, world: int, port: int, loop_config: dict[str, Any], out: str) -> None:
    from dkd_ray.train.session import LocalSession
    from dkd_ray.train.student_loop import train_student

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # bounded: a lost peer fails the test
    try:
        torch.set_num_threads(1)
        session = LocalSession(checkpoint_root=Path(out) / f"rank{rank}")
        session.rank, session.world_size = rank, world
        train_student(loop_config, session)
    finally:
        dist.destroy_process_group()


def train_student_on_workers(loop_config: dict[str, Any], out: Path, world: int = 2) -> Path:
    """Run the student loop on ``world`` processes; return rank 0's newest checkpoint folder."""
    from dkd_ray.train.session import LocalSession

    mp.spawn(_worker, args=(world, free_port(), loop_config, str(out)), nprocs=world, join=True)
    return LocalSession(checkpoint_root=out / "rank0").latest_checkpoint()
