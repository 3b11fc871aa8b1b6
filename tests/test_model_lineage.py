"""What the MLflow UI shows to someone picking a model: training experiments with a description,
runs with their source and dataset, registered versions with full metric names, their teacher
as a registry URI, a description and the ``latest-good`` alias (a local SQLite store)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from urllib.parse import parse_qs

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from dkd_ray import tracking
from dkd_ray.config import preset
from dkd_ray.tracking import LATEST_GOOD_ALIAS, NOTE_TAG, Tracker
from dkd_ray.tracking.lineage import (CHECKPOINT_TAG, dataset_profile, pipeline_view, teacher_model_uri,
                                     version_description)
from dkd_ray.tracking.naming import EXPERIMENT_KIND_TAG, SHARED_VIEW_TAG, TRAINING_KIND


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _model_and_example():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3)), np.zeros((2, 4), dtype=np.float32)


def test_a_new_experiment_is_a_training_experiment_with_a_description(store):
    with Tracker("synthetic", "train_student", uri=store, experiment="dkd-ray/lineage") as tracker:
        tracker.log_metrics({"loss": 1.0})
    experiment = MlflowClient(store).get_experiment_by_name("dkd-ray/lineage")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    assert "student-" in experiment.tags[NOTE_TAG] and "pipeline_id" in experiment.tags[NOTE_TAG]
    assert tracker.experiment_id == experiment.experiment_id


def test_an_older_experiment_without_a_kind_gets_one_and_keeps_its_description(store):
    client = MlflowClient(store)
    experiment_id = client.create_experiment("dkd-ray/old", tags={NOTE_TAG: "mine"})
    with Tracker("synthetic", "train_teacher", uri=store, experiment="dkd-ray/old"):
        pass
    tags = client.get_experiment(experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND and tags[NOTE_TAG] == "mine"


def test_a_run_records_its_source_and_its_dataset_input(store):
    with Tracker("synthetic", "train_student", uri=store, run_name="student-x") as tracker:
        tracker.log_dataset("synthetic-tiny", "/data/CUHK-SYSU", "ab" * 32, {"train_images": 12, "queries": 3})
        tracker.set_description("the student")
    run = MlflowClient(store).get_run(tracker.run_id)
    assert run.data.tags["mlflow.source.type"] == "JOB" and run.data.tags["mlflow.source.name"].endswith(".py")
    assert run.data.tags[NOTE_TAG] == "the student"
    commit = tracking.naming.project_commit()
    if commit:  # a git checkout: the commit is the Source column's version
        assert run.data.tags["mlflow.source.git.commit"] == commit
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "synthetic-tiny"
    assert json.loads(dataset_input.dataset.source) == {"uri": "/data/CUHK-SYSU"}
    assert json.loads(dataset_input.dataset.profile) == {"queries": 3, "train_images": 12}
    assert dataset_input.dataset.digest == ("ab" * 32)[:36]


def test_a_dataset_logged_while_the_server_is_away_does_not_block_the_spool(tmp_path):
    tracker = Tracker("synthetic", "train_student", uri="http://127.0.0.1:9", checkpoint_dir=str(tmp_path),
                      close_timeout_s=0)
    tracker.log_dataset("synthetic-tiny", "/data", "cd" * 32, {"queries": 1})
    tracker.log_params({"lr": 0.1})
    assert tracker.pending()["inputs"] == 1
    spool = tracker.close()
    assert spool is not None and spool.exists()  # the params went to the spool
    assert tracker.pending() == {"params": 0, "tags": 0, "metrics": 0, "artifacts": 0, "inputs": 0, "models": 0,
                                 "end": 0}


def test_version_tags_carry_full_metric_names_and_the_headline():
    cfg = preset("cpu-small")
    tags = tracking.version_tags(cfg, {"cuhk_sysu/g100/mAP": 0.41234, "cuhk_sysu/g100/top1": 0.5, "det/ap": 0.7,
                                       "cuhk_sysu/g50/mAP": float("nan")}, "cuhk_sysu/g100")
    assert tags["mAP"] == "0.4123" and tags["top1"] == "0.5000" and tags["headline"] == "cuhk_sysu/g100"
    assert tags["cuhk_sysu/g100/mAP"] == "0.4123" and tags["det/ap"] == "0.7000"
    assert tags["cuhk_sysu/g50/mAP"] == "nan"


def test_latest_good_moves_only_to_versions_whose_metrics_are_all_finite(store):
    cfg = preset("cpu-small")
    model, example = _model_and_example()
    name = "dkd-student-lineage"
    versions = []
    for metrics in ({"cuhk_sysu/g100/mAP": 0.3, "det/ap": 0.6},  # good
                    {"cuhk_sysu/g100/mAP": 0.4, "det/ap": float("nan")},  # registered (finite headline), not good
                    ):
        with Tracker("synthetic", "train_student", uri=store) as tracker:
            info = tracker.log_model(model, "model", example, registered_name=name,
                                     version_tags=tracking.version_tags(cfg, metrics, "cuhk_sysu/g100"),
                                     description=version_description("student", metrics, "cuhk_sysu/g100", {}))
        versions.append(info.registered_model_version)
    client = MlflowClient(store, store)
    assert [str(v) for v in versions] == ["1", "2"]
    assert str(client.get_model_version_by_alias(name, LATEST_GOOD_ALIAS).version) == "1"
    second = client.get_model_version(name, "2")
    assert "| **cuhk_sysu/g100** | 40.0 % |" in second.description and "ap nan" in second.description


def test_version_description_is_a_markdown_table_headline_first():
    text = version_description("student", {"cuhk_sysu/g50/mAP": 0.5, "cuhk_sysu/g50/top1": 0.6,
                                           "cuhk_sysu/g100/mAP": 0.41, "cuhk_sysu/g100/top1": 0.42,
                                           "det/ap": 0.8, "det/recall": 0.9},
                               "cuhk_sysu/g100", {"teacher": "models:/dkd-teacher-synthetic/1", "knowledge bank": None})
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0] == "| protocol | mAP | top-1 |"
    assert rows[2] == "| **cuhk_sysu/g100** | 41.0 % | 42.0 % |" and rows[3] == "| cuhk_sysu/g50 | 50.0 % | 60.0 % |"
    assert "Detection: ap 80.0 %, recall 90.0 %." in text
    assert "- teacher: `models:/dkd-teacher-synthetic/1`" in text and "knowledge bank" not in text


def test_a_teacher_checkpoint_is_named_by_its_registered_version(store, tmp_path):
    cfg = preset("cpu-small")
    model, example = _model_and_example()
    checkpoint = tmp_path / "teacher_e001"
    checkpoint.mkdir()
    with Tracker("synthetic", "train_teacher", uri=store) as tracker:
        tracker.log_model(model, "model", example, registered_name="dkd-teacher-synthetic",
                          version_tags={**tracking.version_tags(cfg, {"mAP": 0.7}), CHECKPOINT_TAG: str(checkpoint)})
    assert teacher_model_uri(str(checkpoint), "synthetic", store) == "models:/dkd-teacher-synthetic/1"
    assert teacher_model_uri("models:/dkd-teacher-synthetic@champion", "synthetic", store) == \
        "models:/dkd-teacher-synthetic@champion"
    other = tmp_path / "never_registered"
    assert teacher_model_uri(str(other), "synthetic", store) == str(other)


def test_a_saved_view_is_an_experiment_tag_the_link_opens(store):
    with Tracker("synthetic", "train_student", uri=store) as tracker:
        link = pipeline_view(tracker, "p-1", "cuhk_sysu/g100")
    path, query = link.split("?", 1)
    assert path == f"#/experiments/{tracker.experiment_id}/runs"
    assert {k: v[0] for k, v in parse_qs(query).items()} == {"workflowType": "machine_learning",
                                                             "viewStateShareKey": "pipeline-p-1"}
    view = json.loads(MlflowClient(store).get_experiment(tracker.experiment_id).tags[SHARED_VIEW_TAG + "pipeline-p-1"])
    assert view["searchFilter"] == "tags.pipeline_id = 'p-1'"
    assert view["orderByKey"] == "metrics.`cuhk_sysu/g100/mAP`" and view["orderByAsc"] is False
    assert view["selectedColumns"][:3] == ["attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`"]
    assert "metrics.`teacher_gt/cuhk_sysu/g100/mAP`" in view["selectedColumns"]
    assert pipeline_view(tracker, None, "cuhk_sysu/g100") is None  # a run outside a pipeline: no view


def test_dataset_profile_counts_the_splits():
    images = SimpleNamespace(box_offsets=np.array([0, 2, 3, 6]), indices=lambda split: np.array(
        [0, 2] if split == "train" else [1]))
    annotations = SimpleNamespace(images=images, num_train_ids=4, queries=[0, 1])
    assert dataset_profile(annotations) == {"train_images": 2, "train_boxes": 5, "train_identities": 4,
                                            "test_images": 1, "queries": 2}


def test_a_dataset_input_the_server_refuses_is_dropped_and_the_run_still_ends(store, monkeypatch, tmp_path):
    from mlflow.exceptions import MlflowException

    monkeypatch.setattr(MlflowClient, "log_inputs", lambda *a, **k: (_ for _ in ()).throw(
        MlflowException("INTERNAL_ERROR: no dataset tables")))  # a 5xx that is not an outage
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with Tracker("synthetic", "train_student", uri=store) as tracker:
        tracker.log_dataset("synthetic", "/data", "ef" * 32, {"queries": 1})
        tracker.log_artifact(notes)
        tracker.log_metrics({"loss": 0.5})
    run = MlflowClient(store).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 0.5
    assert [a.path for a in MlflowClient(store).list_artifacts(tracker.run_id)] == ["notes.txt"]
    assert tracker.pending()["inputs"] == 0 and not tracker._offline


def test_logging_a_model_leaves_the_process_active_experiment_as_it_was(store, monkeypatch):
    import mlflow
    from mlflow.tracking import fluent

    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    model, example = _model_and_example()
    with Tracker("synthetic", "train_student", uri=store, experiment="dkd-ray/elsewhere") as tracker:
        info = tracker.log_model(model, "model", example)
    assert mlflow.get_logged_model(info.model_id).experiment_id == tracker.experiment_id  # the run's experiment
    assert fluent._active_experiment_id is None and "MLFLOW_EXPERIMENT_ID" not in __import__("os").environ
