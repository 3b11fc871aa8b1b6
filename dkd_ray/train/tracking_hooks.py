"""Per-epoch MLflow logging from inside a training run (rank 0 only, never fatal).

The job's driver creates the MLflow run and passes ``{"uri", "run_id", "dataset", "job"}`` as
``loop_config["mlflow"]`` (optionally ``retry_after_s``, ``max_retry_after_s``,
``close_timeout_s``, ``max_buffered_metrics``: the ``Tracker`` arguments); rank 0 attaches to that
run, so per-epoch metrics appear live in the UI and a worker restarted by Ray keeps logging into
the same run.

The loop calls ``tracker.close()`` when training ends: what waited for an MLflow outage is sent
then (a few tries, ``close_timeout_s`` at most), and what still cannot be sent is written to
``<run folder>/mlflow_pending.jsonl`` (the folder holding the checkpoints), with the command that
replays it in the log. Without that call the worker's pending values died with the worker.
"""

from __future__ import annotations

from typing import Any

from dkd_ray.train.session import Session

_TRACKER_OPTIONS = ("retry_after_s", "max_retry_after_s", "close_timeout_s", "max_buffered_metrics")


class _NoTracker:
    def log_metrics(self, metrics, step=None) -> None:
        return None

    def close(self, *args, **kwargs) -> None:
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def epoch_tracker(loop_config: dict[str, Any], session: Session):
    """Rank 0's ``Tracker`` attached to the driver's run (a no-op one elsewhere); close it at the end."""
    settings = loop_config.get("mlflow")
    if not settings or not session.is_main or not settings.get("run_id"):
        return _NoTracker()
    from dkd_ray.tracking import Tracker

    # Where a spool goes: the run's folder on (shared) storage, else the in-process checkpoint folder.
    folder = (loop_config.get("run_dir") or getattr(session, "run_dir", None) or loop_config.get("checkpoint_root")
              or getattr(session, "checkpoint_root", None))
    options = {k: settings[k] for k in _TRACKER_OPTIONS if settings.get(k) is not None}
    return Tracker(settings.get("dataset", "unknown"), settings.get("job", "train"), run_id=settings["run_id"],
                   uri=settings.get("uri"), experiment=settings.get("experiment"),
                   checkpoint_dir=None if folder is None else str(folder), **options)
