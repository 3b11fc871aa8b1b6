#!/usr/bin/env python
"""The whole DKD pipeline in one job (the README's main command):

  dataset (synthetic CUHK-SYSU layout when no --data-root) -> validation -> teacher (Ray Train)
  -> knowledge bank -> distilled student (Ray Train, all KD terms) -> full evaluation
  -> registered models in MLflow; prints a metrics table and how to open the MLflow UI.

On embedded defaults it runs on a local Ray cluster with 2 CPU workers and the cpu-small preset.
On a cluster: ray job submit -- python jobs/pipeline.py --dataset cuhk_sysu --data-root ... --use-gpu true
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dkd_ray.cli import add_common_args, config_from_args, exits_on_bad_input, experiment_name, prepare_driver


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.set_defaults(num_workers=2)
    p.add_argument("--skip-validation", action="store_true", help="do not decode every image before training")
    p.add_argument("--resume", metavar="STAMP", default="",
                   help="continue an interrupted pipeline (same --storage-path): its <stamp> (as in teacher-<stamp>, "
                        "student-<stamp>, pipeline-<stamp>); a stage that finished is not trained again, an "
                        "interrupted one resumes from its newest checkpoint into the same MLflow run")
    return p


LEARNING_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "RESULTS_learning.json"


def no_kd_twin_line(cfg, results: Path = LEARNING_RESULTS) -> str:
    """How a student of this preset compares with its no-KD twin, from the learning benchmark's
    measured table (bench/learning.py, several seeds); empty when it has no such row. One demo
    run cannot say it: its one seed is within the seed-to-seed spread."""
    import json

    try:
        facts = json.loads(results.read_text())
        if facts.get("preset") != cfg.preset:
            return ""
        variants, paired, head = facts["variants"], facts["paired"]["all"], facts["head"]
        nokd, dkd = variants["nokd"]["mAP"], variants["all"]["mAP"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    seeds = len(paired["seeds"])
    return (f"\nDKD against its no-KD twin ({cfg.preset} recipe, bench/learning.py over {seeds} seeds on "
            f"synthetic data, RESULTS.md): {head} mAP {100 * dkd[0]:.1f} ± {100 * dkd[1]:.1f} with all KD "
            f"terms vs {100 * nokd[0]:.1f} ± {100 * nokd[1]:.1f} without, paired difference "
            f"{100 * paired['mean']:+.1f} ± {100 * paired['std']:.1f} points. This run's own figure above is one seed.")


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.print_config:
        print(cfg.to_json())
        return 0
    from dkd_ray.data.validate import validate_dataset
    from dkd_ray.eval.results import format_metrics_table
    from dkd_ray.stages import (evaluation_output, finished_stage, publish_evaluation, train_student_stage,
                                train_teacher_stage)
    from dkd_ray.train.workdata import dataset_layout

    started = time.perf_counter()
    data_root, storage = prepare_driver(args, cfg)
    stamp = resumed_stamp(args.resume, storage) if args.resume else time.strftime('%Y%m%d-%H%M%S')
    name = f"pipeline-{stamp}"  # the evaluation folder; the runs are named by their role (the UI cuts long names)
    if not args.skip_validation:
        report = validate_dataset(dataset_layout(cfg), data_root, box_rule=cfg.data.box_rule)
        print(report.format_summary())
        if not report.ok:
            for problem in report.errors:
                print(problem)
            print(f"FAILED: {len(report.errors)} errors in {data_root}; fix them (jobs/validate_dataset.py) first")
            return 1
    experiment = experiment_name(args, cfg)
    teacher = finished_stage("teacher", storage, f"teacher-{stamp}") if args.resume else None
    if teacher is not None:
        print(f"teacher-{stamp} finished before: its checkpoint {teacher.checkpoint} is used (not trained again)")
    else:
        teacher = train_teacher_stage(cfg, data_root, storage_path=storage, experiment=experiment,
                                      run_name=f"teacher-{stamp}")
    output = evaluation_output(storage, name)
    student = finished_stage("student", storage, f"student-{stamp}") if args.resume else None
    if student is not None:
        print(f"student-{stamp} finished before: nothing left to train")
    else:
        student = train_student_stage(cfg, data_root, teacher_ref=teacher.checkpoint, bank_path=teacher.bank_path,
                                      storage_path=storage, experiment=experiment, run_name=f"student-{stamp}",
                                      output_dir=output)
    minutes = (time.perf_counter() - started) / 60
    print("\n" + format_metrics_table(student.metrics))
    twin = no_kd_twin_line(cfg)
    if twin:
        print(twin)
    print(f"\npipeline finished in {minutes:.1f} min")
    for stage in (teacher, student):
        registered = (f"registered dkd-{stage.role}-{cfg.data.dataset} v{stage.registered_version}"
                      if stage.registered_version else "not registered (see the log)")
        print(f"  {stage.role}: MLflow run {stage.run_id}, {registered}")
    print(f"  checkpoints: {teacher.checkpoint}, {student.checkpoint}")
    print(f"  evaluation files (results.jsonl, plots): {publish_evaluation(output, storage, name)}")
    from dkd_ray.tracking import redact_uri

    uri = os.environ["MLFLOW_TRACKING_URI"]
    view = comparison_link(uri, experiment)
    if uri.startswith("sqlite:"):
        print(f"  look at the runs: .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
        print(f"  then open http://127.0.0.1:5000/{view} (teacher and student side by side)")
    else:
        print(f"  look at the runs: {redact_uri(uri).rstrip('/')}/{view} (teacher and student side by side)")
    return 0


def resumed_stamp(given: str, storage: str) -> str:
    """The stamp of ``--resume`` (``<stamp>``, or a run name ending in it); refused unless this
    storage holds the pipeline's teacher run."""
    from dkd_ray import storage as store
    from dkd_ray.cli import fail

    stamp = given.rstrip("/").rsplit("/", 1)[-1]
    for prefix in ("pipeline-", "teacher-", "student-"):
        stamp = stamp.removeprefix(prefix)
    if not store.is_dir(store.join(storage, f"teacher-{stamp}")):
        fail(f"--resume {given}: there is no pipeline {stamp!r} in {storage} (no teacher-{stamp} run folder)")
    from dkd_ray.tracking import PIPELINE_ENV
    from dkd_ray.tracking.run_record import read_record

    pipeline_id = (read_record(storage, f"teacher-{stamp}") or {}).get("pipeline_id")
    if pipeline_id:  # a student stage started now joins its teacher's pipeline
        os.environ[PIPELINE_ENV] = pipeline_id
    return stamp


def comparison_link(uri: str, experiment: str) -> str:
    """The UI link (relative) to this pipeline's saved comparison of its runs."""
    from mlflow import MlflowClient

    from dkd_ray.tracking import PIPELINE_ENV, runs_view_link

    try:
        found = MlflowClient(uri).get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001 - the server went away at the very end: the runs are spooled
        found = None
    if found is None:
        return "#/experiments"
    return runs_view_link(found.experiment_id, f"pipeline-{os.environ[PIPELINE_ENV]}")


if __name__ == "__main__":
    raise SystemExit(main())
