"""One Tune trial: a distributed Ray Train run of the same training loop the jobs use.

The trial function builds the trial's config (the sweep's config plus the sampled values), then
runs ``train_student`` or ``train_teacher`` through ``dkd_ray.train.runner.fit`` (a TorchTrainer
with its own workers and GPUs). ``EpochResults`` forwards each epoch's report, the one that
carries the validation metric, from the Train workers to Tune, where ASHA ranks it; mid-epoch
checkpoint reports stay inside the Train run. A restarted trial runs ``fit`` again with the same
run name and storage, so Ray Train resumes it from its latest checkpoint.
"""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from dkd_ray.config import Config


class EpochResults(TuneReportCallback):
    """Report to Tune only the results that hold the sweep's metric (the epoch-end evaluations)."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def trial_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def trial_config(settings: dict[str, Any], params: dict[str, Any]) -> Config:
    """The sweep's config with this trial's values; validated (a bad value names its key)."""
    cfg = Config.from_dict(settings["config"]).apply_overrides(params)
    cfg.train.eval_every_epochs = 1  # ASHA compares trials epoch by epoch
    return cfg


def run_trial(params: dict[str, Any], settings: dict[str, Any]) -> None:
    """Tune's function trainable. ``settings``: the sweep's fixed part (see ``driver.SweepSettings``)."""
    from ray import tune

    from dkd_ray.train.runner import fit

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(settings, params)
    if settings["stage"] == "teacher":
        from dkd_ray.train.teacher_loop import train_teacher as loop
    else:
        from dkd_ray.train.student_loop import train_student as loop
    name = trial_run_name(trial_id)
    loop_config = {"config": cfg.to_dict(), "data_root": settings["data_root"], "run_name": name,
                   "teacher_ref": settings.get("teacher_ref", ""), "bank_path": settings.get("bank_path", ""),
                   "tracking_uri": settings.get("tracking_uri", ""),  # where an online teacher's models:/ URI lives
                   "build_bank": False}
    fit(loop, loop_config, cfg, name=name, storage_path=settings["trials_storage"],
        callbacks=[EpochResults(settings["metric"])])
