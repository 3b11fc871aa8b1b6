"""The Tune sweep end to end (jobs/tune_distill.py on the smoke space, tiny synthetic data):
a real local Ray cluster, a real MLflow tracking server on 127.0.0.1, an interruption (SIGINT,
as Ctrl-C) in the middle of the second trial, then --resume to the end. One sweep, several tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness import mlflow_server
from tests.tiny import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "cpu_smoke.yaml"
NAME = "smoke"
EPOCHS = 2  # the smoke space's student.epochs


def _command(data_root: Path, storage: Path, *extra: str) -> list[str]:
    overrides = [a for o in TINY_OVERRIDES + ["teacher.epochs=2"] for a in ("--set", o)]
    return [sys.executable, str(REPO / "jobs" / "tune_distill.py"), "--space", str(SPACE), "--data-root",
            str(data_root), "--storage-path", str(storage), "--max-concurrent", "1", *overrides, *extra]


def _start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    job = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                           start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True).start()
    return job, lines


@pytest.fixture(scope="module")
def sweep(tiny_cuhk, tmp_path_factory):
    """Run the smoke sweep, interrupt it once a trial has finished, resume it; yield what the
    tests read: the MLflow client, the storage folder, the outputs and the trials finished
    before the interruption."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("sweep")
    storage = root / "runs"
    with mlflow_server(root / "mlflow") as server:
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
        env.pop("RAY_ADDRESS", None)
        job, lines = _start(_command(tiny_cuhk, storage, "--name", NAME), env)
        deadline = time.monotonic() + 900
        trials = storage / NAME / "trials"

        def second_trial_is_midway() -> bool:  # trial 1 finished, trial 2 has checkpointed epoch 1
            # (one trial at a time: --max-concurrent 1)
            return any("completed after" in x for x in lines) and len(list(trials.glob("*/student_e001_*"))) >= 2

        while job.poll() is None and time.monotonic() < deadline and not second_trial_is_midway():
            time.sleep(0.5)
        assert job.poll() is None, "".join(lines)[-6000:]
        job.send_signal(signal.SIGINT)  # Ctrl-C: Tune stops and saves the experiment's state
        first_code = job.wait(timeout=300)
        first = "".join(lines)
        finished_before = set(json.loads((storage / NAME / "trial_runs.json").read_text()))
        client = MlflowClient(server.uri, server.uri)  # the registry too: earlier tests set a process-wide one
        done_before = {r.data.tags["trial_id"] for r in _children(client, storage)
                       if r.info.status in ("FINISHED", "KILLED")}

        job, lines = _start(_command(tiny_cuhk, storage, "--resume", NAME), env)
        second_code = job.wait(timeout=1200)
        second = "".join(lines)
        yield {"client": client, "storage": storage, "first": first, "first_code": first_code, "second": second,
               "second_code": second_code, "started_before": finished_before, "done_before": done_before}


def _sweep_state(storage: Path) -> dict:
    return json.loads((storage / NAME / "sweep.json").read_text())


def _children(client, storage: Path):
    state = _sweep_state(storage)
    experiment = client.get_experiment_by_name(state["experiment"])
    return client.search_runs([experiment.experiment_id],
                              f"tags.mlflow.parentRunId = '{state['parent_run_id']}' and tags.job = 'tune_trial'")


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep):
    assert sweep["first_code"] == 130, sweep["first"][-6000:]
    assert "--resume smoke" in sweep["first"]
    assert sweep["second_code"] == 0, sweep["second"][-8000:]
    assert sweep["done_before"], "the interruption came after a trial had finished"
    starts = json.loads((sweep["storage"] / NAME / "trial_runs.json").read_text())
    assert len(starts) == 4
    for trial_id in sweep["done_before"]:
        assert starts[trial_id]["starts"] == 1, f"finished trial {trial_id} was run again: {starts}"
    assert set(starts) - sweep["done_before"], "the resumed sweep ran the trials left over"
    assert any(s["starts"] == 2 for s in starts.values()), f"the interrupted trial continued: {starts}"
    client = sweep["client"]
    for run in _children(client, sweep["storage"]):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/mAP")]
        assert steps == list(range(1, len(steps) + 1)), f"epochs repeated or skipped in {run.data.tags['trial_id']}"


def test_asha_stops_a_weak_trial_before_its_last_epoch(sweep):
    runs = _children(sweep["client"], sweep["storage"])
    assert len(runs) == 4
    stopped = [r for r in runs if r.data.tags.get("stopped_early") == "true"]
    assert stopped, {r.data.tags["trial_id"]: r.data.tags.get("status") for r in runs}
    for run in stopped:
        assert int(run.data.tags["epochs"]) < EPOCHS and run.info.status == "KILLED"
    finished = [r for r in runs if r.data.tags.get("status") == "finished"]
    assert finished and all(int(r.data.tags["epochs"]) == EPOCHS for r in finished)
    csv = (sweep["storage"] / NAME / "summary" / "trials.csv").read_text()
    assert "stopped early" in csv and csv.count("\n") == 5


def test_parent_and_child_runs_and_the_champion_alias(sweep):
    client, storage = sweep["client"], sweep["storage"]
    state = _sweep_state(storage)
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == NAME
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/trials.md", "summary/trials.csv", "summary/metric_vs_params.png"} <= artifacts
    runs = _children(client, storage)
    for run in runs:  # per-epoch validation metrics and the swept values
        assert "distill.prob_weight" in run.data.params and "distill.tri_weight" in run.data.params
        assert len(client.get_metric_history(run.info.run_id, "val/mAP")) == int(run.data.tags["epochs"])
    finished = [r for r in runs if r.data.tags["status"] == "finished"]
    best = min(finished, key=lambda r: (-r.data.metrics["val/mAP"], r.data.tags["trial_id"]))  # ties: lower id
    registered = client.search_model_versions("name = 'dkd-student-synthetic'")
    assert registered, sweep["second"][-8000:]
    champion = client.get_model_version_by_alias("dkd-student-synthetic", "champion")
    assert champion.run_id == best.info.run_id
    assert champion.run_id == parent.data.tags["champion_run_id"]
    tested = client.get_run(champion.run_id).data.metrics
    assert "cuhk_sysu/full/mAP" in tested and "det/ap" in tested, sorted(tested)  # the test protocol, once
    assert "champion/cuhk_sysu/full/mAP" in parent.data.metrics


def test_one_teacher_and_one_knowledge_bank_serve_every_trial(sweep):
    storage = sweep["storage"] / NAME
    state = _sweep_state(sweep["storage"])
    banks = {p.parent for p in storage.rglob("bank/part-*.parquet")}
    assert banks == {Path(state["bank_path"])}, banks
    assert Path(state["bank_path"]).is_relative_to(storage / f"teacher-{NAME}")
    assert not list((storage / "trials").rglob("bank")), "trials must not build banks"
    assert len(list(storage.glob("teacher-*"))) == 1
