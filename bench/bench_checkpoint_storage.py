"""Checkpoints of the ResNet-50 student on local disk and on S3, and what a training step waits.

1. Save / upload / download / load of a real student checkpoint (the cuhk_sysu preset's
   ResNet-50 Faster R-CNN + OIM, with SGD momentum buffers: what a run writes every
   ``train.checkpoint_every_iters``): local disk against an S3-compatible server on 127.0.0.1
   (moto), through the same storage layer the jobs use (``dkd_ray.storage``).
2. How long ``ray.train.report`` holds a worker when it carries a checkpoint of that size, with
   Ray Train's synchronous and asynchronous upload (``train.checkpoint_upload``), storage on S3.

  .venv/bin/python bench/bench_checkpoint_storage.py --repeats 3

moto keeps objects in memory and answers on the loopback: figures for a real S3 bucket depend on
the network and are usually slower, which makes the asynchronous upload matter more.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


_STATE: list = []


def student_state():
    """A real student's training state (built once): the cuhk_sysu preset's model with its SGD
    momentum buffers, as a run captures it every ``train.checkpoint_every_iters``."""
    if not _STATE:
        import torch

        from dkd_ray.config import preset
        from dkd_ray.models.student import build_student
        from dkd_ray.train.checkpoint import TrainingState

        cfg = preset("cuhk_sysu", ["student.backbone_weights=none", "teacher.backbone_weights=none"])
        model = build_student(cfg, num_train_ids=5532)  # CUHK-SYSU's training identities
        optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
        for p in model.parameters():  # momentum buffers exist after the first step
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
        _STATE.append(TrainingState.capture(model, optimizer, epoch=0, iteration=1, config=cfg,
                                            extra={"role": "student", "num_classes": 5532}))
    return _STATE[0]


def student_checkpoint(folder: Path) -> int:
    """Write the student checkpoint into ``folder``; returns its size in bytes."""
    from dkd_ray.train.checkpoint import save_checkpoint

    save_checkpoint(student_state(), folder)
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def storage_figures(s3_root: str, repeats: int) -> dict[str, list[float]]:
    from dkd_ray import storage
    from dkd_ray.train.checkpoint import load_checkpoint

    times: dict[str, list[float]] = {k: [] for k in ("save_local", "load_local", "upload_s3", "download_s3",
                                                     "load_after_download")}
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as work:
            local = Path(work) / "student_e000_i0000001"
            local.mkdir()
            times["save_local"].append(_timed(lambda: student_checkpoint(local)))
            times["load_local"].append(_timed(lambda: load_checkpoint(local)))
            uri = f"{s3_root}/bench/run-{i}/student_e000_i0000001"
            times["upload_s3"].append(_timed(lambda: storage.upload_dir(local, uri)))
            os.environ["DKD_CACHE_DIR"] = str(Path(work) / "cache")
            holder = {}
            times["download_s3"].append(_timed(lambda: holder.setdefault("path", storage.localize(uri))))
            times["load_after_download"].append(_timed(lambda: load_checkpoint(holder["path"])))
    return times


def _report_loop(config):
    """A Ray Train worker that reports checkpoints of ``config['bytes']`` and times each call."""
    import json
    import tempfile as tmp
    import time as clock

    import ray.train

    waits = []
    for step in range(config["reports"]):
        folder = tmp.mkdtemp(prefix="bench-ckpt-")
        with open(os.path.join(folder, "state.pt"), "wb") as f:
            f.write(os.urandom(config["bytes"]))
        start = clock.perf_counter()
        kwargs = {}
        if config["mode"] == "async":
            kwargs = {"checkpoint_upload_mode": ray.train.CheckpointUploadMode.ASYNC,
                      "delete_local_checkpoint_after_upload": True}
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_{step:03d}", **kwargs)
        waits.append(clock.perf_counter() - start)
        clock.sleep(config["step_s"])  # the training step that runs while an upload is in flight
    with open(config["out"], "w") as f:
        json.dump(waits, f)


def report_waits(s3_root: str, size: int, reports: int, step_s: float) -> dict[str, list[float]]:
    import json

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    out: dict[str, list[float]] = {}
    try:
        for mode in ("sync", "async"):
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                waits_file = f.name
            trainer = TorchTrainer(_report_loop, train_loop_config={"mode": mode, "bytes": size, "reports": reports,
                                                                     "step_s": step_s, "out": waits_file},
                                   scaling_config=ScalingConfig(num_workers=1),
                                   run_config=RunConfig(name=f"bench-{mode}-{time.time_ns()}",
                                                        storage_path=f"{s3_root}/ray"))
            result = trainer.fit()
            assert result.checkpoint is not None, result.error
            out[mode] = json.loads(Path(waits_file).read_text())
    finally:
        ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="save/upload/download/load rounds (default: %(default)s)")
    p.add_argument("--reports", type=int, default=4, help="checkpoint reports per upload mode (default: %(default)s)")
    p.add_argument("--step-s", type=float, default=2.0,
                   help="seconds of 'training' between reports, while an upload runs (default: %(default)s)")
    args = p.parse_args(argv)
    from tests.harness import s3_server  # the same moto server the tests start on 127.0.0.1

    with tempfile.TemporaryDirectory() as root, s3_server(root) as s3:
        os.environ.update(s3.env)
        bucket = s3.create_bucket("bench")
        with tempfile.TemporaryDirectory() as work:
            size = student_checkpoint(Path(work))
        print(f"student checkpoint (ResNet-50, cuhk_sysu preset, with SGD momentum): {size / 2**20:.0f} MiB",
              flush=True)
        times = storage_figures(bucket, args.repeats)
        for key, values in times.items():
            print(f"{key:20s} {statistics.mean(values):6.2f} s  (±{statistics.pstdev(values):.2f}, "
                  f"{size / 2**20 / statistics.mean(values):6.0f} MiB/s, {args.repeats} rounds)", flush=True)
        waits = report_waits(bucket, size, args.reports, args.step_s)
        for mode, values in waits.items():
            steady = values[1:] or values  # the first report also sets up the run's storage
            print(f"ray.train.report, {mode:5s} upload: worker waits {statistics.mean(steady):6.2f} s per "
                  f"checkpoint (reports 2..{len(values)}; first {values[0]:.2f} s)", flush=True)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
