"""Per-trial overhead of the sweep machinery against a plain training run of the same config.

    .venv/bin/python bench/bench_sweep.py [--trials 4] [--work-dir /tmp/sweepbench]

On the smoke space's config (tiny synthetic data, cpu-small, 2 student epochs, 1 worker) with a
teacher and knowledge bank built once beforehand:
- plain: ``dkd_ray.train.runner.fit(train_student, ...)`` (one Ray Train run, as
  ``jobs/train_student.py`` runs it), ``--trials`` times, wall time of each;
- sweep: ``--trials`` identical trials through the sweep's own Tuner (trial actor, TorchTrainer
  inside it, epoch results to Tune, MLflow child runs, resumable ASHA bookkeeping), one at a
  time, wall time of ``Tuner.fit`` divided by the trials.
Overhead per trial = sweep per trial - plain. Also printed: the same loop in-process (no Ray),
i.e. what Ray Train itself adds. Figures go to stdout as a Markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = ["teacher.p_identities=4", "teacher.k_instances=2", "data.loader_workers=0", "data.short_side=160",
        "data.max_side=256", "student.batch_size=2", "teacher.epochs=2", "eval.two_step=false"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--work-dir", default="")
    args = p.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dkd-sweepbench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    logging.basicConfig(level=logging.WARNING)

    from dkd_ray.config import preset
    from dkd_ray.search_space import load_search_space
    from dkd_ray.sweep import driver
    from dkd_ray.sweep.trial import trial_config
    from dkd_ray.train.runner import fit, init_ray
    from dkd_ray.train.session import LocalSession
    from dkd_ray.train.student_loop import train_student
    from dkd_ray.train.teacher_loop import train_teacher
    from dkd_ray.train.workdata import resolve_data_root

    space = load_search_space(REPO / "search_spaces" / "cpu_smoke.yaml")
    cfg = preset(space.preset, [f"{k}={v}" for k, v in space.fixed.items()] + TINY + ["data.dataset=synthetic"])
    cfg = driver.sweep_config(space, cfg)
    data_root = resolve_data_root(cfg, work)
    teacher = LocalSession(checkpoint_root=work / "teacher")
    train_teacher({"config": cfg.to_dict(), "data_root": str(data_root)}, teacher)
    teacher_ref = str(teacher.latest_checkpoint())
    init_ray()

    settings = driver._start(space, cfg, name="bench", sweep_uri=str(work / "sweep"), data_root=data_root,
                             experiment="bench", teacher_ref=teacher_ref)
    settings["bank_path"] = str(Path(teacher_ref) / "bank")
    params = {key: args[0] for key, (kind, args) in space.space.items()}  # every trial the same values
    trial_cfg = trial_config(settings, params)

    in_process = []
    for i in range(2):
        start = time.perf_counter()
        train_student({"config": trial_cfg.to_dict(), "data_root": str(data_root), "bank_path": settings["bank_path"],
                       "teacher_ref": teacher_ref}, LocalSession(checkpoint_root=work / f"local-{i}"))
        in_process.append(time.perf_counter() - start)

    plain = []
    for i in range(args.trials):
        start = time.perf_counter()
        fit(train_student, {"config": trial_cfg.to_dict(), "data_root": str(data_root), "teacher_ref": teacher_ref,
                            "bank_path": settings["bank_path"]}, trial_cfg, name=f"plain-{i}", storage_path=work / "plain")
        plain.append(time.perf_counter() - start)

    space.num_samples = args.trials
    space.space = {key: ("choice", [value]) for key, value in params.items()}
    space.scheduler = {**space.scheduler, "type": "none"}
    space.max_concurrent = 1
    start = time.perf_counter()
    grid = driver._tuner(space, cfg, settings, str(work / "sweep")).fit()
    swept = (time.perf_counter() - start) / args.trials
    assert grid.num_errors == 0 and len(grid) == args.trials, [r.error for r in grid]

    plain_s = statistics.median(plain)
    print(f"\nmachine: {platform.node()} {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
          f"{args.trials} trials, smoke config (tiny data, 2 epochs, 1 worker)\n")
    print("| run | wall per run (s) |\n|---|---|")
    print(f"| training loop in-process (no Ray) | {statistics.median(in_process):.1f} |")
    print(f"| plain Ray Train run (`fit`) | {plain_s:.1f} (runs: {', '.join(f'{x:.1f}' for x in plain)}) |")
    print(f"| sweep trial (Tune + Ray Train + MLflow child run) | {swept:.1f} |")
    print(f"| **overhead per trial** | **{swept - plain_s:+.1f} s ({(swept / plain_s - 1) * 100:+.0f}%)** |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
