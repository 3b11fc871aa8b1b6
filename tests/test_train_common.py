"""Pieces both loops share whose GPU-only paths need CPU tests of their logic: the AMP dtype, LR
scaling across workers, the warm-up, the cross-rank non-finite check, per-rank loader streams."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dkd_ray.config import ConfigError, preset
from dkd_ray.train.common import (TrainingAborted, amp_dtype, check_finite_loss, loader_generator, scaled_lr,
                                  warmup_multistep)
from tests.harness import free_port


@pytest.mark.parametrize("major, rocm, expected", [
    (7, False, torch.float16),  # V100 (7.0), T4 (7.5): bf16 only emulated
    (8, False, torch.bfloat16),  # A100, A10, L4
    (9, False, torch.bfloat16),  # H100
    (6, True, torch.bfloat16),  # ROCm
])
def test_amp_dtype_is_bf16_only_where_native(major, rocm, expected):
    assert amp_dtype(major, rocm) == expected


def test_lr_scaling_rules():
    assert scaled_lr(0.003, 8) == pytest.approx(0.024)  # the student: SGD, linear
    assert scaled_lr(3.5e-4, 4, "sqrt") == pytest.approx(7e-4)  # the teacher: Adam, square root
    assert scaled_lr(3.5e-4, 8, "none") == 3.5e-4
    with pytest.raises(ValueError, match="unknown LR scaling"):
        scaled_lr(1.0, 2, "cubic")
    assert preset("cuhk_sysu").teacher.lr_scaling == "sqrt"
    with pytest.raises(ConfigError, match="teacher.lr_scaling"):
        preset("cuhk_sysu", ["teacher.lr_scaling=log"])


def test_seqnet_warmup_over_the_first_epoch_from_one_thousandth():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = warmup_multistep(optimizer, warmup_iters=100, milestones=[300], warmup_factor=0.001)
    lrs = []
    for _ in range(301):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.001)
    assert lrs[50] == pytest.approx(0.001 + 0.999 * 0.5)
    assert lrs[100] == lrs[299] == 1.0 and lrs[300] == pytest.approx(0.1)
    cfg = preset("cuhk_sysu")
    assert (cfg.student.warmup_epochs, cfg.student.warmup_factor) == (1.0, 0.001)
    assert preset("prw").student.epochs == 18


def test_loader_streams_differ_by_rank_and_repeat_by_seed():
    draw = lambda rank: torch.randint(0, 2**30, (4,), generator=loader_generator(3, 1, rank)).tolist()
    assert draw(0) == draw(0) and draw(0) != draw(1)


def test_non_finite_loss_on_one_worker_stops_every_worker_with_one_message(tmp_path):
    mp.spawn(_finite_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    for message in messages:
        assert message.startswith("aborted at 1:") and "on 1 of 2 worker(s)" in message
        assert "not retried" in message


def _finite_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        outcome = "finished"
        for iteration in range(3):
            bad = rank == 1 and iteration == 1  # only rank 1 sees the NaN
            losses = {"loss_oim": torch.tensor(float("nan") if bad else 1.0), "loss_box_reg": torch.tensor(0.5)}
            try:
                check_finite_loss("student", losses, iteration, torch.device("cpu"), world)
            except TrainingAborted as error:
                outcome = f"aborted at {iteration}: {error}"
                break
        with open(f"{out_dir}/rank{rank}.txt", "w") as f:
            f.write(outcome)
    finally:
        dist.destroy_process_group()
