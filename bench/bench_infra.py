"""Costs of the training infrastructure: checkpoint save/load and MLflow tracking calls.

    .venv/bin/python bench/bench_infra.py [--with-server] [--repeats 3]

- checkpoint: ``TrainingState.capture`` + ``save_checkpoint`` and ``load_checkpoint`` + restore of
  a ResNet-50 with SGD momentum (the student's backbone size), median of ``--repeats``.
- tracking: ``Tracker.log_metrics`` per call (5 metrics) against a local SQLite store, against a
  real ``mlflow server`` on 127.0.0.1 (``--with-server``), and against a closed port while the
  tracker backs off (the cost training pays while MLflow is down).
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkd_ray.tracking import Tracker  # noqa: E402
from dkd_ray.train.checkpoint import TrainingState, load_checkpoint, save_checkpoint  # noqa: E402


def bench_checkpoint(repeats: int) -> dict[str, float]:
    model = torchvision.models.resnet50(weights=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()  # creates the momentum buffers
    saves, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            start = time.perf_counter()
            state = TrainingState.capture(model, optimizer, epoch=1, iteration=100, config={})
            save_checkpoint(state, tmp)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            load_checkpoint(tmp).restore(model, optimizer)
            loads.append(time.perf_counter() - start)
        size_mb = (Path(tmp) / "state.pt").stat().st_size / 2**20
    return {"save_s": statistics.median(saves), "load_restore_s": statistics.median(loads),
            "size_mib": size_mb}


def bench_tracker(uri: str, calls: int, **kwargs) -> float:
    """Median seconds per log_metrics call."""
    tracker = Tracker("synthetic", "bench", uri=uri, **kwargs)
    tracker.start()
    times = []
    for step in range(calls):
        start = time.perf_counter()
        tracker.log_metrics({f"m{i}": step * 0.1 + i for i in range(5)}, step=step)
        times.append(time.perf_counter() - start)
    tracker.end()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--with-server", action="store_true", help="also time a real mlflow server")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"python {platform.python_version()}, torch {torch.__version__}")

    ck = bench_checkpoint(args.repeats)
    print(f"checkpoint ResNet-50 + SGD momentum ({ck['size_mib']:.0f} MiB): "
          f"capture+save {ck['save_s']:.2f} s, load+restore {ck['load_restore_s']:.2f} s")

    from tests.harness import closed_port_uri, mlflow_server

    with tempfile.TemporaryDirectory() as tmp:
        sqlite = bench_tracker(f"sqlite:///{tmp}/mlflow.db", args.calls)
        print(f"Tracker.log_metrics (5 metrics) to local SQLite: {sqlite * 1e3:.1f} ms/call")
        if args.with_server:
            with mlflow_server(Path(tmp) / "server") as server:
                remote = bench_tracker(server.uri, args.calls)
            print(f"Tracker.log_metrics (5 metrics) to mlflow server on 127.0.0.1: "
                  f"{remote * 1e3:.1f} ms/call")
    offline = bench_tracker(closed_port_uri(), args.calls * 20, retry_after_s=3600)
    print(f"Tracker.log_metrics while MLflow is unreachable (backing off): {offline * 1e6:.1f} us/call")


if __name__ == "__main__":
    main()
