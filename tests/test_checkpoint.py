"""Checkpoint round trips, atomic writes and safe loading (dkd_ray.train.checkpoint)."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dkd_ray.config import ConfigError, preset
from dkd_ray.train import checkpoint as ckpt
from dkd_ray.train.checkpoint import (CheckpointError, TrainingState, load_checkpoint, read_meta,
                                      restore_rank_rng, save_checkpoint, save_rank_rng, unwrap_model)


def _small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train_steps(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(4, 6)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn()


def _setup(seed: int):
    torch.manual_seed(seed)
    model = _small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3, 6], gamma=0.5)
    return model, optimizer, scheduler


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    model, optimizer, scheduler = _setup(0)
    _train_steps(model, optimizer, scheduler, 4)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    cfg = preset("cpu-small")
    np.random.randn()  # leave a cached gaussian in numpy's legacy state: it must survive too
    state = TrainingState.capture(model, optimizer, scheduler, scaler, epoch=2, iteration=17,
                                  batches_done=5, config=cfg, extra={"bank_size": 3})
    save_checkpoint(state, tmp_path / "ck")
    expected_draws = _draws()
    _train_steps(model, optimizer, scheduler, 3)  # continue: the reference trajectory
    reference = [p.detach().clone() for p in model.parameters()]

    # A fresh process-like start: different init, different RNG, then restore.
    model2, optimizer2, scheduler2 = _setup(99)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    loaded = load_checkpoint(tmp_path / "ck")
    loaded.restore(model2, optimizer2, scheduler2, scaler2)

    assert (loaded.epoch, loaded.iteration, loaded.batches_done) == (2, 17, 5)
    assert loaded.config == cfg.to_dict()
    assert loaded.extra == {"bank_size": 3}
    assert scaler2.get_scale() == 512.0
    assert scheduler2.last_epoch == scheduler.last_epoch - 3
    for key, value in state.model.items():
        assert torch.equal(model2.state_dict()[key], value), key
    assert _draws() == expected_draws  # same random numbers as right after the save
    _train_steps(model2, optimizer2, scheduler2, 3)  # momentum buffers and LR schedule restored
    for got, want in zip(model2.parameters(), reference):
        assert torch.equal(got, want)
    assert read_meta(tmp_path / "ck") == {"epoch": 2, "iteration": 17, "batches_done": 5, "format": 1}


def test_config_survives_and_rebuilds(tmp_path):
    from dkd_ray.config import Config

    cfg = preset("cpu-small", ["student.lr=0.02", "teacher.lr_steps=5,9"])
    model, optimizer, _ = _setup(0)
    save_checkpoint(TrainingState.capture(model, optimizer, epoch=0, iteration=0, config=cfg), tmp_path)
    rebuilt = Config.from_dict(load_checkpoint(tmp_path / "state.pt").config)
    assert rebuilt.student.lr == 0.02 and rebuilt.teacher.lr_steps == (5, 9)


def test_ddp_wrapper_is_unwrapped(tmp_path):
    model = _small_net()
    wrapped = nn.DataParallel(model)  # same `.module` unwrapping path as DistributedDataParallel
    assert unwrap_model(wrapped) is model
    state = TrainingState.capture(wrapped, epoch=0, iteration=0)
    assert set(state.model) == set(model.state_dict())  # no "module." prefixes
    save_checkpoint(state, tmp_path)
    fresh = _small_net()
    load_checkpoint(tmp_path).restore(nn.DataParallel(fresh), restore_rng=False)
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_crash_during_replace_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, _ = _setup(0)
    save_checkpoint(TrainingState.capture(model, optimizer, epoch=1, iteration=10), tmp_path)
    first = load_checkpoint(tmp_path).model

    with torch.no_grad():
        model[0].weight.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(TrainingState.capture(model, optimizer, epoch=2, iteration=20), tmp_path)
    monkeypatch.undo()

    survivor = load_checkpoint(tmp_path)
    assert survivor.iteration == 10
    assert torch.equal(survivor.model["0.weight"], first["0.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "state.pt"]  # no temp left


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, _ = _setup(0)
    save_checkpoint(TrainingState.capture(model, optimizer, epoch=1, iteration=10), tmp_path)
    real_save = torch.save

    def half_write(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # a torn file, as if the process died while writing
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt.torch, "save", half_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(TrainingState.capture(model, optimizer, epoch=2, iteration=20), tmp_path)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path).iteration == 10
    assert json.loads((tmp_path / "meta.json").read_text())["iteration"] == 10


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_weights_only_refuses_arbitrary_pickles(tmp_path):
    with open(tmp_path / "state.pt", "wb") as f:
        torch.save({"model": {}, "payload": _Payload()}, f, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path)


def test_non_plain_values_are_rejected_at_save_time(tmp_path):
    model = _small_net()
    state = TrainingState.capture(model, epoch=0, iteration=0, extra={"bank": np.zeros(3)})
    with pytest.raises(CheckpointError, match=r"state\.extra\.bank is a ndarray"):
        save_checkpoint(state, tmp_path)
    assert not (tmp_path / "state.pt").exists()


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nowhere")):
        load_checkpoint(tmp_path / "nowhere")


def test_per_rank_rng_files(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    save_rank_rng(tmp_path, rank=1)
    expected = _draws()
    torch.manual_seed(4), np.random.seed(4), random.seed(4)
    assert restore_rank_rng(tmp_path, rank=1) is True
    assert _draws() == expected
    assert restore_rank_rng(tmp_path, rank=2) is False


class _SharedFolderSession:
    """Two ranks reporting into one checkpoint folder, as Ray Train merges every rank's files."""

    def __init__(self, root, rank):
        self.root, self.rank, self.world_size, self.is_main = root, rank, 2, rank == 0

    def latest_checkpoint(self):
        return self.root / "latest" if (self.root / "latest").exists() else None

    def report(self, metrics, checkpoint_dir=None, name=None, background=False):
        import shutil

        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, self.root / "latest", dirs_exist_ok=True)


def test_each_rank_resumes_its_own_rng_stream(tmp_path):
    """After a restart every rank continues its own random stream, not rank 0's."""
    from dkd_ray.train.state import Progress, RunState

    cfg = preset("cpu-small")
    streams = {}
    for rank in (1, 0):  # rank 0 last: its training state is the one in state.pt
        torch.manual_seed(100 + rank), np.random.seed(100 + rank), random.seed(100 + rank)
        model = _small_net()
        run = RunState("teacher", 3, cfg, _SharedFolderSession(tmp_path, rank), model, None, None, None, Progress())
        run.checkpoint({"phase": "teacher"})
        streams[rank] = _draws()  # what this rank would draw next
    for rank in (0, 1):
        torch.manual_seed(7), np.random.seed(7), random.seed(7)  # a fresh process after the restart
        run = RunState("teacher", 3, cfg, _SharedFolderSession(tmp_path, rank), _small_net(), None, None, None,
                       Progress())
        run.resume()
        assert _draws() == streams[rank], f"rank {rank} did not get its own stream back"
    assert streams[0] != streams[1]


class _FakeRayTrain:
    """What ``RaySession`` calls of ``ray.train``: records each report's arguments and whether
    its folder still existed when the (background) upload would read it."""

    from ray.train import Checkpoint, CheckpointUploadMode

    def __init__(self):
        self.calls = []

    def report(self, metrics, checkpoint=None, **kwargs):
        self.calls.append((metrics, checkpoint, kwargs))


def _ray_session(fake, rank=0):
    from dkd_ray.train.session import RaySession

    session = RaySession.__new__(RaySession)  # no Ray Train context here: wire in the fake
    session._train, session.rank, session.world_size, session.local_rank = fake, rank, 1, 0
    session.run_dir, session.run_name, session._restored = None, "run", None
    return session


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_checkpoint_upload_mode_reaches_ray_train_and_the_folder_outlives_an_async_report(tmp_path, mode):
    """``train.checkpoint_upload=async``: the report asks Ray Train for its asynchronous upload
    (Ray deletes the folder once uploaded) and the folder is left for it; ``sync``: a plain
    report, and the folder is removed once the report returned (Ray has copied it by then)."""
    from ray.train import CheckpointUploadMode

    from dkd_ray.train.state import Progress, RunState

    cfg = preset("cpu-small", [f"train.checkpoint_upload={mode}"])
    fake = _FakeRayTrain()
    run = RunState("teacher", 3, cfg, _ray_session(fake), _small_net(), None, None, None, Progress())
    run.checkpoint({"phase": "teacher"})
    (metrics, checkpoint, kwargs), = fake.calls
    folder = Path(checkpoint.path)
    if mode == "async":
        assert kwargs["checkpoint_upload_mode"] == CheckpointUploadMode.ASYNC
        assert kwargs["delete_local_checkpoint_after_upload"] is True
        assert (folder / "state.pt").is_file() and load_checkpoint(folder).iteration == 0  # complete, for Ray
        shutil.rmtree(folder)  # what Ray does after the upload
    else:
        assert "checkpoint_upload_mode" not in kwargs
        assert not folder.exists()


def test_only_the_real_presets_upload_in_the_background():
    assert preset("cuhk_sysu").train.checkpoint_upload == preset("prw").train.checkpoint_upload == "async"
    assert preset("cpu-small").train.checkpoint_upload == "sync"
    with pytest.raises(ConfigError, match="train.checkpoint_upload"):
        preset("cpu-small", ["train.checkpoint_upload=later"])


def test_an_async_checkpoint_that_fails_before_ray_takes_it_leaves_no_folder(tmp_path):
    """With the background upload the folder outlives report(); if writing or reporting fails
    first, nothing of it is left on the worker's disk."""
    from dkd_ray.train.state import Progress, RunState

    class Failing(_FakeRayTrain):
        def report(self, metrics, checkpoint=None, **kwargs):
            super().report(metrics, checkpoint, **kwargs)
            raise RuntimeError("the controller is gone")

    fake = Failing()
    run = RunState("teacher", 3, preset("cpu-small", ["train.checkpoint_upload=async"]), _ray_session(fake),
                   _small_net(), None, None, None, Progress())
    with pytest.raises(RuntimeError, match="controller is gone"):
        run.checkpoint({"phase": "teacher"})
    assert not Path(fake.calls[0][1].path).exists()
