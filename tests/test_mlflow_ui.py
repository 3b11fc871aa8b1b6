"""Picking a model in the MLflow UI, in a real browser: a tiny pipeline (jobs/pipeline.py, local
Ray; killed in its student stage and continued with ``--resume``, which is tested here too) logs
into a real ``mlflow server`` on 127.0.0.1, and headless Chromium (Debian's package,
driven by Playwright) opens the pages a user opens. Assertions read the rendered pages; the
screenshots are kept in ``test-artifacts/mlflow-ui/`` (or ``$DKD_TEST_ARTIFACTS/mlflow-ui``)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.harness import mlflow_server
from tests.tiny import TINY_OVERRIDES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("DKD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = Path(os.environ.get("DKD_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "mlflow-ui"
RENDER_TIMEOUT_MS = 60_000  # the UI's first load compiles a large bundle; 2 busy cores are slow


@pytest.fixture(scope="module")
def resumed_pipeline(tiny_cuhk, tmp_path_factory):
    """One tiny pipeline (teacher, bank, student, evaluation, registry) against a real server,
    its driver SIGKILLed (with its local Ray) during the student stage and continued with
    ``--resume <stamp>``: the runs every test of this module reads."""
    import signal
    import threading
    import time

    root = tmp_path_factory.mktemp("ui")
    with mlflow_server(root / "mlflow") as server:
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "DKD_MLFLOW_CLOSE_TIMEOUT_S": "10"}
        env.pop("RAY_ADDRESS", None)
        env.pop("DKD_PIPELINE_ID", None)
        command = [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--data-root", str(tiny_cuhk),
                   "--num-workers", "1", "--max-iters", "2", "--storage-path", str(root / "runs"),
                   "--set", "train.checkpoint_every_iters=1"]
        for override in TINY_OVERRIDES:
            command += ["--set", override]
        first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 cwd=root, start_new_session=True)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True).start()
        deadline = time.monotonic() + 900
        while first.poll() is None and time.monotonic() < deadline and \
                not list((root / "runs").glob("student-*/student_e*_i0000001/MANIFEST.rank0.json")):
            time.sleep(0.1)  # killed right after the student's first checkpoint landed
        assert first.poll() is None, "".join(lines)[-6000:]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        stamp = next(p.name.removeprefix("teacher-") for p in (root / "runs").glob("teacher-*"))
        done = subprocess.run(command + ["--resume", stamp], env=env, capture_output=True, text=True, timeout=900,
                              cwd=root)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-6000:]
        from mlflow import MlflowClient

        client = MlflowClient(server.uri, server.uri)
        experiment = client.get_experiment_by_name("dkd-ray/synthetic")
        yield SimpleNamespace(server=server, output=done.stdout, log=output, stamp=stamp, client=client,
                              experiment=experiment, runs=client.search_runs([experiment.experiment_id]))


def test_a_pipeline_killed_in_its_student_stage_resumes_without_retraining_its_teacher(resumed_pipeline):
    p = resumed_pipeline
    assert f"teacher-{p.stamp} finished before" in p.output, p.log[-6000:]
    assert "continuing MLflow run" in p.log  # the student's run, recorded in its folder
    by_name = {}
    for run in p.runs:
        by_name.setdefault(run.info.run_name, []).append(run.info.status)
    assert by_name == {f"teacher-{p.stamp}": ["FINISHED"], f"student-{p.stamp}": ["FINISHED"]}, by_name
    assert [v.version for v in p.client.search_model_versions("name = 'dkd-teacher-synthetic'")] == ["1"]
    assert [v.version for v in p.client.search_model_versions("name = 'dkd-student-synthetic'")] == ["1"]
    assert "registered dkd-teacher-synthetic v1" in p.output and "registered dkd-student-synthetic v1" in p.output


@pytest.fixture(scope="module")
def pipeline(resumed_pipeline):
    """The resumed pipeline's runs, for the browser."""
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (`make test` installs Debian's package where it can)")
    p = resumed_pipeline
    runs = {run.info.run_name.split("-")[0]: run for run in p.runs}
    student_version = p.client.get_model_version("dkd-student-synthetic", "1")
    return SimpleNamespace(server=p.server, output=p.output, client=p.client, experiment=p.experiment, runs=runs,
                           student_version=student_version, head=student_version.tags["headline"])


@pytest.fixture(scope="module")
def browser(pipeline):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _open(browser, url: str, shot: str, *wait_for: str):
    """Open ``url`` in a fresh page (a new user: nothing in the browser's storage), wait until
    every text of ``wait_for`` is rendered (the UI polls, so the network never idles), screenshot
    it; returns the page."""
    # Wide: the runs table renders only the columns in view, and the assistant panel takes a third.
    page = browser.new_context(viewport={"width": 2400, "height": 1100}).new_page()
    page.set_default_timeout(RENDER_TIMEOUT_MS)
    page.goto(url)
    try:
        for text in wait_for:
            page.get_by_text(text, exact=False).first.wait_for()
        page.wait_for_timeout(1000)  # cells that load after the first rows (models, datasets)
    finally:  # what the page showed, also when it never showed the text
        page.screenshot(path=str(SHOTS / f"{shot}.png"), full_page=True)
    return page


def test_the_printed_link_opens_the_pipelines_runs_side_by_side(pipeline, browser):
    (link,) = re.findall(r"look at the runs: (http://\S+)", pipeline.output)
    student, teacher = pipeline.runs["student"].info.run_name, pipeline.runs["teacher"].info.run_name
    page = _open(browser, link, "1-pipeline-runs", student, teacher, "dkd-student-synthetic", "dkd-teacher-synthetic")
    text = page.inner_text("body")
    assert "Model training" in text and "Run Name" in text  # the training view, on the runs table
    assert teacher in text and student in text and "2 matching runs" in text
    head = pipeline.head  # the tiny data's largest gallery: cuhk_sysu/g10
    for column in (f"{head}/mAP", f"teacher_gt/{head}/mAP", "Dataset", "Models", "Source"):
        assert column in text, f"column {column} not shown"
    assert "dkd-student-synthetic" in text and "dkd-teacher-synthetic" in text  # each run's registered model
    assert "pipeline.py" in text  # the Source column
    assert text.count("synthetic (") >= 2  # the Dataset column: name (digest) for both runs


def test_the_experiment_opens_on_its_runs_with_its_description(pipeline, browser):
    experiment = pipeline.experiment
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    page = _open(browser, f"{pipeline.server.uri}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning",
                 "2-experiment", "Run Name")
    assert "/runs" in page.url
    assert "runs of dkd-ray" in page.inner_text("body")


def test_the_student_version_page_shows_metrics_teacher_lineage_and_description(pipeline, browser):
    head = pipeline.head
    page = _open(browser, f"{pipeline.server.uri}/#/models/dkd-student-synthetic/versions/1", "3-student-version",
                 f"headline protocol {head}", "models:/dkd-teacher-synthetic/1")
    text = page.inner_text("body")  # the description, rendered from Markdown, then the (paged) tags
    assert re.search(r"protocol\s+mAP\s+top-1", text), "the description's metrics table is not rendered"
    assert re.search(rf"{head}\s+[0-9.]+ %\s+[0-9.]+ %", text), "no headline row in the metrics table"
    assert "knowledge bank:" in text and "config digest:" in text and "config_digest" in text
    assert pipeline.runs["student"].info.run_name in text  # Source Run
    tags = pipeline.student_version.tags  # the full metric names, as the tag list holds them
    assert {f"{head}/mAP", f"{head}/top1", "det/ap", f"two_step/{head}/mAP"} <= set(tags)
    assert tags["teacher"] == "models:/dkd-teacher-synthetic/1" and tags["knowledge_bank"].endswith("/bank")
    (output,) = pipeline.client.get_run(pipeline.runs["student"].info.run_id).outputs.model_outputs
    logged = pipeline.client.get_logged_model(output.model_id)  # MLflow 3's logged model:
    assert logged.source_run_id == pipeline.runs["student"].info.run_id  # linked to its run,
    assert logged.experiment_id == pipeline.experiment.experiment_id  # in the run's experiment (not Default),
    assert {f"{head}/mAP", f"{head}/top1", "det/ap"} <= {m.key for m in logged.metrics}  # with its metrics
    aliases = pipeline.client.get_registered_model("dkd-student-synthetic").aliases
    assert ("latest-good" in text) == ("latest-good" in aliases)


def test_a_runs_description_links_to_its_pipelines_comparison(pipeline, browser):
    run = pipeline.runs["student"]
    page = _open(browser, f"{pipeline.server.uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
                 "?workflowType=machine_learning", "4-student-run", "teacher and student, side by side")
    assert "Logged models (1)" in page.inner_text("body") or "dkd-student-synthetic" in page.inner_text("body")
    href = page.get_by_text("teacher and student, side by side").first.get_attribute("href")
    assert href.startswith("#/experiments/"), href  # relative: it works behind any host name or proxy
    comparison = _open(browser, f"{pipeline.server.uri}/{href}", "5-comparison-from-run", "2 matching runs")
    assert pipeline.runs["teacher"].info.run_name in comparison.inner_text("body")
