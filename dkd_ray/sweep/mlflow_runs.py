"""MLflow for a sweep: a parent run, and a child run per trial kept by the Tune driver.

``TrialRuns`` is a Tune callback on the driver: when a trial starts it opens (or, after
``--resume``, reopens) the trial's child run with the swept values as params; each epoch's result
becomes that run's metrics at step = epoch; when the trial ends the run is closed as FINISHED
(all epochs), KILLED (stopped early by the scheduler, tagged ``stopped_early``) or FAILED.
Trial -> run ids are kept in the sweep's storage, so a resumed sweep logs into the same runs.
Every MLflow call goes through ``Tracker``: an unreachable server never stops the sweep.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray import tune

from dkd_ray import storage
from dkd_ray.tracking import Tracker
from dkd_ray.sweep.trial import trial_run_name

log = logging.getLogger(__name__)

LOGGED_PREFIXES = ("val/", "train/", "teacher_gt/")


def epoch_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The training and validation metrics of a Tune result (not Tune's bookkeeping)."""
    return {k: float(v) for k, v in result.items()
            if k.startswith(LOGGED_PREFIXES) and isinstance(v, (int, float)) and math.isfinite(float(v))}


class TrialRuns(tune.Callback):
    def __init__(self, *, dataset: str, experiment: str, parent_run_id: str | None, epochs: int,
                 runs_file: str, tracking_uri: str):
        self.dataset, self.experiment, self.parent_run_id = dataset, experiment, parent_run_id
        self.epochs, self.runs_file, self.tracking_uri = epochs, runs_file, tracking_uri
        self._trackers: dict[str, Tracker] = {}

    def __getstate__(self):  # Tune pickles its callbacks with the experiment; trackers reopen lazily
        return {**self.__dict__, "_trackers": {}}

    def _tracker(self, trial) -> Tracker:
        if trial.trial_id not in self._trackers:
            runs = storage.read_json(self.runs_file) or {}
            known = runs.get(trial.trial_id, {})
            tracker = Tracker(self.dataset, "tune_trial", experiment=self.experiment, uri=self.tracking_uri,
                              run_name=trial_run_name(trial.trial_id), run_id=known.get("run_id"), owns_run=True,
                              parent_run_id=self.parent_run_id, tags={"trial_id": trial.trial_id})
            tracker.start()
            self._trackers[trial.trial_id] = tracker
        return self._trackers[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        tracker = self._tracker(trial)
        runs = storage.read_json(self.runs_file) or {}
        starts = runs.get(trial.trial_id, {}).get("starts", 0) + 1  # > 1: resumed after an interruption
        runs[trial.trial_id] = {**runs.get(trial.trial_id, {}), "run_id": tracker.run_id, "starts": starts}
        storage.write_json(self.runs_file, runs)
        tracker.log_params({"trial_id": trial.trial_id, **trial.config})
        tracker.set_tags({"status": "running", "starts": starts})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = int(result.get("epoch", 0))
        runs = storage.read_json(self.runs_file) or {}
        known = runs.setdefault(trial.trial_id, {})
        metrics = epoch_metrics(result)
        if not metrics or epoch <= known.get("epochs_logged", 0):
            return  # a resumed trial repeats its last epoch's results; log each epoch once
        self._tracker(trial).log_metrics(metrics, step=epoch)
        known["epochs_logged"] = epoch
        storage.write_json(self.runs_file, runs)

    def on_trial_complete(self, iteration, trials, trial, **info):
        epochs = int((trial.last_result or {}).get("epoch", 0))
        stopped = epochs < self.epochs
        tracker = self._tracker(trial)
        tracker.set_tags({"status": "stopped early" if stopped else "finished", "stopped_early": str(stopped).lower(),
                          "epochs": epochs, "checkpoint": (trial.last_result or {}).get("checkpoint_path", "")})
        tracker.end("KILLED" if stopped else "FINISHED")
        self._trackers.pop(trial.trial_id, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        tracker = self._tracker(trial)
        tracker.set_tags({"status": "error"})
        tracker.end("FAILED")
        self._trackers.pop(trial.trial_id, None)
