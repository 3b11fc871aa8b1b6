"""The end of a sweep: rank its trials, evaluate the best one's final model on the test
protocol (the only time a sweep looks at the test set), log it in the trial's child run and
register it as ``dkd-<role>-<dataset>`` with the alias ``champion``.

Only trials that trained all their epochs compete: a trial the scheduler stopped early was behind
at a rung, and its final model is the under-trained one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dkd_ray.config import Config
from dkd_ray.sweep.summary import TrialSummary, has_finite_metric, rank_trials

log = logging.getLogger(__name__)

ALIAS = "champion"


def final_checkpoint(trials_storage: str, trial_id: str, reported: str) -> str:
    """The trial's newest complete checkpoint in its Train run's folder. The last result's
    ``checkpoint_path`` is not enough: a trial interrupted right after its last epoch ends, on
    resume, with that epoch's results replayed and no new checkpoint."""
    from dkd_ray import storage
    from dkd_ray.sweep.trial import trial_run_name
    from dkd_ray.train.session import newest_complete_checkpoint, newest_complete_checkpoint_uri

    run = storage.join(trials_storage, trial_run_name(trial_id))
    if not storage.is_remote(run):
        newest = newest_complete_checkpoint(Path(run))
        return str(newest) if newest is not None else reported
    newest = newest_complete_checkpoint_uri(run)
    if newest is not None:
        return newest
    if reported and "://" not in reported:  # Tune reports the path inside the store (bucket/key, no scheme)
        try:
            return storage.uri_of(trials_storage, reported)
        except ValueError:
            pass
    return reported


def trial_summaries(result_grid, metric: str, epochs: int, runs: dict[str, Any],
                    trials_storage: str) -> list[TrialSummary]:
    """One ``TrialSummary`` per trial of a finished Tune run (``runs``: trial id -> child run)."""
    out = []
    for result in result_grid:
        last = result.metrics or {}
        trial_id = str(last.get("trial_id") or Path(result.path).name)
        reported = int(last.get("epoch", 0))
        status = "error" if result.error else ("finished" if reported >= epochs else "stopped early")
        value = last.get(metric)
        out.append(TrialSummary(trial_id, status, reported, dict(result.config or {}),
                                float(value) if value is not None else None,
                                run_id=(runs.get(trial_id) or {}).get("run_id") or "",
                                checkpoint=final_checkpoint(trials_storage, trial_id, str(last.get("checkpoint_path", "")))))
    return out


def pick_champion(trials: list[TrialSummary], mode: str) -> TrialSummary:
    finished = [t for t in rank_trials(trials, mode) if t.status == "finished" and has_finite_metric(t)]
    if not finished:
        raise RuntimeError("no trial of the sweep finished all its epochs with a finite metric; nothing to register "
                           f"(statuses: {sorted({t.status for t in trials})})")
    return finished[0]


def crown(champion: TrialSummary, cfg: Config, settings: dict[str, Any], *, data_root: Path,
          storage_path: str, output_dir: Path) -> dict[str, Any]:
    """Evaluate ``champion`` on the test protocol, log and register it; returns what was done."""
    from dkd_ray.data import load_annotations
    from dkd_ray import storage
    from dkd_ray.stages import (StageResult, _layout, evaluate_model_stage, evaluation_folder, log_teacher_model,
                                report_student)
    from dkd_ray.tracking import Tracker
    from dkd_ray.train.evaluation import EvaluationArrays

    role = "teacher" if settings["stage"] == "teacher" else "student"
    if not champion.checkpoint or not storage.is_dir(champion.checkpoint):
        raise RuntimeError(f"the champion trial {champion.trial_id} has no final checkpoint folder "
                           f"({champion.checkpoint!r}); the sweep needs storage that the driver can read")
    log.info("champion: trial %s (%s = %.4f); evaluating it on the test protocol", champion.trial_id,
             settings["metric"], champion.metric)
    metrics, evaluated = evaluate_model_stage(cfg, data_root, champion.checkpoint, role, storage_path=storage_path,
                                              run_name=f"{settings['name']}-champion-{champion.trial_id}")
    tracker = Tracker(cfg.data.dataset, "tune_trial", experiment=settings["experiment"], uri=settings["tracking_uri"],
                      run_id=champion.run_id or None)
    stage = StageResult(role, champion.checkpoint, {}, run_id=champion.run_id)
    if role == "teacher":
        stage.metrics = {k: v for k, v in metrics.items() if k.startswith("teacher_gt/")}
        tracker.log_metrics(stage.metrics)
        log_teacher_model(stage, cfg, tracker, {k.removeprefix("teacher_gt/"): v for k, v in stage.metrics.items()},
                          alias=ALIAS)
    else:
        annotations = load_annotations(_layout(cfg), data_root, box_rule=cfg.data.box_rule)
        report_student(stage, cfg, annotations, EvaluationArrays.load(evaluation_folder(evaluated)),
                       settings.get("teacher_ref", ""), tracker, output_dir, alias=ALIAS,
                       bank_path=settings.get("bank_path") or None)
    tracker.end()
    return {"trial_id": champion.trial_id, "run_id": champion.run_id, "checkpoint": champion.checkpoint,
            "metrics": stage.metrics, "model_uri": stage.model_uri, "version": stage.registered_version}
