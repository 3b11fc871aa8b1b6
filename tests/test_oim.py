"""OIM loss: hand-computed loss and memory updates, buffers in the state dict, and identical
memories across data-parallel workers (2 processes, gloo, CPU)."""

from __future__ import annotations

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dkd_ray.models.oim import OIMLoss
from tests.harness import free_port


def test_loss_hand_computed():
    oim = OIMLoss(embedding_dim=2, num_labelled=2, queue_size=3, scalar=2.0).eval()
    oim.lut.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    oim.queue.copy_(torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # row 0, id 0: logits 2 * [1, 0, .6, 0, 0]; row 1 unlabelled: not in the loss
    expected = -(2 - math.log(math.exp(2) + 1 + math.exp(1.2) + 2))
    loss = oim(x, torch.tensor([0, -1]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(oim.labelled_logits(x), 2 * torch.tensor([[1.0, 0.0], [0.6, 0.8]]))


def test_momentum_update_hand_computed():
    """One momentum step per sample, in batch order (OIM / SeqNet)."""
    oim = OIMLoss(2, num_labelled=3, queue_size=4, momentum=0.5).train()
    # Step 1, id 0 seen twice: lut[0] = normalise(.5 * 0 + .5 * (1, 0)) = (1, 0), then
    # normalise(.5 * (1, 0) + .5 * (0, 1)) = (r, r); id 2 once: (0, 1).
    oim(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0, 2]))
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(oim.lut, torch.tensor([[r, r], [0.0, 0.0], [0.0, 1.0]]))
    # Step 2, id 0 seen three times: (r, r) -> (1, 0) pulls it to a, then (1, 0) to b, then (0, 1) to c.
    oim(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 0]))
    expected = torch.tensor([r, r])
    for x in ([1.0, 0.0], [1.0, 0.0], [0.0, 1.0]):
        expected = 0.5 * expected + 0.5 * torch.tensor(x)
        expected = expected / expected.norm()
    torch.testing.assert_close(oim.lut[0], expected)
    torch.testing.assert_close(oim.lut[1:], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    assert int(oim.queue_ptr) == 0 and oim.queue.abs().sum() == 0  # nothing unlabelled yet


def test_per_sample_update_equals_the_sequential_loop():
    """The vectorised rounds give exactly what SeqNet's per-sample loop gives, in any order."""
    torch.manual_seed(0)
    oim = OIMLoss(8, num_labelled=5, queue_size=4, momentum=0.5).train()
    oim.lut.copy_(torch.nn.functional.normalize(torch.randn(5, 8), dim=1))
    lut = oim.lut.clone()
    x = torch.nn.functional.normalize(torch.randn(40, 8), dim=1)
    pids = torch.randint(-1, 5, (40,))
    oim(x, pids)
    for feature, y in zip(x, pids.tolist()):
        if y >= 0:
            lut[y] = 0.5 * lut[y] + 0.5 * feature
            lut[y] /= lut[y].norm()
    torch.testing.assert_close(oim.lut, lut)


def test_mean_update_option_hand_computed():
    oim = OIMLoss(2, num_labelled=3, queue_size=4, momentum=0.5, update="mean").train()
    # id 0 seen twice: batch mean (.5, .5); lut[0] = normalise(.5 * 0 + .5 * (.5, .5)).
    oim(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0, 2]))
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(oim.lut, torch.tensor([[r, r], [0.0, 0.0], [0.0, 1.0]]))
    oim(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))  # mean (.5, .5): stays (r, r)
    torch.testing.assert_close(oim.lut[0], torch.tensor([r, r]))
    with pytest.raises(ValueError, match="OIM update"):
        OIMLoss(2, 3, 4, update="batch")


def test_queue_wraps_around():
    oim = OIMLoss(1, num_labelled=1, queue_size=3).train()

    def push(*values):
        oim(torch.tensor(values)[:, None], torch.full((len(values),), -1))

    push(1.0, 2.0)
    assert oim.queue[:, 0].tolist() == [1.0, 2.0, 0.0] and int(oim.queue_ptr) == 2
    push(3.0, 4.0)  # slots 2, 0
    assert oim.queue[:, 0].tolist() == [4.0, 2.0, 3.0] and int(oim.queue_ptr) == 1
    push(5.0, 6.0, 7.0, 8.0, 9.0)  # more than Q: the last three, written at 1, 2, 0
    assert oim.queue[:, 0].tolist() == [9.0, 7.0, 8.0] and int(oim.queue_ptr) == 1


def test_gradient_reaches_features_only_and_eval_does_not_update():
    oim = OIMLoss(4, num_labelled=3, queue_size=5).train()
    x = torch.nn.functional.normalize(torch.randn(6, 4), dim=1).requires_grad_()
    pids = torch.tensor([0, 1, 2, -1, -1, 0])
    oim(x, pids)  # fill the memories
    loss = oim(x, pids)  # memories updated in place after the logits were computed
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not b.requires_grad for b in oim.buffers())
    before = {k: v.clone() for k, v in oim.state_dict().items()}
    oim.eval()(x.detach(), pids)
    for k, v in oim.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_no_labelled_sample_gives_connected_zero():
    oim = OIMLoss(2, 2, 2).train()
    x = torch.randn(2, 2, requires_grad=True)
    loss = oim(x, torch.tensor([-1, -1]))
    loss.backward()
    assert loss.item() == 0.0 and x.grad is not None


def test_buffers_survive_save_and_load(tmp_path):
    oim = OIMLoss(3, num_labelled=4, queue_size=5).train()
    for _ in range(3):
        oim(torch.randn(7, 3), torch.tensor([0, 1, -1, 3, -1, -1, 2]))
    assert set(oim.state_dict()) == {"lut", "queue", "queue_ptr"}
    torch.save(oim.state_dict(), tmp_path / "oim.pt")
    restored = OIMLoss(3, num_labelled=4, queue_size=5)
    restored.load_state_dict(torch.load(tmp_path / "oim.pt", weights_only=True))
    for name, value in oim.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    assert int(restored.queue_ptr) == (3 * 3) % 5


def test_autocast_keeps_oim_in_float32():
    oim = OIMLoss(8, num_labelled=3, queue_size=4).train()
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = oim(x, torch.tensor([0, 1, 2, -1, 0]))
        logits = oim.labelled_logits(x)
    assert loss.dtype == torch.float32 and logits.dtype == torch.float32
    assert oim.lut.dtype == torch.float32 and torch.isfinite(loss)


def test_rejects_bad_shapes_and_ids():
    oim = OIMLoss(4, num_labelled=2, queue_size=2)
    with pytest.raises(ValueError, match="features"):
        oim(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="identity 2"):
        oim(torch.randn(1, 4), torch.tensor([2]))


# ---------------------------------------------------------------- data-parallel consistency
STEPS = 4
WORKER_ROWS = (3, 6)  # different counts per worker: the gather pads


def _worker_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + rank)
    batches = []
    for _ in range(STEPS):
        n = WORKER_ROWS[rank]
        x = torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=1)
        pids = torch.randint(-1, 5, (n,), generator=gen)  # ids 0..4 and unlabelled
        batches.append((x, pids))
    return batches


def _new_oim() -> OIMLoss:
    return OIMLoss(4, num_labelled=5, queue_size=7, momentum=0.5).train()


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # bounded: a lost peer fails the test
    try:
        oim = _new_oim()
        for x, pids in _worker_batches(rank):
            oim(x.requires_grad_(), pids).backward()
        torch.save(oim.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_memories_identical_across_two_gloo_workers(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in ("lut", "queue", "queue_ptr"):
        assert torch.equal(states[0][name], states[1][name]), f"{name} differs between workers"
    # And equal to one process seeing both workers' batches, rank order, step by step.
    reference = _new_oim()
    for (x0, p0), (x1, p1) in zip(_worker_batches(0), _worker_batches(1)):
        reference.update(torch.cat([x0, x1]), torch.cat([p0, p1]))
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(states[0][name], value)
    assert states[0]["queue"].abs().sum() > 0 and states[0]["lut"].abs().sum() > 0
