"""The student job end to end on real parts, through its crashes: the tracking server going away
mid-run, a driver killed outright and continued with --resume (a job that dies with its worker
and is resumed: test_checkpoint_integrity.py). (`ray job submit` to a two-node cluster with a worker killed mid-run is in
test_object_storage.py.)"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness import mlflow_server
from tests.tiny import TINY_OVERRIDES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _student_args(data_root: Path, teacher: Path, storage: Path, max_iters: int, workers: int) -> list[str]:
    args = [sys.executable, str(ROOT / "jobs" / "train_student.py"), "--data-root", str(data_root),
            "--teacher", str(teacher), "--num-workers", str(workers), "--max-iters", str(max_iters),
            "--storage-path", str(storage), "--run-name", "student-under-test",
            "--set", "train.checkpoint_every_iters=2", "--set", "train.deterministic=true"]
    for override in TINY_OVERRIDES:
        args += ["--set", override]
    return args


def _lineage(trace: Path) -> list[tuple[int, str]]:
    return [(int(i), key) for i, key in (line.split() for line in trace.read_text().splitlines())]


def _wait_for(output: list[str], text: str, job: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(text in line for line in list(output)) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert any(text in line for line in list(output)), f"no {text!r} in the job's output:\n" + "".join(output)[-6000:]


def test_tracking_server_killed_twice_mid_run_loses_no_metric_point(tiny_cuhk, tiny_teacher, tmp_path):
    """The tracking server is SIGKILLed after epoch 1 and comes back (same store) after epoch 2:
    epoch 2's metrics wait and go out with epoch 3's. It is SIGKILLed again as training ends and
    stays down: the job still finishes, and what the driver had left (evaluation, model, the end
    of the run) is spooled beside the checkpoints with the command that replays it. Once the server
    is back, that command delivers it: every train/* key has one point per epoch, the evaluation
    is there, the model is logged and registered, the run is FINISHED."""
    import os
    import shlex

    from mlflow import MlflowClient

    epochs = 3
    storage = tmp_path / "runs"
    with mlflow_server(tmp_path / "mlflow") as server:
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "DKD_MLFLOW_CLOSE_TIMEOUT_S": "2",
               "RAY_DEDUP_LOGS": "0"}
        env.pop("RAY_ADDRESS", None)
        args = _student_args(tiny_cuhk, tiny_teacher, storage, 0, 1)
        args = [a for a in args if a not in ("--max-iters", "0")] + [
            "--set", f"student.epochs={epochs}", "--set", "train.checkpoint_every_iters=100",
            "--set", "eval.two_step=false"]
        job = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(job.stdout), daemon=True)
        reader.start()
        _wait_for(output, f"student epoch 1/{epochs} done", job)
        server.kill()
        _wait_for(output, f"student epoch 2/{epochs} done", job)
        server.start()
        _wait_for(output, f"student epoch {epochs}/{epochs} done", job)
        server.kill()
        returncode = job.wait(timeout=900)
        reader.join(timeout=10)
        log = "".join(output)
        assert returncode == 0, log[-6000:]
        assert "still pending" in log, log[-6000:]
        replays = sorted({line.split("answers with: ", 1)[1].strip() for line in output if "answers with: " in line})
        assert replays, log[-6000:]
        server.start()
        for command in replays:  # as the log says, with the live server's address
            done = subprocess.run([sys.executable, *shlex.split(command)[1:]], env=env,
                                  capture_output=True, text=True, timeout=300, cwd=ROOT)
            assert done.returncode == 0, done.stdout + done.stderr
        client = MlflowClient(server.uri, server.uri)  # never a registry another test left set
        experiment = client.get_experiment_by_name("dkd-ray/synthetic")
        (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'student-under-test'")
        train_keys = sorted(k for k in run.data.metrics if k.startswith("train/"))
        assert "train/loss_oim" in train_keys and "train/loss_kd_tri" in train_keys, train_keys
        for key in train_keys:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(1, epochs + 1)), (key, steps)
        assert [k for k in run.data.metrics if k.startswith("cuhk_sysu/") and k.endswith("/mAP")], run.data.metrics
        assert run.info.status == "FINISHED"
        assert len(run.outputs.model_outputs) == 1, "the model logged during the outage arrives, once"
        (version,) = client.search_model_versions(f"run_id = '{run.info.run_id}'")
        assert version.name.startswith("dkd-student-"), version  # registered by the replay, as the job would have


def test_a_killed_driver_is_marked_killed_and_resume_continues_its_mlflow_run(tiny_cuhk, tiny_teacher, tmp_path):
    """The job's driver and its local Ray die at once (SIGKILL to the process group, as when the
    driver's machine is lost) after iteration 3 or so: nothing could close its MLflow run then. The
    same command with --resume marks it KILLED on start, resumes from its newest checkpoint and
    finishes that same run: one FINISHED run, never a RUNNING one left behind."""
    import os
    import signal

    from mlflow import MlflowClient

    trace = tmp_path / "trace.txt"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "DKD_TRACE_FILE": str(trace)}
    env.pop("RAY_ADDRESS", None)
    args = _student_args(tiny_cuhk, tiny_teacher, tmp_path / "runs", 5, 1) + ["--set", "eval.two_step=false"]
    job = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(job.stdout), daemon=True).start()
    deadline = time.monotonic() + 600
    while job.poll() is None and time.monotonic() < deadline and \
            not (trace.exists() and len(trace.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    assert job.poll() is None, "".join(output)[-6000:]
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=60)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("dkd-ray/synthetic")
    lost = client.search_runs([experiment.experiment_id], "attributes.run_name = 'student-under-test'")
    assert [r.info.status for r in lost] == ["RUNNING"]  # what a lost driver leaves behind

    # The resumed job traces to its own file: a Ray worker orphaned by the kill may still finish
    # the step it was in, so the first job's trace is read only once the second has finished.
    resumed_trace = tmp_path / "resumed-trace.txt"
    resume = [a for a in args if a not in ("--run-name", "student-under-test")] + ["--resume", "student-under-test"]
    resumed = subprocess.run(resume, capture_output=True, text=True, timeout=600,
                             env={**env, "DKD_TRACE_FILE": str(resumed_trace)})
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-6000:]
    assert "its driver was lost" in log, log[-4000:]
    before, after = _lineage(trace), _lineage(resumed_trace)
    assert [i for i, _ in before] == list(range(1, len(before) + 1)), before
    resumed_from = after[0][0]  # after the newest checkpoint (every 2 iterations)
    assert resumed_from % 2 == 1 and resumed_from <= len(before) + 1, (before, after)
    assert [i for i, _ in after] == list(range(resumed_from, 6)), after
    replayed = before[resumed_from - 1:]  # iterations trained after that checkpoint
    assert replayed == after[:len(replayed)], (before, after)  # same batches again, none skipped

    runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'student-under-test'")
    assert [(r.info.run_id, r.info.status) for r in runs] == [(lost[0].info.run_id, "FINISHED")]
    assert "driver lost" in runs[0].data.tags.get("failure", "")  # the loss stays on record
