#!/usr/bin/env python
"""Ray Tune sweep over the distillation weights and augmentation strength (or, with
--stage teacher, over the teacher's ISA and training settings).

The sweep is described by a search-space file (search_spaces/*.yaml; its schema is in
dkd_ray/search_space.py). Every trial is a distributed Ray Train run of the same training loop
as jobs/train_student.py, on an identity-disjoint validation split of the training set; ASHA stops
weak trials early on the validation mAP. A student sweep trains one teacher (or takes --teacher)
and builds one knowledge bank that every trial reuses. At the end the best finished trial's model
is evaluated on the test protocol and registered as dkd-<student|teacher>-<dataset> with the
alias `champion`. MLflow: a parent run for the sweep, a child run per trial, a summary artifact.

  laptop:   python jobs/tune_distill.py --space search_spaces/cpu_smoke.yaml
  cluster:  ray job submit --working-dir . -- python jobs/tune_distill.py --dataset cuhk_sysu \\
                --data-root /shared/data/CUHK-SYSU --space search_spaces/cuhk_sysu.yaml \\
                --num-workers 4 --use-gpu true --storage-path /shared/runs --name dkd-sweep-1
  resume:   the same command with --resume dkd-sweep-1
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from dkd_ray.cli import add_common_args, config_from_args, exits_on_bad_input, experiment_name, fail, prepare_driver

log = logging.getLogger("dkd_ray.jobs.tune_distill")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    sweep = p.add_argument_group("sweep")
    sweep.add_argument("--space", default="search_spaces/cpu_smoke.yaml",
                       help="search-space file (default: %(default)s)")
    sweep.add_argument("--stage", choices=("student", "teacher"),
                       help="what the trials train (default: the space file's `stage`)")
    sweep.add_argument("--teacher", default="", help="student sweeps: the teacher to distil from (MLflow URI, run "
                                                     "id or checkpoint folder); default: train one for the sweep")
    sweep.add_argument("--num-samples", type=int, help="override the space file's num_samples")
    sweep.add_argument("--max-concurrent", type=int,
                       help="at most this many trials at once (default: the space's max_concurrent, else as many "
                            "as the cluster's CPUs/GPUs hold)")
    sweep.add_argument("--name", default="", help="sweep name (default: sweep-<timestamp>)")
    sweep.add_argument("--resume", metavar="NAME", default="",
                       help="continue the interrupted sweep NAME (same --storage-path): finished trials are kept")
    return p


def sweep_inputs(args: argparse.Namespace):
    """The search space and the config its trials start from; both refused before anything starts."""
    from dkd_ray.search_space import load_search_space

    path = Path(args.space)
    if not path.exists() and not path.is_absolute() and (REPO / path).exists():
        path = REPO / path  # the files shipped in search_spaces/, from any working folder
    space = load_search_space(path)  # a SearchSpaceError names the file and key
    if args.stage and args.stage != space.stage:
        fail(f"--stage {args.stage}, but {args.space} describes a {space.stage} sweep (its `stage`)")
    if args.num_samples:
        space.num_samples = args.num_samples
    if args.max_concurrent:
        space.max_concurrent = args.max_concurrent
    if args.preset == "auto":  # the space names the recipe its ranges are meant for
        args.preset = space.preset
    cfg = config_from_args(args)
    cfg.apply_overrides({**space.fixed, **dict(o.split("=", 1) for o in args.overrides)})
    return space, cfg


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    space, cfg = sweep_inputs(args)
    if args.print_config:
        print(cfg.to_json())
        return 0
    from dkd_ray.eval.results import format_metrics_table
    from dkd_ray.sweep.driver import SweepError, run_sweep
    from dkd_ray.sweep.summary import format_trials_table

    if args.teacher:
        from dkd_ray.models.loading import check_model_ref

        check_model_ref(args.teacher, "teacher")  # before Ray starts and before any trial
    data_root, storage = prepare_driver(args, cfg)
    name = args.resume or args.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    if not args.resume:  # said first: a driver killed without a goodbye prints nothing at the end
        print(f"sweep {name}: if it stops, continue it with: python jobs/tune_distill.py --space {args.space} "
              f"--storage-path {storage} --resume {name}", flush=True)
    started = time.perf_counter()
    try:
        outcome = run_sweep(space, cfg, name=name, data_root=data_root, storage_path=storage,
                            experiment=experiment_name(args, cfg), teacher_ref=args.teacher, resume=bool(args.resume))
    except SweepError as err:
        fail(str(err))
    print("\n" + format_trials_table(outcome.trials, space.metric, space.mode))
    if outcome.interrupted:
        print(f"\nsweep {name} interrupted; continue it with: python jobs/tune_distill.py --space {args.space} "
              f"--storage-path {storage} --resume {name}")
        return 130
    champion = outcome.champion
    print(f"\nchampion: trial {champion['trial_id']} (MLflow run {champion['run_id']}); test protocol:")
    print(format_metrics_table(champion.get("metrics", {})))
    role = "teacher" if space.stage == "teacher" else "student"
    print(f"\nsweep {name} finished in {(time.perf_counter() - started) / 60:.1f} min")
    print(f"  registered: models:/dkd-{role}-{cfg.data.dataset}@champion (version {champion.get('version')})")
    print(f"  MLflow parent run: {outcome.parent_run_id} (child run per trial)")
    print(f"  summary: {', '.join(str(p) for p in outcome.summary_files)}")
    print(f"  sweep folder (resume state, trials' checkpoints): {outcome.sweep_uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
