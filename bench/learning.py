#!/usr/bin/env python
"""The learning benchmark: does distillation make the end-to-end student better, by more than noise?

Trains one teacher (or reuses --teacher: its bank serves every run), then the student once per
(variant, seed) on the same data: no KD (OIM), +FSA, +FSA with each KD term alone, all terms;
the two-step reference (the teacher on the no-KD student's detections) comes with the no-KD
runs. Every run is a normal Ray Train run tracked in MLflow (experiment dkd-ray/learning, tags
``learning=<stamp>``, ``variant``, ``seed``), so ``--collect STAMP`` rebuilds the table from MLflow.

The table reports, per variant, mean +- sample std over seeds and the paired difference against
no-KD (same seed: same data order, same initialisation), and whether the all-terms student beats
no-KD by more than twice the std of that difference and closes half of the gap to two-step.

Data: the synthetic ``learning`` preset (CUHK-SYSU layout, 300 training scenes / 120 identities,
300 gallery scenes, 200 queries, galleries of 50 and 100 and the full set).

  .venv/bin/python bench/learning.py --seeds 0 1 2                  # everything (hours on 2 cores)
  .venv/bin/python bench/learning.py --variants nokd all --seeds 0 1 2
  .venv/bin/python bench/learning.py --collect 20261202-113000 --output bench/RESULTS_learning.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkd_ray.cli import add_common_args, config_from_args, prepare_driver

OFF = ["distill.prob_weight=0", "distill.pair_weight=0", "distill.tri_weight=0"]
VARIANTS = {  # key: (table name, overrides on the preset). Weights are the preset's own.
    "nokd": ("no KD (OIM)", ["student.fsa_num=0", "distill.enabled=false"]),
    "fsa": ("+FSA", ["distill.enabled=false"]),
    "prob": ("+FSA +probability KD", ["distill.pair_weight=0", "distill.tri_weight=0"]),
    "pair": ("+FSA +pair-wise KD", ["distill.prob_weight=0", "distill.tri_weight=0"]),
    "tri": ("+FSA +triplet-wise KD", ["distill.prob_weight=0", "distill.pair_weight=0"]),
    "all": ("all (FSA + three KD terms)", []),
    # Our changes to the paper's design, one at a time and together (named options, paper defaults):
    "matched": ("all, matched proposals distilled", ["distill.rows=matched"]),
    "proto": ("all, bank prototypes as contrast set", ["distill.contrast=prototypes"]),
    "ramp": ("all, KD ramped over epoch 1", ["distill.ramp_epochs=1"]),
    "ours": ("all + matched + prototypes + ramp", ["distill.rows=matched", "distill.contrast=prototypes",
                                                   "distill.ramp_epochs=1"]),
    # Feature mimicry on the matched proposals: the student embeds its proposals where the teacher
    # embeds their boxes. Weight 10 = the 1/tau scale of the triplet term's gradient (tau = 0.1).
    "mimic": ("all + feature mimicry on matched proposals", ["distill.rows=matched", "distill.feat_weight=10"]),
}
DEFAULT_VARIANTS = ["nokd", "fsa", "prob", "pair", "tri", "all", "ours"]
TARGETED = ("all", "matched", "proto", "ramp", "ours", "mimic")  # full-DKD variants checked against the target
TWO_STEP_ON = ("nokd",)  # the reference is measured on the no-KD runs' detections (the gap DKD should close)
BASELINE = "nokd"
METRICS = ("mAP", "top1", "full/mAP", "det/ap")  # headline gallery (100), full set, detection


def metric_key(name: str, head: str) -> str:
    """``mAP``/``top1``: the headline gallery's (``cuhk_sysu/g100``, or the largest present)."""
    if name.startswith("det/"):
        return name
    return f"{head}/{name}" if "/" not in name else f"cuhk_sysu/{name}"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarise(runs: dict[tuple[str, int], dict[str, float]]) -> dict:
    """``runs[(variant, seed)] = metrics`` -> per-variant statistics, paired differences against
    no-KD over the seeds both have, the two-step reference and the target check."""
    from dkd_ray.eval.pipeline import headline_prefix

    head = headline_prefix(next(iter(runs.values())), "cuhk_sysu") if runs else "cuhk_sysu/g100"
    out: dict = {"variants": {}, "paired": {}, "two_step": {}, "head": head.split("/")[-1]}
    seeds_of = {}
    for (variant, seed) in runs:
        seeds_of.setdefault(variant, set()).add(seed)
    for variant in VARIANTS:
        if variant not in seeds_of:
            continue
        seeds = sorted(seeds_of[variant])
        out["variants"][variant] = {m: mean_std([runs[variant, s][metric_key(m, head)] for s in seeds])
                                    for m in METRICS if all(metric_key(m, head) in runs[variant, s] for s in seeds)}
        out["variants"][variant]["seeds"] = seeds
        key = metric_key("mAP", head)
        shared = [s for s in sorted(seeds_of[variant] & seeds_of.get(BASELINE, set()))
                  if key in runs[variant, s] and key in runs[BASELINE, s]]
        if variant != BASELINE and shared:
            diffs = [runs[variant, s][key] - runs[BASELINE, s][key] for s in shared]
            out["paired"][variant] = (*mean_std(diffs), shared, diffs)
        two_step = [runs[variant, s][f"two_step/{key}"] for s in seeds if f"two_step/{key}" in runs[variant, s]]
        if two_step:
            out["two_step"][variant] = mean_std(two_step)
    out["targets"] = {}
    for variant in TARGETED:
        if variant in out["paired"] and BASELINE in out["two_step"]:
            gain, std, seeds, _ = out["paired"][variant]
            gap = out["two_step"][BASELINE][0] - out["variants"][BASELINE]["mAP"][0]
            out["targets"][variant] = {
                "gain": gain, "std": std, "separated": len(seeds) >= 2 and gain > 2 * std, "gap": gap,
                "closed": gain / gap if gap > 0 else float("nan"),
                "met": len(seeds) >= 3 and gain > 2 * std and gap > 0 and gain >= gap / 2}
    if "all" in out["targets"]:
        out["target"] = out["targets"]["all"]  # the paper's full method
    return out


def table(summary: dict) -> str:
    pct = lambda pair: f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"  # noqa: E731
    head = summary["head"]
    lines = [f"| variant | seeds | {head} mAP | {head} top-1 | full mAP | det AP | Δ {head} mAP vs no KD (paired) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for variant, stats in summary["variants"].items():
        paired = summary["paired"].get(variant)
        delta = (f"{100 * paired[0]:+.1f} ± {100 * paired[1]:.1f} (" + ", ".join(f"{100 * d:+.1f}" for d in paired[3]) + ")"
                 if paired else "-")
        cells = [pct(stats[m]) if m in stats else "-" for m in METRICS]
        lines.append(f"| {VARIANTS[variant][0]} | {','.join(map(str, stats['seeds']))} | {' | '.join(cells)} | {delta} |")
    for variant, pair in summary["two_step"].items():
        lines.append(f"| two-step reference (teacher on the detections of '{VARIANTS[variant][0]}') | "
                     f"{','.join(map(str, summary['variants'][variant]['seeds']))} | {pct(pair)} | - | - | - | - |")
    if summary.get("targets"):
        lines.append("")
    for variant, target in summary.get("targets", {}).items():
        lines.append(f"Target ({VARIANTS[variant][0]} vs no KD): gain {100 * target['gain']:+.1f} points, paired std "
                     f"{100 * target['std']:.1f} ({'more' if target['separated'] else 'not more'} than twice the std); "
                     f"gap no-KD → two-step {100 * target['gap']:.1f} points, {100 * target['closed']:.0f} % closed; "
                     f"target {'met' if target['met'] else 'not met'}.  ")
    return "\n".join(lines)


def collect(stamp: str, experiment: str) -> dict[tuple[str, int], dict[str, float]]:
    """The finished runs of benchmark ``stamp`` from MLflow, ``{(variant, seed): metrics}``."""
    from mlflow import MlflowClient

    from dkd_ray.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs([found.experiment_id], f"tags.learning = '{stamp}' and attributes.status = 'FINISHED'")
    return {(r.data.tags["variant"], int(r.data.tags["seed"])): dict(r.data.metrics)
            for r in runs if r.data.tags.get("variant") in VARIANTS and "seed" in r.data.tags}


def write(summary: dict, output: Path, command: str, cfg, teacher: str) -> str:
    """The markdown table to ``output`` and the numbers beside it as JSON (``jobs/pipeline.py``
    prints how the demo's student compares with its no-KD twin from there)."""
    text = table(summary)
    facts = {"command": command, "preset": cfg.preset, "head": summary["head"],
             "variants": {v: {"name": VARIANTS[v][0], **{m: list(ms) for m, ms in stats.items() if m != "seeds"},
                              "seeds": stats["seeds"]} for v, stats in summary["variants"].items()},
             "paired": {v: {"mean": p[0], "std": p[1], "seeds": p[2], "diffs": p[3]} for v, p in summary["paired"].items()},
             "two_step": {v: list(p) for v, p in summary["two_step"].items()}, "target": summary.get("target"),
             "targets": summary.get("targets", {})}
    output.with_suffix(".json").write_text(json.dumps(facts, indent=2) + "\n")
    data = f"synthetic `{cfg.data.synthetic_preset}` preset" if cfg.data.dataset == "synthetic" else cfg.data.root
    output.write_text(
        f"# Learning benchmark\n\nCommand: `{command}`\n\nMachine: {os.cpu_count()}-core {platform.machine()} CPU, "
        f"no GPU. Preset {cfg.preset}, data: {data}; {cfg.train.num_workers} Ray Train workers; one teacher "
        f"and knowledge bank for every run ({teacher}). Mean ± sample std over seeds, in mAP points.\n\n{text}\n")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.set_defaults(num_workers=2, experiment="dkd-ray/learning")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds (default 0 1 2)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS,
                   help=f"variants to train (default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--teacher", default="", help="teacher checkpoint folder (with bank/) to reuse")
    p.add_argument("--stamp", default="", help="benchmark id to add runs to (default: a new time stamp)")
    p.add_argument("--output", default="bench/RESULTS_learning.md", help="markdown file to write")
    p.add_argument("--collect", metavar="STAMP", help="train nothing: rebuild the table of benchmark STAMP from MLflow")
    args = p.parse_args(argv)
    if not any(o.startswith("data.synthetic_preset=") for o in args.overrides):
        args.overrides.insert(0, "data.synthetic_preset=learning")
    base = config_from_args(args)
    command = "python bench/learning.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.collect:
        summary = summarise(collect(args.collect, args.experiment))
        print(write(summary, Path(args.output), command, base, args.teacher or "?"))
        return 0
    from mlflow import MlflowClient

    from dkd_ray import storage as storage_lib
    from dkd_ray.stages import train_student_stage, train_teacher_stage
    from dkd_ray.tracking import tracking_uri

    data_root, storage = prepare_driver(args, base)
    stamp = args.stamp or time.strftime("%Y%m%d-%H%M%S")
    print(f"learning benchmark {stamp}: MLflow experiment {args.experiment}, runs under {storage}", flush=True)
    teacher_dir = storage_lib.absolute(args.teacher) if args.teacher else train_teacher_stage(
        base, data_root, storage_path=storage, experiment=args.experiment, run_name=f"learning-{stamp}-teacher",
        register=False).checkpoint
    client = MlflowClient(tracking_uri())
    for seed in args.seeds:
        for variant in args.variants:
            overrides = VARIANTS[variant][1] + [f"train.seed={seed}",
                                                f"eval.two_step={str(variant in TWO_STEP_ON).lower()}"]
            cfg = base.copy().apply_overrides(overrides)
            name = f"learning-{stamp}-{variant}-s{seed}"
            started = time.perf_counter()
            stage = train_student_stage(cfg, data_root, teacher_ref=str(teacher_dir), bank_path=storage_lib.join(teacher_dir, "bank"),
                                        storage_path=storage, experiment=args.experiment, run_name=name,
                                        output_dir=Path(storage) / name / "evaluation")
            if stage.run_id:
                for key, value in {"learning": stamp, "variant": variant, "seed": str(seed)}.items():
                    client.set_tag(stage.run_id, key, value)
            print(f"{name}: g100 mAP {100 * stage.metrics.get('cuhk_sysu/g100/mAP', float('nan')):.1f} "
                  f"in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
            summary = summarise(collect(stamp, args.experiment))  # after every run: nothing lost
            write(summary, Path(args.output), command, base, str(teacher_dir))
    print(table(summarise(collect(stamp, args.experiment))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
