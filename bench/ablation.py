#!/usr/bin/env python
"""The DKD ablation on the synthetic benchmark: which parts of the method help the student.

Trains one teacher (or reuses --teacher), then the student six times on the same data, bank and
seed, switching parts on one at a time: no KD / +FSA / +FSA+probability KD / +FSA+pair-wise /
+FSA+triplet-wise / all (FSA + the three KD terms); plus the two-step reference (the teacher on
the full model's detections). Every run is a normal Ray Train run tracked in MLflow
(experiment dkd-ray/ablation). Writes a markdown table (default RESULTS.md).

  .venv/bin/python bench/ablation.py --teacher runs/<pipeline>-teacher/<final checkpoint>
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkd_ray.cli import add_common_args, config_from_args, prepare_driver

OFF = ["distill.prob_weight=0", "distill.pair_weight=0", "distill.tri_weight=0"]
VARIANTS = {
    "no KD (OIM baseline)": ["student.fsa_num=0", "distill.enabled=false"],
    "+FSA": ["distill.enabled=false"],
    "+FSA +probability KD": [*OFF, "distill.prob_weight=1.0"],
    "+FSA +pair-wise KD": [*OFF, "distill.pair_weight=1.0"],
    "+FSA +triplet-wise KD": [*OFF, "distill.tri_weight=1.0"],
    "all (FSA + three KD terms)": [],
}


def write_table(rows: list, output: Path, argv: list[str] | None, base, teacher_dir) -> str:
    from dkd_ray.eval.pipeline import headline_prefix

    head = headline_prefix(rows[0][1], "cuhk_sysu") if rows else ""
    lines = [f"| variant | {head} mAP | {head} top-1 | full mAP | full top-1 | det AP | minutes | MLflow run |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    pct = lambda m, k: f"{100 * m[k]:.1f}" if k in m else "-"  # noqa: E731
    for name, m, minutes, run_id in rows:
        lines.append(f"| {name} | {pct(m, f'{head}/mAP')} | {pct(m, f'{head}/top1')} | {pct(m, 'cuhk_sysu/full/mAP')} | "
                     f"{pct(m, 'cuhk_sysu/full/top1')} | {pct(m, 'det/ap')} | {minutes:.1f} | {run_id} |")
    for name, m, _, run_id in rows:
        if f"two_step/{head}/mAP" in m:
            lines.append(f"| two-step reference (teacher on the detections of '{name}') | "
                         f"{pct(m, f'two_step/{head}/mAP')} | {pct(m, f'two_step/{head}/top1')} | "
                         f"{pct(m, 'two_step/cuhk_sysu/full/mAP')} | {pct(m, 'two_step/cuhk_sysu/full/top1')} | - | - | {run_id} |")
    command = "python bench/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join(lines)
    output.write_text(
        f"# Ablation on the synthetic benchmark\n\nCommand: `{command}`\n\n"
        f"Machine: {os.cpu_count()}-core CPU, no GPU. Preset {base.preset}; {base.train.num_workers} Ray Train "
        f"workers; one seed; teacher {teacher_dir}.\n\n{text}\n")
    return text


def collect(stamp: str, experiment: str) -> list:
    """Rows of an earlier ablation from MLflow (runs named ablation-<stamp>-<variant index>)."""
    from mlflow import MlflowClient

    from dkd_ray.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], f"tags.mlflow.runName LIKE 'ablation-{stamp}-%'") if found else []
    by_index = {}
    for run in runs:
        suffix = run.info.run_name.rsplit("-", 1)[-1]
        if suffix.isdigit() and run.info.status == "FINISHED":
            minutes = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 60000
            by_index[int(suffix)] = (run.data.metrics, minutes, run.info.run_id)
    names = list(VARIANTS)
    return [(names[i], *by_index[i]) for i in sorted(by_index) if i < len(names)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.set_defaults(num_workers=2, experiment="dkd-ray/ablation")
    p.add_argument("--teacher", default="", help="teacher checkpoint folder (with bank/) to reuse")
    p.add_argument("--output", default="RESULTS.md", help="markdown file to write")
    p.add_argument("--only", nargs="*", help="run only these variants (names as in the table)")
    p.add_argument("--collect", metavar="STAMP", help="train nothing: rebuild the table from the MLflow runs of an "
                                                    "earlier (e.g. interrupted) ablation, ablation-<STAMP>-<i>")
    args = p.parse_args(argv)
    base = config_from_args(args)
    if args.collect:
        rows = collect(args.collect, args.experiment)
        print(write_table(rows, Path(args.output), argv, base, Path(args.teacher or "?")) if rows else "no runs found")
        return 0
    from dkd_ray.stages import train_student_stage, train_teacher_stage

    data_root, storage = prepare_driver(args, base)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    teacher_dir = Path(args.teacher) if args.teacher else train_teacher_stage(
        base, data_root, storage_path=storage, experiment=args.experiment, run_name=f"ablation-{stamp}-teacher").checkpoint
    rows = []
    for index, (name, overrides) in enumerate(VARIANTS.items()):
        if args.only and name not in args.only:
            continue
        cfg = base.copy().apply_overrides(overrides + ["eval.two_step=" + str(index == len(VARIANTS) - 1).lower()])
        started = time.perf_counter()
        stage = train_student_stage(cfg, data_root, teacher_ref=str(teacher_dir),
                                    bank_path=teacher_dir / "bank", storage_path=storage, experiment=args.experiment,
                                    run_name=f"ablation-{stamp}-{index}",
                                    output_dir=Path(storage) / f"ablation-{stamp}-{index}" / "evaluation")
        rows.append((name, stage.metrics, (time.perf_counter() - started) / 60, stage.run_id))
        write_table(rows, Path(args.output), argv, base, teacher_dir)  # after every variant: nothing lost
    print(write_table(rows, Path(args.output), argv, base, teacher_dir) if rows else "no variant ran")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
