"""The pipeline's stages as the jobs' drivers run them: train on Ray, then track in MLflow.

Each stage opens one MLflow run (grouped by ``pipeline_id``), runs a training loop on Ray Train
workers (``dkd_ray.train.runner.fit``), and then, on the driver, logs the final metrics, the
evaluation files and the model, and registers the model as ``dkd-<role>-<dataset>``.
If MLflow is unreachable the stage still finishes and its checkpoints stay in the storage path.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dkd_ray.config import Config
from dkd_ray.eval.pipeline import HEADLINE, headline_prefix

log = logging.getLogger(__name__)

@dataclass
class StageResult:
    role: str
    checkpoint: str  # the final checkpoint as every node reads it: a folder, or its object-store URI
    metrics: dict[str, float]
    run_id: str | None = None
    model_uri: str | None = None
    registered_version: str | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def bank_path(self) -> str:
        from dkd_ray import storage
        from dkd_ray.train.teacher_finish import BANK_DIR

        return storage.join(self.checkpoint, BANK_DIR)


def _layout(cfg: Config) -> str:
    from dkd_ray.train.workdata import dataset_layout

    return dataset_layout(cfg)


def final_checkpoint(result, storage_path: str | Path) -> str:
    """The run's final checkpoint as a reference every node can read: its folder on a local or
    shared disk, or its URI on object storage, in the form of ``storage_path`` (never a copy on
    the driver's disk)."""
    from dkd_ray import storage

    if result.checkpoint is None:
        raise RuntimeError(f"the Ray Train run ended without a checkpoint: {result.error!r}")
    return storage.uri_of(str(storage_path), result.checkpoint.path)


def finished_stage(role: str, storage_path: str, run_name: str) -> StageResult | None:
    """The result of stage ``run_name`` when its run folder records it finished (the job ended it
    FINISHED): its newest complete checkpoint and its MLflow run's metrics (empty when MLflow is
    away). None for a stage never started or interrupted: that one is trained (resumed) again."""
    from dkd_ray import storage
    from dkd_ray.tracking.run_record import read_record
    from dkd_ray.train.session import newest_complete_checkpoint, newest_complete_checkpoint_uri

    record = read_record(storage_path, run_name) or {}
    if record.get("state") != "finished":
        return None
    folder = storage.join(storage.absolute(storage_path), run_name)
    checkpoint = (newest_complete_checkpoint_uri(folder) if storage.is_remote(folder)
                  else newest_complete_checkpoint(Path(folder)))
    if checkpoint is None:
        log.warning("%s is recorded finished but has no complete checkpoint: it is trained again", run_name)
        return None
    result = StageResult(role, str(checkpoint), {}, run_id=record.get("run_id"))
    if result.run_id:
        try:
            from mlflow import MlflowClient

            client = MlflowClient()
            result.metrics = dict(client.get_run(result.run_id).data.metrics)
            versions = client.search_model_versions(f"run_id = '{result.run_id}'")
            result.registered_version = max((v.version for v in versions), key=int, default=None)
        except Exception as error:  # noqa: BLE001 - the table is a courtesy; the checkpoint is what counts
            log.warning("metrics of %s not read from MLflow (%s)", run_name, error)
    return result


def evaluation_output(storage_path: str, run_name: str, given: str = "") -> Path:
    """Where a job writes its evaluation files: ``given``, else ``<storage>/<run>/evaluation`` on
    a local or shared disk; with object storage a scratch folder that ``publish_evaluation``
    copies to ``<storage>/<run>/evaluation`` (the files also go to MLflow)."""
    from dkd_ray import storage

    if given:
        return Path(given)
    if storage.is_remote(storage_path):
        import tempfile

        return Path(tempfile.mkdtemp(prefix=f"dkd-{run_name}-evaluation-"))
    return Path(storage_path) / run_name / "evaluation"


def publish_evaluation(output: Path, storage_path: str, run_name: str, given: str = "") -> str:
    """Where the evaluation files of ``evaluation_output`` are for users: uploaded when scratch."""
    from dkd_ray import storage

    if given or not storage.is_remote(storage_path):
        return str(output)
    import shutil

    uri = storage.join(storage_path, run_name, "evaluation")
    storage.upload_dir(output, uri)
    shutil.rmtree(output, ignore_errors=True)  # the scratch copy: the files are in storage and MLflow
    return uri


def worker_teacher_ref(ref: str) -> str:
    """``ref`` as a Ray worker can load it: a local path made absolute (workers run in another
    folder); MLflow URIs and run ids unchanged (the loop config carries the driver's MLflow URI)."""
    local = Path(ref).expanduser() if ref else None
    return str(local.resolve()) if local is not None and local.exists() else ref


def _tracker(cfg: Config, job: str, experiment: str, run_name: str, storage_path, parent_run_id: str | None = None,
             data_root: Path | None = None):
    """The stage's MLflow run: the one recorded in the run folder when the job continues a run
    (``--resume`` after a lost driver: one run, not two), else a new one; recorded there now.
    Described (what it is, a link to its pipeline's runs) and given its dataset input."""
    import os

    from dkd_ray import storage
    from dkd_ray.tracking import PIPELINE_ENV, Tracker
    from dkd_ray.tracking.run_record import claim, read_record

    record = read_record(storage_path, run_name) or {}
    tracker = Tracker(cfg.data.dataset, job, experiment=experiment, run_name=run_name,
                      run_id=record.get("run_id") or None, pipeline_id=record.get("pipeline_id"),
                      tags={"preset": cfg.preset}, parent_run_id=parent_run_id, owns_run=True,
                      checkpoint_dir=None if storage.is_remote(storage_path) else str(Path(storage_path) / run_name))
    tracker.start()
    if record.get("run_id"):
        log.info("%s: continuing MLflow run %s (recorded in the run folder)", run_name, record["run_id"])
    tracker.log_config(cfg)
    pipeline_id = record.get("pipeline_id") or os.environ.get(PIPELINE_ENV)
    claim(storage_path, run_name, run_id=tracker.run_id, uri=tracker.uri, experiment=tracker.experiment,
          pipeline_id=pipeline_id)
    _describe_run(tracker, cfg, job, pipeline_id, data_root)
    return tracker


def _describe_run(tracker, cfg: Config, job: str, pipeline_id: str | None, data_root: Path | None) -> None:
    """The run's dataset input, its description and its pipeline's saved comparison view (with
    the headline protocol this dataset has: gallery 100 on CUHK-SYSU, else its largest)."""
    from dkd_ray import storage
    from dkd_ray.data import load_annotations
    from dkd_ray.tracking.lineage import log_dataset, pipeline_description, pipeline_view

    layout, annotations = _layout(cfg), None
    if data_root is not None:
        try:
            annotations = load_annotations(layout, data_root, box_rule=cfg.data.box_rule)
        except Exception as error:  # noqa: BLE001 - the workers report a bad dataset with its file
            log.warning("dataset input not logged: %s", error)
    protocols = [f"{layout}/g{size}/mAP" for size in (annotations.galleries if annotations else ())]
    head = headline_prefix(dict.fromkeys(protocols or [f"{HEADLINE.get(layout, layout)}/mAP"], 0.0), layout)
    link = pipeline_view(tracker, pipeline_id, head)
    tracker.set_description(pipeline_description(job.removeprefix("train_"), pipeline_id, link))
    if annotations is not None:
        log_dataset(tracker, cfg, annotations, storage.absolute(str(data_root)))


@contextmanager
def _closing(tracker, storage_path, run_name: str):
    """End the stage's MLflow run with the stage: FINISHED, or FAILED/KILLED with the reason
    (a failed run must never look like one still running, nor be registered)."""
    from dkd_ray.tracking.run_record import write_record

    try:
        yield tracker
    except BaseException as error:
        status = "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"
        tracker.set_tags({"failure": f"{type(error).__name__}: {error}"[:4000]})
        tracker.end(status)
        write_record(storage_path, run_name, state=status.lower())
        raise
    tracker.close()  # sends what is pending; what cannot be sent is spooled beside the checkpoints
    write_record(storage_path, run_name, state="finished")


def _mlflow_settings(tracker, cfg: Config, job: str) -> dict[str, Any]:
    return {"uri": tracker.uri, "run_id": tracker.run_id, "dataset": cfg.data.dataset, "job": job,
            "experiment": tracker.experiment}


def train_teacher_stage(cfg: Config, data_root: Path, *, storage_path: str | Path, experiment: str,
                        run_name: str, parent_run_id: str | None = None, register: bool = True) -> StageResult:
    """Train the teacher, evaluate it on ground truth, build the bank, log and (unless
    ``register`` is False) register it."""
    from dkd_ray.train.runner import fit
    from dkd_ray.train.teacher_loop import train_teacher

    tracker = _tracker(cfg, "train_teacher", experiment, run_name, storage_path, parent_run_id, data_root)
    with _closing(tracker, storage_path, run_name):
        loop_config = {"config": cfg.to_dict(), "data_root": str(data_root), "run_name": run_name,
                       "mlflow": _mlflow_settings(tracker, cfg, "train_teacher")}
        result = fit(train_teacher, loop_config, cfg, name=run_name, storage_path=storage_path)
        checkpoint = final_checkpoint(result, storage_path)
        metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
        stage = StageResult("teacher", checkpoint, metrics, run_id=tracker.run_id)
        tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith(("teacher_gt/", "val/"))})
        tracker.set_tags({"checkpoint": str(checkpoint), "knowledge_bank": str(stage.bank_path)})
        if register:
            log_teacher_model(stage, cfg, tracker, {k.removeprefix("teacher_gt/"): v for k, v in metrics.items()},
                              bank_path=stage.bank_path)
    return stage


def log_teacher_model(stage: StageResult, cfg: Config, tracker, test_metrics: dict[str, float], *,
                      bank_path: str | None = None, alias: str | None = None) -> None:
    """Log the teacher of ``stage.checkpoint`` in ``tracker``'s run and register it as
    ``dkd-teacher-<dataset>``, tagged with its test mAP/top-1 (two-step on ground truth)."""
    from dkd_ray.models.loading import load_model
    from dkd_ray.tracking import registered_model_name, version_tags
    from dkd_ray.tracking.lineage import CHECKPOINT_TAG, version_description
    from dkd_ray.train.state import run_fingerprint

    teacher = load_model(stage.checkpoint, role="teacher")
    head = headline_prefix(test_metrics, _layout(cfg))
    tags = version_tags(cfg, test_metrics, head)
    lineage = {"knowledge bank": str(bank_path) if bank_path is not None else None,
               "checkpoint": str(stage.checkpoint), "MLflow run": tracker.run_id,
               "config digest": run_fingerprint(cfg, "teacher")}
    tags.update({CHECKPOINT_TAG: str(stage.checkpoint), "config_digest": lineage["config digest"]})
    if bank_path is not None:
        tags["knowledge_bank"] = str(bank_path)
    example = np.random.default_rng(0).random((1, 3, cfg.teacher.input_height, cfg.teacher.input_width), dtype=np.float32)
    info = tracker.log_model(teacher, "model", example, config=teacher.spec, alias=alias,
                             checkpoint=str(stage.checkpoint),
                             registered_name=registered_model_name("teacher", cfg.data.dataset), version_tags=tags,
                             description=version_description("teacher", test_metrics, head, lineage))
    if info is not None:
        stage.model_uri, stage.registered_version = info.model_uri, getattr(info, "registered_model_version", None)


def resolve_bank(cfg: Config, teacher_ref: str, data_root: Path, *, storage_path: str | Path,
                 run_name: str) -> str:
    """The knowledge bank of ``teacher_ref``: its registered version's ``knowledge_bank`` tag or
    its checkpoint's ``bank/`` when it exists (a folder or an object-store URI), else built now
    on the cluster (sharded)."""
    from dkd_ray import storage
    from dkd_ray.train.teacher_finish import BANK_DIR

    if storage.is_remote(teacher_ref) or Path(teacher_ref).expanduser().exists():  # a checkpoint, not MLflow
        bank = storage.join(storage.absolute(teacher_ref), BANK_DIR)
        if storage.is_dir(bank):
            return bank
    if teacher_ref.startswith("models:/"):
        bank = registered_version_tags(teacher_ref).get("knowledge_bank")
        if bank and storage.is_dir(bank):
            return bank
    from dkd_ray.tracking import tracking_uri
    from dkd_ray.train.bank_loop import build_bank
    from dkd_ray.train.runner import fit

    log.info("no knowledge bank recorded for %s: building it on the cluster", teacher_ref)
    # tracking_uri: a models:/ URI or run id resolves on the workers against the driver's MLflow.
    result = fit(build_bank, {"config": cfg.to_dict(), "data_root": str(data_root),
                              "teacher_ref": worker_teacher_ref(teacher_ref), "tracking_uri": tracking_uri()},
                 cfg, name=f"{run_name}-bank", storage_path=storage_path)
    return storage.join(final_checkpoint(result, storage_path), BANK_DIR)


def train_student_stage(cfg: Config, data_root: Path, *, teacher_ref: str, bank_path: str | None,
                        storage_path: str | Path, experiment: str, run_name: str,
                        output_dir: Path) -> StageResult:
    """Train the distilled student on Ray, evaluate it (full protocol, two-step reference), log
    and register it."""
    from dkd_ray.data import load_annotations
    from dkd_ray.train.evaluation import EvaluationArrays
    from dkd_ray.train.runner import fit
    from dkd_ray.train.student_loop import train_student

    tracker = _tracker(cfg, "train_student", experiment, run_name, storage_path, data_root=data_root)
    with _closing(tracker, storage_path, run_name):
        from dkd_ray.tracking.lineage import teacher_model_uri

        teacher_uri = teacher_model_uri(teacher_ref, cfg.data.dataset, tracker.uri)  # one registry lookup
        tracker.set_tags({"teacher": teacher_uri, "knowledge_bank": str(bank_path or "")})
        loop_config = {"config": cfg.to_dict(), "data_root": str(data_root),
                       "teacher_ref": worker_teacher_ref(teacher_ref), "bank_path": str(bank_path) if bank_path else "",
                       "run_name": run_name, "mlflow": _mlflow_settings(tracker, cfg, "train_student")}
        result = fit(train_student, loop_config, cfg, name=run_name, storage_path=storage_path)
        checkpoint = final_checkpoint(result, storage_path)
        stage = StageResult("student", checkpoint, {}, run_id=tracker.run_id)
        tracker.set_tags({"checkpoint": str(checkpoint)})

        annotations = load_annotations(_layout(cfg), data_root, box_rule=cfg.data.box_rule)
        if cfg.data.validation_fraction > 0:  # the run was evaluated on its validation view
            from dkd_ray.data.splits import validation_split

            annotations = validation_split(annotations, cfg.data.validation_fraction, cfg.train.seed)[1]
        report_student(stage, cfg, annotations, EvaluationArrays.load(evaluation_folder(checkpoint)), teacher_ref,
                       tracker, output_dir, bank_path=str(bank_path) if bank_path else None, teacher_uri=teacher_uri)
    return stage


def report_student(stage: StageResult, cfg: Config, annotations, arrays, teacher_ref: str, tracker,
                   output_dir: Path, *, alias: str | None = None, bank_path: str | None = None,
                   teacher_uri: str | None = None) -> None:
    """From the student's evaluation arrays: the full protocol (files in ``output_dir``), the
    two-step reference, all logged in ``tracker``'s run; then log the model of
    ``stage.checkpoint`` and register it as ``dkd-student-<dataset>`` (with ``alias``)."""
    from dkd_ray.eval.pipeline import evaluate_arrays
    from dkd_ray.models.loading import load_model
    from dkd_ray.tracking import registered_model_name, version_tags
    from dkd_ray.tracking.lineage import teacher_model_uri, version_description
    from dkd_ray.train.state import run_fingerprint

    output_dir.mkdir(parents=True, exist_ok=True)
    report = evaluate_arrays(annotations, arrays.gallery, arrays.query_embeddings,
                             score_threshold=cfg.eval.score_threshold, cbgm=cfg.eval.cbgm, output_dir=output_dir)
    stage.metrics = dict(report.metrics)
    stage.files = list(report.files)
    if cfg.eval.two_step and teacher_ref:
        stage.metrics.update(two_step_reference(cfg, annotations, arrays, teacher_ref))
    tracker.log_metrics(stage.metrics)
    tracker.log_artifacts(output_dir, "evaluation")

    student = load_model(stage.checkpoint, role="student")
    head = headline_prefix(stage.metrics, _layout(cfg))
    tags = version_tags(cfg, stage.metrics, head)
    if teacher_uri is None and teacher_ref:  # the registry's name for it, unless the caller looked it up
        teacher_uri = teacher_model_uri(teacher_ref, cfg.data.dataset, tracker.uri)
    lineage = {"teacher": teacher_uri or None,
               "knowledge bank": bank_path, "checkpoint": str(stage.checkpoint), "MLflow run": tracker.run_id,
               "config digest": run_fingerprint(cfg, "student")}
    tags["config_digest"] = lineage["config digest"]
    tags.update({key: str(value) for key, value in (("teacher", lineage["teacher"]), ("knowledge_bank", bank_path))
                 if value})
    example = np.random.default_rng(0).random((1, 3, cfg.data.short_side, cfg.data.short_side), dtype=np.float32)
    info = tracker.log_model(student, "model", example, config=student.spec, serialization="pickle", alias=alias,
                             checkpoint=str(stage.checkpoint),
                             registered_name=registered_model_name("student", cfg.data.dataset), version_tags=tags,
                             description=version_description("student", stage.metrics, head, lineage))
    if info is not None:
        stage.model_uri, stage.registered_version = info.model_uri, getattr(info, "registered_model_version", None)


def evaluate_model_stage(cfg: Config, data_root: Path, model_ref: str, role: str, *, storage_path: str | Path,
                         run_name: str) -> tuple[dict[str, float], str]:
    """Evaluate a trained model on the test protocol on Ray Train workers (sharded inference).
    Returns the run's metrics and its checkpoint folder (``evaluation/`` holds a student's arrays)."""
    from dkd_ray.train.evaluate_loop import evaluate_model
    from dkd_ray.train.runner import fit

    evaluation = cfg.copy()
    evaluation.data.validation_fraction = 0.0  # the test protocol, whatever the run selected on
    loop_config = {"config": evaluation.to_dict(), "data_root": str(data_root), "model_ref": model_ref, "role": role}
    result = fit(evaluate_model, loop_config, evaluation, name=run_name, storage_path=storage_path)
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    return metrics, final_checkpoint(result, storage_path)


def evaluation_folder(checkpoint: str) -> Path:
    """The ``evaluation/`` arrays of a student checkpoint, on this node's disk (downloaded once
    when the checkpoint is on object storage)."""
    from dkd_ray import storage

    return storage.localize(storage.join(checkpoint, "evaluation"))


def two_step_reference(cfg: Config, annotations, arrays, teacher_ref: str) -> dict[str, float]:
    """The same protocol with the teacher's embeddings of the student's detections (docs/EVALUATION.md)."""
    import torch

    from dkd_ray.eval.arrays import Detections
    from dkd_ray.eval.search import evaluate_search
    from dkd_ray.inference import teacher_embed_boxes
    from dkd_ray.models.loading import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_model(teacher_ref, role="teacher", map_location=device).to(device)
    kept = arrays.gallery.above(cfg.eval.score_threshold)
    rows = [int(r) for r in np.flatnonzero(np.diff(kept.offsets) > 0)]
    trained = teacher.spec["config"]["teacher"]  # the teacher's own input size, not the student run's config
    crop = (trained["input_height"], trained["input_width"])
    gallery_emb = teacher_embed_boxes(teacher, annotations, rows, [kept.boxes[kept.rows_of(r)] for r in rows],
                                      crop_size=crop, device=device)
    queries = annotations.queries
    query_emb = np.concatenate(teacher_embed_boxes(
        teacher, annotations, [int(i) for i in queries.image_index], [b[None] for b in queries.box],
        crop_size=crop, device=device)) if len(queries) else np.zeros((0, teacher.embedding_dim), np.float32)
    gallery = Detections.from_lists(rows, [kept.boxes[kept.rows_of(r)] for r in rows],
                                    [kept.scores[kept.rows_of(r)] for r in rows], gallery_emb,
                                    num_images=kept.num_images, dim=teacher.embedding_dim)
    search = evaluate_search(annotations, gallery, query_emb, score_threshold=cfg.eval.score_threshold)
    return {f"two_step/{k}": v for k, v in search.metrics.items()}


def registered_version_tags(model_uri: str) -> dict[str, str]:
    """Tags of the registered version ``models:/name/<version>`` or ``models:/name@alias``."""
    from mlflow import MlflowClient

    from dkd_ray.tracking import tracking_uri

    client = MlflowClient(tracking_uri(), tracking_uri())  # the registry lives with the tracking server
    ref = model_uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = ref.partition("/")
        version = client.get_model_version(name, number)
    return dict(version.tags)
