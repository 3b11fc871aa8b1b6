"""ASHA whose rungs survive ``--resume``.

Tune saves its trials on interruption but not its scheduler's state, so a restored ASHA would
start with empty rungs and let through trials the interrupted sweep would have stopped. This
ASHA writes its state (the values recorded at each rung) next to the sweep after every change,
through the scheduler's own ``save``/``restore`` format, and reloads it when the restored
experiment hands it its first trial.
"""

from __future__ import annotations

import pickle

from ray.tune.schedulers import ASHAScheduler

from dkd_ray import storage


class ResumableASHA(ASHAScheduler):
    def __init__(self, *, state_file: str, **kwargs):
        super().__init__(**kwargs)
        self.state_file = state_file
        self._reloaded = False

    def _reload_once(self) -> None:
        if self._reloaded:
            return
        self._reloaded = True
        saved = storage.read_bytes(self.state_file)  # written by this sweep's driver, like Tune's own state
        if saved is not None:
            self.__dict__.update(pickle.loads(saved))

    def _persist(self) -> None:
        storage.write_bytes(self.state_file, pickle.dumps(self.__dict__))

    def on_trial_add(self, tune_controller, trial):
        self._reload_once()
        if trial.trial_id not in self._trial_info:  # a restored trial keeps its bracket
            super().on_trial_add(tune_controller, trial)
            self._persist()

    def on_trial_result(self, tune_controller, trial, result):
        self._reload_once()
        action = super().on_trial_result(tune_controller, trial, result)
        self._persist()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        self._reload_once()
        if trial.trial_id in self._trial_info:
            super().on_trial_complete(tune_controller, trial, result)
            self._persist()

    def on_trial_remove(self, tune_controller, trial):
        self._reload_once()
        if trial.trial_id in self._trial_info:
            super().on_trial_remove(tune_controller, trial)
            self._persist()
