"""Run a sweep end to end from its driver (``jobs/tune_distill.py``).

    <storage>/<sweep>/sweep.json     what --resume needs: settings, parent run, teacher, bank, champion
                     /<sweep>-teacher the sweep's teacher (Ray Train run; its bank/ serves every trial)
                     /tune/           the Tune experiment (Tuner.restore reads it)
                     /trials/trial-<id>/  each trial's Ray Train run and checkpoints
                     /summary/        trials.md, trials.csv, metric_vs_params.png
                     /evaluation/     the champion's test-protocol files (results.jsonl, plots)

A student sweep trains one teacher (or takes ``--teacher``) and builds one knowledge bank before
any trial starts; every trial reads that bank. All trials train on the same identity-disjoint
training view and report ``val/`` metrics on its held-out identities; only the champion is
evaluated on the test set.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dkd_ray.config import Config
from dkd_ray.search_space import SearchSpace
from dkd_ray import storage

log = logging.getLogger(__name__)

DEFAULT_VALIDATION_FRACTION = 0.2
# The trial function only drives its Ray Train run, whose workers hold the CPUs/GPUs. Tune
# refuses an empty request, and a sliver of a CPU would make a trial that uses every CPU of the
# cluster unschedulable, so it asks for a little memory only.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 64 * 2**20}
# How stale Tune's experiment state in the storage may get (Tune's default is 5 minutes). When the
# driver dies without a goodbye (SIGKILL, a lost head pod), --resume sees the trials as they stood
# then: a trial that finished in the last few seconds is restored from its final checkpoint and
# ends at once. The state is a few small JSON files, so syncing often costs little.
EXPERIMENT_SYNC_PERIOD_S = 10


class SweepError(RuntimeError):
    """The sweep cannot start or resume as asked (the message says why and what to do)."""


@dataclass
class SweepOutcome:
    name: str
    sweep_uri: str
    interrupted: bool
    trials: list = field(default_factory=list)  # TrialSummary, ranked
    champion: dict[str, Any] | None = None
    summary_files: list[Path] = field(default_factory=list)
    parent_run_id: str | None = None


def sweep_config(space: SearchSpace, cfg: Config) -> Config:
    """The config every trial starts from: a validation split is required (never the test set)."""
    cfg = cfg.copy()
    if cfg.data.validation_fraction <= 0:
        cfg.data.validation_fraction = DEFAULT_VALIDATION_FRACTION
    return cfg.validate()


def planned_epochs(cfg: Config, stage: str) -> int:
    return cfg.teacher.epochs if stage == "teacher" else cfg.student.epochs


def _scheduler(space: SearchSpace, epochs: int, sweep_uri: str):
    if space.scheduler["type"] == "none":
        return None
    from dkd_ray.sweep.scheduler import ResumableASHA

    # stop_last_trials=False: a trial that reaches max_t ends on its own, with its Train run's
    # final checkpoint registered, rather than being killed on its last report.
    return ResumableASHA(state_file=storage.join(sweep_uri, "scheduler.pkl"), time_attr="epoch",
                         max_t=space.scheduler.get("max_t", epochs), grace_period=space.scheduler["grace_period"],
                         reduction_factor=space.scheduler["reduction_factor"], stop_last_trials=False)


def _concurrency(space: SearchSpace, cfg: Config) -> int:
    """At most as many trials as the cluster holds at once (each trial: its Train workers)."""
    if space.max_concurrent:
        return space.max_concurrent
    import ray

    from dkd_ray.train.runner import use_gpu

    resources = ray.cluster_resources()
    if use_gpu(cfg):
        fits = resources.get("GPU", 0) // cfg.train.num_workers
    else:
        fits = resources.get("CPU", 0) // (cfg.train.num_workers * cfg.train.cpus_per_worker)
    return max(1, int(fits))


def _start(space: SearchSpace, cfg: Config, *, name: str, sweep_uri: str, data_root: Path,
           experiment: str, teacher_ref: str) -> dict[str, Any]:
    """A new sweep: its parent run and its settings file (sweep.json)."""
    from dkd_ray.tracking import Tracker, tracking_uri
    from dkd_ray.tracking.lineage import sweep_description, sweep_view

    parent = Tracker(cfg.data.dataset, "tune_distill", experiment=experiment, run_name=name,
                     tags={"preset": cfg.preset, "sweep": name, "stage": space.stage})
    parent.start()
    parent.log_config(cfg)
    parent.log_params({"sweep.metric": space.metric, "sweep.mode": space.mode, "sweep.num_samples": space.num_samples,
                       "sweep.scheduler": space.scheduler["type"]})
    parent.log_artifact(space.path, "search_space")
    parent.set_description(sweep_description(sweep_view(parent, name, space.metric, sorted(space.space), space.mode)))
    settings = {"name": name, "stage": space.stage, "metric": space.metric, "mode": space.mode,
                "config": cfg.to_dict(), "data_root": str(data_root), "experiment": experiment,
                "tracking_uri": tracking_uri(), "parent_run_id": parent.run_id,
                "trials_storage": storage.join(sweep_uri, "trials"), "teacher_ref": teacher_ref, "bank_path": "",
                "search_space": str(space.path)}
    storage.write_json(storage.join(sweep_uri, "sweep.json"), settings)
    parent.flush()  # the run stays RUNNING in the UI until the sweep ends; its id lives in sweep.json
    return settings


def _teacher_and_bank(settings: dict[str, Any], cfg: Config, data_root: Path, sweep_uri: str) -> None:
    """Student sweeps: one teacher and one knowledge bank for all trials, recorded in sweep.json."""
    from dkd_ray.stages import resolve_bank, train_teacher_stage

    if settings["stage"] != "student" or settings["bank_path"]:
        return
    if not (cfg.distill.enabled and cfg.distill.use_bank):
        if not settings["teacher_ref"]:
            raise SweepError("a student sweep without the knowledge bank needs --teacher (the online teacher)")
        return
    if settings["teacher_ref"]:
        log.warning("teacher %s was given: if it trained on the held-out validation identities, validation "
                    "scores are optimistic (the test protocol of the champion is not affected)", settings["teacher_ref"])
        bank = resolve_bank(cfg, settings["teacher_ref"], data_root, storage_path=sweep_uri,
                            run_name=f"{settings['name']}")
    else:
        log.info("training the sweep's teacher (on the training view: held-out identities stay unseen)")
        stage = train_teacher_stage(cfg, data_root, storage_path=sweep_uri, experiment=settings["experiment"],
                                    run_name=f"teacher-{settings['name']}", parent_run_id=settings["parent_run_id"],
                                    register=False)
        settings["teacher_ref"], bank = str(stage.checkpoint), stage.bank_path
    settings["bank_path"] = str(bank)
    storage.write_json(storage.join(sweep_uri, "sweep.json"), settings)
    log.info("knowledge bank for every trial: %s", bank)


def _tuner(space: SearchSpace, cfg: Config, settings: dict[str, Any], sweep_uri: str):
    from ray import tune

    from dkd_ray.sweep.mlflow_runs import TrialRuns
    from dkd_ray.sweep.trial import run_trial

    trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings), TRIAL_DRIVER_RESOURCES)
    tune_path = storage.join(sweep_uri, "tune")
    if tune.Tuner.can_restore(tune_path):
        log.info("resuming the Tune experiment in %s (finished trials are kept)", tune_path)
        return tune.Tuner.restore(tune_path, trainable=trainable, param_space=space.to_tune(),
                                  resume_unfinished=True, restart_errored=True)
    epochs = planned_epochs(cfg, space.stage)
    callback = TrialRuns(dataset=cfg.data.dataset, experiment=settings["experiment"],
                         parent_run_id=settings["parent_run_id"], epochs=epochs,
                         runs_file=storage.join(sweep_uri, "trial_runs.json"), tracking_uri=settings["tracking_uri"])
    concurrency = _concurrency(space, cfg)
    log.info("Tune: %d sample(s) of %s, at most %d trial(s) at once, %s on %s", space.num_samples,
             sorted(space.space), concurrency, space.scheduler["type"], space.metric)
    return tune.Tuner(
        trainable, param_space=space.to_tune(),
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, num_samples=space.num_samples,
                                    scheduler=_scheduler(space, epochs, sweep_uri), max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name="tune", storage_path=sweep_uri, callbacks=[callback], verbose=1,
                                  sync_config=tune.SyncConfig(sync_period=EXPERIMENT_SYNC_PERIOD_S)))


def _interrupted(space: SearchSpace, settings: dict[str, Any], sweep_uri: str) -> bool:
    """Whether the Tune run ended before all its trials did (Ctrl-C, SIGUSR1). Read from the state
    Tune saved: in memory, an interrupted trial is marked terminated when Tune cleans up."""
    from ray import tune

    from dkd_ray.sweep.trial import run_trial

    saved = tune.Tuner.restore(storage.join(sweep_uri, "tune"),
                               trainable=tune.with_parameters(run_trial, settings=settings)).get_results()
    return len(saved) < space.num_trials or saved.num_terminated + saved.num_errors < len(saved)


def run_sweep(space: SearchSpace, cfg: Config, *, name: str, data_root: Path, storage_path: str, experiment: str,
              teacher_ref: str = "", resume: bool = False, local_dir: Path | None = None) -> SweepOutcome:
    """Run (or resume) the sweep ``name`` under ``storage_path``; see the module docstring."""
    from dkd_ray.sweep.champion import crown, pick_champion, trial_summaries
    from dkd_ray.sweep.summary import rank_trials, write_sweep_summary
    from dkd_ray.sweep.trial import trial_config
    from dkd_ray.tracking import Tracker

    sweep_uri = storage.join(storage_path, name)
    settings = storage.read_json(storage.join(sweep_uri, "sweep.json"))
    if resume and settings is None:
        raise SweepError(f"--resume {name}: no sweep.json in {sweep_uri} (same --storage-path as the first run?)")
    if not resume and settings is not None:
        raise SweepError(f"sweep {name!r} already exists in {sweep_uri}: continue it with --resume {name}, "
                         "or choose another --name")
    if settings is None:
        settings = _start(space, sweep_config(space, cfg), name=name, sweep_uri=sweep_uri, data_root=data_root,
                          experiment=experiment, teacher_ref=teacher_ref)
    cfg = Config.from_dict(settings["config"])  # on --resume, the sweep's own config
    _teacher_and_bank(settings, cfg, data_root, sweep_uri)

    grid = _tuner(space, cfg, settings, sweep_uri).fit()
    outcome = SweepOutcome(name, sweep_uri, interrupted=_interrupted(space, settings, sweep_uri),
                           parent_run_id=settings["parent_run_id"])
    runs = storage.read_json(storage.join(sweep_uri, "trial_runs.json")) or {}
    trials = trial_summaries(grid, settings["metric"], planned_epochs(cfg, settings["stage"]), runs,
                             settings["trials_storage"])
    outcome.trials = rank_trials(trials, settings["mode"])
    if outcome.interrupted:
        return outcome

    local = Path(local_dir or (Path("sweeps") / name if storage.is_remote(sweep_uri) else sweep_uri))
    log_scale = [k for k, (kind, _) in space.space.items() if kind == "loguniform"]
    outcome.summary_files = write_sweep_summary(trials, metric=settings["metric"], mode=settings["mode"],
                                                output_dir=local / "summary", log_scale=log_scale)
    parent = Tracker(cfg.data.dataset, "tune_distill", experiment=settings["experiment"],
                     uri=settings["tracking_uri"], run_id=settings["parent_run_id"], owns_run=True)
    parent.log_artifacts(local / "summary", "summary")
    parent.set_tags({"trials": len(trials), "stopped_early": sum(t.status == "stopped early" for t in trials),
                     "errored": sum(t.status == "error" for t in trials)})
    if settings.get("champion"):
        outcome.champion = settings["champion"]
        log.info("the champion was registered before the interruption: %s", outcome.champion.get("model_uri"))
    else:
        best = pick_champion(trials, settings["mode"])
        outcome.champion = crown(best, trial_config(settings, best.params), settings, data_root=data_root,
                                 storage_path=sweep_uri, output_dir=local / "evaluation")
        if outcome.champion.get("version") is None:
            log.error("the champion was not registered in MLflow (see the tracking warnings above); its "
                      "checkpoint stays at %s and jobs/evaluate.py --model takes it", outcome.champion["checkpoint"])
        settings["champion"] = outcome.champion
        storage.write_json(storage.join(sweep_uri, "sweep.json"), settings)
    champion_metrics = outcome.champion.get("metrics", {})
    parent.log_metrics({f"champion/{k}": v for k, v in champion_metrics.items()
                        if isinstance(v, (int, float)) and math.isfinite(v)})
    parent.set_tags({"champion_trial": outcome.champion["trial_id"], "champion_run_id": outcome.champion["run_id"],
                     "champion_model": outcome.champion.get("model_uri") or "",
                     "champion_version": outcome.champion.get("version") or ""})
    if storage.is_remote(sweep_uri):
        storage.upload_dir(local, sweep_uri)
    parent.end("FINISHED")
    return outcome
