"""A loss that goes non-finite on one worker stops the whole run at once, with one message, and
Ray Train does not spend its failure budget restarting into the same failure: a real local Ray
cluster, the teacher job, 2 DDP workers, NaN injected on rank 1 only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import TINY_OVERRIDES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_non_finite_teacher_loss_fails_once_and_is_not_registered(tiny_cuhk, tmp_path):
    from mlflow import MlflowClient

    trace = tmp_path / "trace.txt"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, str(ROOT / "jobs" / "train_teacher.py"), "--data-root", str(tiny_cuhk),
            "--num-workers", "2", "--max-iters", "6", "--storage-path", str(tmp_path / "runs"),
            "--run-name", "diverging", "--set", "train.checkpoint_every_iters=1", "--set", "train.max_failures=3"]
    for override in TINY_OVERRIDES:
        args += ["--set", override]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "DKD_TRACE_FILE": str(trace),
           "DKD_NAN_AT_ITERATION": "2", "DKD_NAN_RANK": "1", "RAY_DEDUP_LOGS": "0"}
    done = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-4000:]
    assert "TrainingAborted" in output and "non-finite at iteration 2 on 1 of 2 worker(s)" in output, output[-4000:]
    # Iterations 0 and 1 trained once each; nobody restarted from a checkpoint into the NaN again.
    assert [line.split()[0] for line in trace.read_text().splitlines()] == ["1", "2"]
    assert output.count("non-finite at iteration 2") <= 4  # the workers' own lines and the driver's
    client = MlflowClient(store, store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    teacher_runs = [r for r in runs if r.info.run_name == "diverging"]
    assert teacher_runs and all(r.info.status == "FAILED" for r in teacher_runs)
    assert "non-finite" in teacher_runs[0].data.tags.get("failure", "")
    assert not client.search_registered_models()  # nothing registered
