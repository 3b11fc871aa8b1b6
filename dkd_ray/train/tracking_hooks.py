"""Per-epoch MLflow logging from inside a training run (rank 0 only, never fatal).

The job's driver creates the MLflow run and passes ``{"uri", "run_id", "dataset", "job"}`` as
``loop_config["mlflow"]``; rank 0 attaches to that run, so per-epoch metrics appear live in the
UI and a worker restarted by Ray keeps logging into the same run.
"""

from __future__ import annotations

from typing import Any

from dkd_ray.train.session import Session


class _NoTracker:
    def log_metrics(self, metrics, step=None) -> None:
        return None


def epoch_tracker(loop_config: dict[str, Any], session: Session):
    settings = loop_config.get("mlflow")
    if not settings or not session.is_main or not settings.get("run_id"):
        return _NoTracker()
    from dkd_ray.tracking import Tracker

    return Tracker(settings.get("dataset", "unknown"), settings.get("job", "train"), run_id=settings["run_id"],
                   uri=settings.get("uri"), experiment=settings.get("experiment"))
