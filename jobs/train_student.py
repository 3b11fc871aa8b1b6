#!/usr/bin/env python
"""Train the distilled end-to-end student (Faster R-CNN + OIM + FSA + the three KD terms) on Ray Train.

The teacher is --teacher: an MLflow model URI (models:/dkd-teacher-<dataset>/3 or
models:/dkd-teacher-<dataset>@champion), a run id, or a checkpoint folder. Without --teacher, the
newest registered dkd-teacher-<dataset> is used, and when none is registered the teacher is
trained first. Its knowledge bank is reused when recorded, else built once on the cluster.
Ends with the dataset's full evaluation protocol, logged to MLflow; the model is registered as
dkd-student-<dataset>.

  ray job submit -- python jobs/train_student.py --dataset cuhk_sysu --data-root /data/CUHK-SYSU \\
      --teacher models:/dkd-teacher-cuhk_sysu@champion --num-workers 8 --use-gpu true \\
      --storage-path /shared/runs --set distill.tri_weight=0.5
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dkd_ray.cli import (add_common_args, add_run_name_args, claim_run_name, config_from_args, exits_on_bad_input,
                         experiment_name, fail, prepare_driver, run_name, storage_of)

log = logging.getLogger("dkd_ray.jobs.train_student")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    add_run_name_args(p, "student")
    p.add_argument("--teacher", default="", help="teacher model: MLflow URI, run id or checkpoint folder")
    p.add_argument("--knowledge-bank", default="", help="a knowledge bank folder/file to use as is")
    p.add_argument("--output-dir", default="", help="where evaluation files go (default: <storage>/<run>/evaluation)")
    return p


def resolve_teacher(args, cfg, data_root, storage, name) -> tuple[str, str | None]:
    """(teacher reference, bank path if already known)."""
    from dkd_ray.stages import train_teacher_stage
    from dkd_ray.tracking import latest_registered, registered_model_name

    if args.teacher:
        return args.teacher, None
    registered = registered_model_name("teacher", cfg.data.dataset)
    try:
        latest = latest_registered(registered)
    except Exception as err:  # noqa: BLE001 - an unreachable registry must not stop training
        log.warning("could not query the MLflow registry for %s (%s)", registered, err)
        latest = None
    if latest is not None:
        log.info("using the newest registered teacher: models:/%s/%s", registered, latest.version)
        return f"models:/{registered}/{latest.version}", None
    log.info("no teacher given and none registered as %s: training the teacher first", registered)
    stage = train_teacher_stage(cfg, data_root, storage_path=storage, experiment=experiment_name(args, cfg),
                                run_name=f"teacher-{name}")
    return str(stage.checkpoint), stage.bank_path


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.print_config:
        print(cfg.to_json())
        return 0
    from dkd_ray.eval.results import format_metrics_table
    from dkd_ray.models.loading import check_model_ref
    from dkd_ray.stages import evaluation_output, publish_evaluation, resolve_bank, train_student_stage
    from dkd_ray.storage import absolute
    from dkd_ray.storage import exists as storage_exists

    if args.teacher:  # a bad reference fails here, in a second, not in a worker after Ray started
        check_model_ref(args.teacher, "teacher")
    if args.knowledge_bank and not storage_exists(args.knowledge_bank):
        fail(f"--knowledge-bank {args.knowledge_bank}: no such file or folder")
    name = run_name(args, "student")
    claim_run_name(args, storage_of(args), name)  # before Ray: a name in use is refused at once
    data_root, storage = prepare_driver(args, cfg)
    teacher_ref, bank = resolve_teacher(args, cfg, data_root, storage, name)
    if args.knowledge_bank:
        bank = absolute(args.knowledge_bank)
    if cfg.distill.enabled and cfg.distill.use_bank and bank is None:
        bank = resolve_bank(cfg, teacher_ref, data_root, storage_path=storage, run_name=name)
    output = evaluation_output(storage, name, args.output_dir)
    stage = train_student_stage(cfg, data_root, teacher_ref=teacher_ref, bank_path=bank, storage_path=storage,
                                experiment=experiment_name(args, cfg), run_name=name, output_dir=output)
    print(format_metrics_table(stage.metrics))
    print(f"student checkpoint: {stage.checkpoint}\n"
          f"evaluation files:   {publish_evaluation(output, storage, name, args.output_dir)}")
    print(f"MLflow run: {stage.run_id}  model: {stage.model_uri}  registered version: {stage.registered_version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
