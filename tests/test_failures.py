"""Which failures ``runner.fit`` retries: bad input raised by one worker fails the run once, with
its class and message (no retry, whatever ``train.max_failures``); any other failure restarts the
run. A real local Ray cluster with 2 Ray Train workers."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from dkd_ray.config import preset
from dkd_ray.data.matlab import DatasetError
from dkd_ray.errors import InputError
from dkd_ray.train.runner import deterministic_failure, fit


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from dkd_ray.train.runner import init_ray

    init_ray()
    yield
    ray.shutdown()


def _cfg(max_failures: int):
    return preset("cpu-small", ["train.num_workers=2", f"train.max_failures={max_failures}"])


def _record_attempt(config: dict) -> int:
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"attempt-rank{rank}-pid{os.getpid()}").touch()
    return rank


def _bad_annotation_on_rank_1(config: dict) -> None:
    if _record_attempt(config) == 1:
        raise DatasetError("annotation/Images.mat", "Img(3).box(1): non-finite box [nan, 2, 3, 4]")


def _lost_once_then_fine(config: dict) -> None:
    import ray.train

    rank = _record_attempt(config)
    marker = Path(config["out"], "failed-once")
    if rank == 0 and not marker.exists():
        marker.touch()
        raise RuntimeError("connection to the other worker lost")  # what a dead node looks like
    import tempfile

    with tempfile.TemporaryDirectory() as folder:  # Result.metrics are those of the last checkpoint
        Path(folder, "done.txt").write_text("done")
        ray.train.report({"done": 1.0}, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)


def test_bad_input_on_one_worker_fails_once_with_its_own_error(local_ray, tmp_path):
    cfg = _cfg(max_failures=3)
    with pytest.raises(DatasetError) as raised:
        fit(_bad_annotation_on_rank_1, {"config": cfg.to_dict(), "out": str(tmp_path)}, cfg, name="bad-input",
            storage_path=tmp_path / "runs")
    assert raised.value.file == "annotation/Images.mat" and "Img(3).box(1)" in str(raised.value)
    assert len(list(tmp_path.glob("attempt-rank1-*"))) == 1  # never retried despite max_failures=3


def test_other_failures_restart_the_run_within_the_budget(local_ray, tmp_path):
    cfg = _cfg(max_failures=1)
    result = fit(_lost_once_then_fine, {"config": cfg.to_dict(), "out": str(tmp_path)}, cfg, name="flaky",
                 storage_path=tmp_path / "runs")
    assert result.metrics["done"] == 1.0
    assert len(list(tmp_path.glob("attempt-rank0-*"))) == 2  # the failed attempt and its restart

    from ray.train.v2.api.exceptions import TrainingFailedError

    again = tmp_path / "no-budget"
    again.mkdir()
    cfg = _cfg(max_failures=0)
    with pytest.raises(TrainingFailedError):
        fit(_lost_once_then_fine, {"config": cfg.to_dict(), "out": str(again)}, cfg, name="flaky-no-budget",
            storage_path=tmp_path / "runs")
    assert len(list(again.glob("attempt-rank0-*"))) == 1


def test_deterministic_failure_unwraps_ray_and_pickles_intact():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    bad = pickle.loads(pickle.dumps(DatasetError("PRW/query_info.txt", "line 7: nan coordinate")))
    assert isinstance(bad, InputError) and bad.file == "PRW/query_info.txt"
    error = WorkerGroupError("rank 1 failed", {0: UserExceptionWithTraceback(RuntimeError("collateral"), "tb"),
                                               1: UserExceptionWithTraceback(bad, "tb")})
    assert deterministic_failure(pickle.loads(pickle.dumps(error))).file == "PRW/query_info.txt"
    lost = WorkerGroupError("rank 0 died", {0: UserExceptionWithTraceback(RuntimeError("node lost"), "tb")})
    assert deterministic_failure(lost) is None
