"""The Tune sweep end to end (jobs/tune_distill.py on the smoke space, tiny synthetic data):
a real local Ray cluster, a real MLflow tracking server on 127.0.0.1, an S3-compatible server on
127.0.0.1 as the only storage, the driver killed (SIGKILL, with the Ray processes it started) in
the middle of the second trial, then --resume to the end. One sweep, several tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness import _descendants, mlflow_server
from tests.tiny import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "cpu_smoke.yaml"
NAME = "smoke"
EPOCHS = 2  # the smoke space's student.epochs
# The module's fixture runs a whole sweep on 2 CPU cores (a teacher, 4 trials, the champion's test)
# before the first test: about 10 minutes with the bucket on the S3 server.
pytestmark = pytest.mark.timeout(1500)


def _command(data_root: Path, storage: str, *extra: str) -> list[str]:
    overrides = [a for o in TINY_OVERRIDES + ["teacher.epochs=2"] for a in ("--set", o)]
    return [sys.executable, str(REPO / "jobs" / "tune_distill.py"), "--space", str(SPACE), "--data-root",
            str(data_root), "--storage-path", storage, "--max-concurrent", "1", *overrides, *extra]


def _start(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen, list[str]]:
    job = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                           start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True).start()
    return job, lines


def _kill_with_its_ray(job: subprocess.Popen) -> None:
    """SIGKILL the driver and every process below it (the local Ray it started): its machine is gone."""
    for pid in _descendants(job.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait(timeout=60)


@pytest.fixture(scope="module")
def sweep(tiny_cuhk, s3, tmp_path_factory):
    """Run the smoke sweep, kill it once a trial has finished and the next one is midway, resume
    it; yield what the tests read: the MLflow client, the sweep's URI and keys in the bucket, the
    outputs and the trials finished before the kill."""
    from mlflow import MlflowClient

    from dkd_ray.train.checkpoint import manifest_name

    root = tmp_path_factory.mktemp("sweep")
    storage = s3.create_bucket("sweeps") + "/runs"
    sweep_uri = f"{storage}/{NAME}"
    with mlflow_server(root / "mlflow") as server:
        env = {**os.environ, **s3.env, "MLFLOW_TRACKING_URI": server.uri, "DKD_CACHE_DIR": str(root / "cache")}
        env.pop("RAY_ADDRESS", None)
        job, lines = _start(_command(tiny_cuhk, storage, "--name", NAME), env, root)
        deadline = time.monotonic() + 900

        def second_trial_is_midway() -> bool:  # trial 1 finished, trial 2 has checkpointed epoch 1
            # (one trial at a time: --max-concurrent 1)
            if not any("completed after" in x for x in lines):
                return False
            midway = {k.split("/trials/")[1].split("/")[0] for k in s3.keys(f"{sweep_uri}/trials")
                      if "/student_e001_" in k and k.endswith("/" + manifest_name(0))}
            return len(midway) >= 2

        while job.poll() is None and time.monotonic() < deadline and not second_trial_is_midway():
            time.sleep(1.0)
        assert job.poll() is None, "".join(lines)[-6000:]
        _kill_with_its_ray(job)
        first = "".join(lines)
        finished_before = set(storage_json(f"{sweep_uri}/trial_runs.json"))
        client = MlflowClient(server.uri, server.uri)  # the registry too: earlier tests set a process-wide one
        done_before = {r.data.tags["trial_id"] for r in _children(client, sweep_uri)
                       if r.info.status in ("FINISHED", "KILLED")}

        job, lines = _start(_command(tiny_cuhk, storage, "--resume", NAME), env, root)
        second_code = job.wait(timeout=1200)
        second = "".join(lines)
        yield {"client": client, "sweep_uri": sweep_uri, "keys": s3.keys(sweep_uri), "root": root,
               "first": first, "second": second, "second_code": second_code,
               "started_before": finished_before, "done_before": done_before}


def storage_json(uri: str) -> dict:
    from dkd_ray import storage

    return storage.read_json(uri) or {}


def _sweep_state(sweep_uri: str) -> dict:
    return storage_json(f"{sweep_uri}/sweep.json")


def _children(client, sweep_uri: str):
    state = _sweep_state(sweep_uri)
    experiment = client.get_experiment_by_name(state["experiment"])
    return client.search_runs([experiment.experiment_id],
                              f"tags.mlflow.parentRunId = '{state['parent_run_id']}' and tags.job = 'tune_trial'")


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep):
    assert "--resume smoke" in sweep["first"]  # said at the start: a killed driver says nothing at the end
    assert sweep["second_code"] == 0, sweep["second"][-8000:]
    assert sweep["done_before"], "the interruption came after a trial had finished"
    starts = storage_json(f"{sweep['sweep_uri']}/trial_runs.json")
    assert len(starts) == 4
    for trial_id in sweep["done_before"]:
        assert starts[trial_id]["starts"] == 1, f"finished trial {trial_id} was run again: {starts}"
    assert set(starts) - sweep["done_before"], "the resumed sweep ran the trials left over"
    assert any(s["starts"] == 2 for s in starts.values()), f"the interrupted trial continued: {starts}"
    client = sweep["client"]
    for run in _children(client, sweep["sweep_uri"]):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/mAP")]
        assert steps == list(range(1, len(steps) + 1)), f"epochs repeated or skipped in {run.data.tags['trial_id']}"


def test_asha_stops_a_weak_trial_before_its_last_epoch(sweep):
    runs = _children(sweep["client"], sweep["sweep_uri"])
    assert len(runs) == 4
    stopped = [r for r in runs if r.data.tags.get("stopped_early") == "true"]
    assert stopped, {r.data.tags["trial_id"]: r.data.tags.get("status") for r in runs}
    for run in stopped:
        assert int(run.data.tags["epochs"]) < EPOCHS and run.info.status == "KILLED"
    finished = [r for r in runs if r.data.tags.get("status") == "finished"]
    assert finished and all(int(r.data.tags["epochs"]) == EPOCHS for r in finished)
    from dkd_ray import storage

    csv = storage.read_bytes(f"{sweep['sweep_uri']}/summary/trials.csv").decode()
    assert "stopped early" in csv and csv.count("\n") == 5


def test_parent_and_child_runs_and_the_champion_alias(sweep):
    client, sweep_uri = sweep["client"], sweep["sweep_uri"]
    state = _sweep_state(sweep_uri)
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == NAME
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/trials.md", "summary/trials.csv", "summary/metric_vs_params.png"} <= artifacts
    runs = _children(client, sweep_uri)
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
    uri, keys = sweep["sweep_uri"], sweep["keys"]
    state = _sweep_state(uri)
    banks = {k.rsplit("/", 1)[0] for k in keys if "/bank/part-" in k and k.endswith(".parquet")}
    assert banks == {state["bank_path"].removeprefix("s3://")}, banks
    assert state["bank_path"].startswith(f"{uri}/teacher-{NAME}/")
    assert not [k for k in keys if "/trials/" in k and "/bank/" in k], "trials must not build banks"
    assert len({k.split("/teacher-")[1].split("/")[0] for k in keys if "/teacher-" in k}) == 1


def test_the_sweep_lives_in_the_bucket_and_its_champion_is_registered_once(sweep):
    keys, client = sweep["keys"], sweep["client"]
    for name in ("sweep.json", "trial_runs.json", "scheduler.pkl", "summary/trials.csv"):
        assert any(k.endswith(f"/{NAME}/{name}") for k in keys), name
    assert any("/tune/" in k for k in keys), "Tune's experiment state is not in the bucket"
    assert not (sweep["root"] / "runs").exists(), "a local storage folder was written"
    versions = client.search_model_versions("name = 'dkd-student-synthetic'")
    assert len(versions) == 1, [(v.version, v.run_id) for v in versions]
