"""A half-copied checkpoint never ends a run (issue 13): every rank's manifest is checked, the
resume falls back to the next older complete checkpoint, and never takes another run's or
another config's checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dkd_ray.config import preset
from dkd_ray.train.checkpoint import (CheckpointError, TrainingState, load_checkpoint, manifest_name, save_checkpoint,
                                      verify_checkpoint)
from dkd_ray.train.session import LocalSession, checkpoint_folders, newest_complete_checkpoint
from dkd_ray.train.state import Progress, RunState, run_fingerprint
from tests.tiny import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
STATE_LOG = "dkd_ray.train.state"


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _run(session, cfg=None, seed: int = 0, iteration: int = 0) -> RunState:
    model = _net(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # batches_done > 0: mid-epoch checkpoints (no epoch results to replay on resume)
    return RunState("teacher", 3, cfg or preset("cpu-small"), session, model, optimizer, None, None,
                    Progress(0, iteration, iteration))


def _write_checkpoints(session, iterations, cfg=None) -> dict[int, dict[str, torch.Tensor]]:
    """One checkpoint per iteration through the real RunState.checkpoint -> session.report path;
    returns the weights each one holds."""
    weights = {}
    for iteration in iterations:
        run = _run(session, cfg, seed=iteration, iteration=iteration)
        run.checkpoint({"phase": "teacher"})
        weights[iteration] = {k: v.clone() for k, v in run.model.state_dict().items()}
    return weights


def _folder(root: Path, iteration: int) -> Path:
    return root / f"teacher_e000_i{iteration:07d}"


def _truncate(file: Path) -> None:
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)


def _resume(session, cfg=None) -> RunState:
    run = _run(session, cfg, seed=99)
    run.resume()
    return run


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_written_checkpoint_has_a_manifest_and_meta_says_how_many(tmp_path):
    session = LocalSession(checkpoint_root=tmp_path, run_name="r1")
    _write_checkpoints(session, [1])
    folder = _folder(tmp_path, 1)
    manifest = json.loads((folder / manifest_name(0)).read_text())
    assert set(manifest["files"]) == {"state.pt", "meta.json", "rng_rank0.pt"}
    assert manifest["files"]["state.pt"]["size"] == (folder / "state.pt").stat().st_size
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["manifests"] == 1 and meta["run_name"] == "r1" and meta["role"] == "teacher"
    assert meta["fingerprint"] == run_fingerprint(preset("cpu-small"), "teacher")
    assert verify_checkpoint(folder, hash_files="all") is True


def test_truncated_newest_state_falls_back_to_the_next_older_checkpoint(tmp_path, caplog):
    session = LocalSession(checkpoint_root=tmp_path)
    weights = _write_checkpoints(session, [1, 2, 3])
    assert _resume(session).progress.iteration == 3  # intact: the newest wins

    _truncate(_folder(tmp_path, 3) / "state.pt")
    with caplog.at_level(logging.WARNING, logger=STATE_LOG):
        run = _resume(session)
    assert run.progress.iteration == 2
    for key, value in weights[2].items():
        assert torch.equal(run.model.state_dict()[key], value), key
    text = _warnings(caplog)
    assert f"skipping checkpoint {_folder(tmp_path, 3)}" in text and "truncated" in text, text
    # the scan used by Session.latest_checkpoint and the sweep's champion agrees (sizes only)
    assert session.latest_checkpoint() == _folder(tmp_path, 2)
    assert newest_complete_checkpoint(tmp_path) == _folder(tmp_path, 2)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(_folder(tmp_path, 3))


def test_newest_state_of_the_right_size_but_wrong_bytes_is_caught_by_its_hash(tmp_path, caplog):
    session = LocalSession(checkpoint_root=tmp_path)
    _write_checkpoints(session, [1, 2])
    state = _folder(tmp_path, 2) / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    assert session.latest_checkpoint() == _folder(tmp_path, 2)  # the cheap scan cannot tell
    with caplog.at_level(logging.WARNING, logger=STATE_LOG):
        assert _resume(session).progress.iteration == 1
    assert "state.pt does not match its manifest's sha256" in _warnings(caplog)


def test_planted_half_copy_without_manifest_is_skipped(tmp_path, caplog):
    """A folder as a worker killed mid-upload leaves it: meta.json there, state.pt cut short,
    the manifest not (yet) copied. Both a current meta.json (promising a manifest) and one in
    the old format (no manifest count: only loading can tell) are skipped."""
    session = LocalSession(checkpoint_root=tmp_path)
    _write_checkpoints(session, [1, 2])
    for planted, legacy_meta in ((3, False), (4, True)):
        folder = _folder(tmp_path, planted)
        folder.mkdir()
        meta = json.loads((_folder(tmp_path, 2) / "meta.json").read_text())
        if legacy_meta:
            meta = {"epoch": 0, "iteration": planted, "batches_done": planted, "format": 1}
        (folder / "meta.json").write_text(json.dumps({**meta, "iteration": planted}))
        (folder / "state.pt").write_bytes((_folder(tmp_path, 2) / "state.pt").read_bytes()[:1000])
        (tmp_path / "LATEST").write_text(folder.name)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=STATE_LOG):
            assert _resume(session).progress.iteration == 2
        text = _warnings(caplog)
        assert f"skipping checkpoint {folder}" in text, text
        assert ("MANIFEST.rank0.json is missing" in text) or legacy_meta, text
    assert [f.name for f in checkpoint_folders(tmp_path)][:2] == [_folder(tmp_path, 4).name, _folder(tmp_path, 3).name]


class _MergedLocalSession(LocalSession):
    """As under Ray Train: every rank's files go into the same checkpoint folder."""

    def checkpoint_writers(self) -> int:
        return self.world_size


def test_checkpoint_missing_another_ranks_manifest_is_incomplete(tmp_path, caplog):
    session = _MergedLocalSession(checkpoint_root=tmp_path)
    _write_checkpoints(session, [1])
    session.world_size = 2  # rank 0 of two: rank 1's upload (its files and manifest) never arrives
    _write_checkpoints(session, [2])
    session.world_size = 1
    assert json.loads((_folder(tmp_path, 2) / "meta.json").read_text())["manifests"] == 2
    with caplog.at_level(logging.WARNING, logger=STATE_LOG):
        assert _resume(session).progress.iteration == 1
    assert "MANIFEST.rank1.json is missing" in _warnings(caplog)


def test_checkpoint_of_another_config_or_run_is_skipped(tmp_path, caplog):
    cfg = preset("cpu-small")
    session = LocalSession(checkpoint_root=tmp_path, run_name="run-a")
    _write_checkpoints(session, [1, 2], cfg)
    other = preset("cpu-small", ["teacher.lr=0.002"])
    assert run_fingerprint(other, "teacher") != run_fingerprint(cfg, "teacher")
    _write_checkpoints(session, [3], other)
    with caplog.at_level(logging.WARNING, logger=STATE_LOG):
        assert _resume(session, cfg).progress.iteration == 2
    text = _warnings(caplog)
    assert f"skipping checkpoint {_folder(tmp_path, 3)}" in text and "another config" in text, text
    assert "teacher.lr: 0.002 -> 0.001" in text, text
    assert _resume(session, other).progress.iteration == 3  # its own config takes it

    # What legitimately changes on resume does not count, nor do the student's settings.
    resumable = preset("cpu-small", ["train.max_iters=50", "train.num_workers=2", "train.checkpoint_every_iters=7",
                                     "data.loader_workers=0", "student.lr=0.5", "eval.cbgm=true"])
    assert run_fingerprint(resumable, "teacher") == run_fingerprint(cfg, "teacher")
    assert run_fingerprint(resumable, "student") != run_fingerprint(cfg, "student")



def test_resume_among_only_another_runs_or_configs_checkpoints_is_refused(tmp_path, caplog):
    """Starting from scratch there would mix two runs in one folder (and the newer one's retention
    would delete the older one's checkpoints): refused by name, as bad input."""
    from dkd_ray.errors import InputError
    from dkd_ray.train.state import ForeignCheckpointError

    cfg = preset("cpu-small")
    _write_checkpoints(LocalSession(checkpoint_root=tmp_path, run_name="run-a"), [1, 2], cfg)
    before = sorted(p.name for p in tmp_path.iterdir())
    stranger = LocalSession(checkpoint_root=tmp_path, run_name="run-b")
    with pytest.raises(ForeignCheckpointError, match="it belongs to run 'run-a', not to this run 'run-b'") as caught:
        _resume(stranger, cfg)
    assert isinstance(caught.value, InputError) and str(tmp_path) in str(caught.value)
    changed = LocalSession(checkpoint_root=tmp_path, run_name="run-a")
    with pytest.raises(ForeignCheckpointError, match=r"another config.*teacher.lr: 0.001 -> 0.002"):
        _resume(changed, preset("cpu-small", ["teacher.lr=0.002"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written or deleted

    # A truncated checkpoint of its own is no reason to refuse: the run starts over, saying so.
    own = tmp_path / "own"
    _write_checkpoints(LocalSession(checkpoint_root=own, run_name="run-c"), [1], cfg)
    _truncate(_folder(own, 1) / "state.pt")
    with caplog.at_level(logging.WARNING, logger=STATE_LOG):
        assert _resume(LocalSession(checkpoint_root=own, run_name="run-c"), cfg).progress.iteration == 0
    assert "starting from scratch" in _warnings(caplog)


def test_checkpoint_written_before_manifests_still_loads_with_one_warning(tmp_path, caplog):
    cfg = preset("cpu-small")
    model = _net(5)
    folder = tmp_path / "teacher_e000_i0000004"
    save_checkpoint(TrainingState.capture(model, epoch=0, iteration=4, batches_done=4, config=cfg,
                                          extra={"role": "teacher", "num_classes": 3}), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "state.pt"]  # the old layout
    (tmp_path / "LATEST").write_text(folder.name)
    session = LocalSession(checkpoint_root=tmp_path)
    with caplog.at_level(logging.WARNING, logger=STATE_LOG):
        run = _resume(session, cfg)
        assert _resume(session, cfg).progress.iteration == 4
    assert run.progress.iteration == 4
    assert torch.equal(run.model[0].weight, model[0].weight)
    assert _warnings(caplog).count("has no manifest") == 1
    # its config is in state.pt: another config's run still does not take it
    with pytest.raises(CheckpointError, match="another config"):
        _resume(session, preset("cpu-small", ["teacher.lr=0.002"]))


@contextlib.contextmanager
def _small_disk(folder: Path, size_bytes: int):
    """A tmpfs of ``size_bytes`` mounted at ``folder`` (root only); yields a function that grows
    it (the operator freeing space), or None where mounting is not allowed."""
    folder.mkdir(parents=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)], capture_output=True).returncode == 0

    def grow(to_bytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={to_bytes}", str(folder)], check=True)

    try:
        yield grow if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.slow
def test_resumed_ray_job_after_a_full_disk_skips_a_truncated_checkpoint(tiny_cuhk, tiny_teacher, tmp_path):
    """The teacher job on a real local Ray cluster, 2 DDP workers (rank 0 chooses the checkpoint,
    rank 1 follows), storage on a disk with room for 2.5 checkpoints: the copy of the third one
    fills it (ENOSPC half way through state.pt; no retries). The job fails saying the storage is
    full, and the partial copy is gone. The second checkpoint's state.pt is then cut short (its
    copy killed half way), the disk grows (space freed), and ``--resume`` resumes from iteration 1,
    not from the broken iteration 2, trains iterations 2 to 4 (the retaken 2 under a name of its
    own), and finishes the MLflow run the failed job had left FAILED. (Where no tmpfs can be mounted, a worker is killed after
    iteration 3 instead of the disk filling.)"""
    checkpoint_bytes = (tiny_teacher / "state.pt").stat().st_size
    storage = tmp_path / "disk"
    trace = tmp_path / "trace.txt"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "DKD_TRACE_FILE": str(trace),
           "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)  # a fresh local cluster, never someone else's

    def job(*extra: str, env=env) -> subprocess.CompletedProcess:
        args = [sys.executable, str(ROOT / "jobs" / "train_teacher.py"), "--data-root", str(tiny_cuhk),
                "--num-workers", "2", "--storage-path", str(storage), "--set", "train.checkpoint_every_iters=1",
                "--set", "train.max_failures=0", *extra]
        for override in TINY_OVERRIDES:
            args += ["--set", override]
        return subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    with _small_disk(storage, int(2.5 * checkpoint_bytes)) as grow:
        if grow is not None:
            died = job("--run-name", "integrity", "--max-iters", "4")
            output = died.stdout + died.stderr
            assert died.returncode != 0, output[-6000:]
            assert re.search(r"checkpoint teacher_e\d+_i0000003 could not be written", output), output[-6000:]
            assert "the storage is full" in output and "partial copy was removed" in output, output[-6000:]
        else:
            died = job("--run-name", "integrity", "--max-iters", "4",
                       env={**env, "DKD_KILL_AT_ITERATION": "3", "DKD_KILL_MARKER": str(tmp_path / "killed")})
            assert died.returncode != 0 and (tmp_path / "killed").exists(), (died.stdout + died.stderr)[-6000:]
        folders = checkpoint_folders(storage / "integrity")
        assert [json.loads((f / "meta.json").read_text())["iteration"] for f in folders] == [2, 1]
        newest, older = folders
        assert {manifest_name(0), manifest_name(1), "rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in newest.iterdir()}
        _truncate(newest / "state.pt")
        trace.unlink()
        if grow is not None:
            grow(6 * checkpoint_bytes)

        done = job("--resume", "integrity", "--max-iters", "4")
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-6000:]
        assert f"skipping checkpoint {newest}" in output and "truncated" in output, output[-6000:]
        assert f"resumed from {older} at epoch 1 iteration 1" in output, output[-6000:]
        # rank 0's "<iteration> <batch>" per step: iteration 2 again (its checkpoint was lost), then 3 and 4
        assert [line.split()[0] for line in trace.read_text().splitlines()] == ["2", "3", "4"]
        assert load_checkpoint(checkpoint_folders(storage / "integrity")[0]).iteration == 4
        # The retaken iteration 2 was saved under a new name, so Ray's pruning (2 kept) removed
        # the broken folder and the retaken one each once, without tripping on a folder listed twice.
        assert [f.name for f in checkpoint_folders(storage / "integrity")] == [
            "teacher_e004_i0000004", "teacher_e003_i0000003"]

    # One MLflow run for the run folder: the failed job left it FAILED, the resumed one continued it.
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("dkd-ray/synthetic")
    runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'integrity'")
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_id, r.info.status) for r in runs]
    assert "failure" in runs[0].data.tags  # what ended the first job stays on record
