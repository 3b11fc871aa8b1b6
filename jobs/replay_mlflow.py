#!/usr/bin/env python
"""Send an MLflow spool into its run once the tracking server answers again.

When the tracking server cannot be reached at the end of a training loop or a job, the tracker
writes what it could not send (params, tags, metric values with their original steps and
timestamps, artifact paths, models with the checkpoint that holds their weights and what their
registration needs, the run's end status) to a spool file next to the checkpoints,
``<checkpoint folder>/mlflow_pending.jsonl``, and logs this command with the file's path:

  python jobs/replay_mlflow.py --spool runs/teacher-20250101-120000/mlflow_pending.jsonl \\
      --tracking-uri http://mlflow.internal:5000

The run the spool names receives everything (a run that could not be created yet is created in
its experiment); a model is rebuilt from its checkpoint (weights only), logged and registered
under the registry's rules (a version only with a finite headline mAP). Replaying again is harmless: metric values with the same step and timestamp are
stored once, params already set with the same value are skipped. When done the file is renamed
<spool>.replayed. Exit status 0 when replayed, 1 when the server did not answer (the spool is left
unchanged: run the command again later), 2 for bad input (one line `error: ...` on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dkd_ray.cli import exits_on_bad_input, fail  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every bad input of the jobs
        fail(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="replay_mlflow.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spool", required=True, type=Path, metavar="FILE",
                   help="the spool file the tracker wrote (mlflow_pending.jsonl)")
    p.add_argument("--tracking-uri", default="", metavar="URI",
                   help="the tracking server (default: the URI recorded in the spool, else MLFLOW_TRACKING_URI); "
                        "needed when the recorded URI held credentials, which spools never store")
    return p


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import logging

    from dkd_ray.tracking.spool import ReplayUnreachable, replay

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retries: the outcome is reported below
    try:
        report = replay(args.spool, uri=args.tracking_uri or None)
    except ReplayUnreachable as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr, flush=True)
        return 1
    print(report.describe(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
