#!/usr/bin/env python
"""Train the Re-ID teacher (with ISA) on a dataset's labelled person crops, on Ray Train.

Evaluates it as the two-step reference on ground-truth boxes, builds the knowledge bank (one
shard per worker), logs everything to MLflow and registers the model as dkd-teacher-<dataset>.

  ray job submit -- python jobs/train_teacher.py --dataset cuhk_sysu --data-root /data/CUHK-SYSU \\
      --num-workers 8 --use-gpu true --storage-path /shared/runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dkd_ray.cli import (add_common_args, add_run_name_args, claim_run_name, config_from_args, exits_on_bad_input,
                         experiment_name, prepare_driver, run_name, storage_of)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    add_run_name_args(p, "teacher")
    return p


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.print_config:
        print(cfg.to_json())
        return 0
    from dkd_ray.eval.results import format_metrics_table
    from dkd_ray.stages import train_teacher_stage

    name = run_name(args, "teacher")
    claim_run_name(args, storage_of(args), name)  # before Ray: a name in use is refused at once
    data_root, storage = prepare_driver(args, cfg)
    stage = train_teacher_stage(cfg, data_root, storage_path=storage, experiment=experiment_name(args, cfg),
                                run_name=name)
    print(format_metrics_table({k: v for k, v in stage.metrics.items() if k.startswith("teacher_gt/")}))
    print(f"teacher checkpoint: {stage.checkpoint}\nknowledge bank:     {stage.bank_path}")
    print(f"MLflow run: {stage.run_id}  model: {stage.model_uri}  registered version: {stage.registered_version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
