"""Ray Train wiring: the one place a TorchTrainer is built.

Every job (and every Tune trial) runs a loop function from ``teacher_loop``/``student_loop``
through ``fit``: ``ScalingConfig`` from the config (workers, GPUs, CPUs per worker), DDP over NCCL
on GPUs and gloo on CPUs, checkpoints in ``storage_path/name`` (a local folder, NFS or S3), and
restarts of a failed run from its latest checkpoint (bad input and aborts are never retried).
Submitting the same ``name`` and ``storage_path`` again resumes the run (Ray Train V2 reloads its
checkpoint state).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dkd_ray.config import Config
from dkd_ray.storage import absolute, is_remote, join
from dkd_ray.train.common import TrainingAborted

log = logging.getLogger(__name__)


def init_ray(address: str | None = None) -> None:
    """Join the job's cluster under ``ray job submit`` (RAY_ADDRESS), else start a local one with
    its dashboard on 127.0.0.1. The dashboard is not only for watching: Ray Train's
    placement-group cleaner asks its state API whether a Train run's controller is alive, to free
    the workers of a run whose driver died (how Tune stops a trial early); without it the
    cleaner cannot work and warns every few seconds."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address or os.environ.get("RAY_ADDRESS"):
        kwargs["address"] = address or os.environ["RAY_ADDRESS"]
    else:
        kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1")
    # Workers need the driver's environment (MLflow location, pipeline id) and the package on
    # the path; under `ray job submit` the job's own runtime env already carries some of these,
    # and Ray refuses to set a key twice.
    job_env = _job_runtime_env_vars()
    env = {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "DKD_")) and k not in job_env}
    if "PYTHONPATH" not in job_env:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                          os.environ.get("PYTHONPATH", "")]))
    ray.init(runtime_env={"env_vars": env}, **kwargs)  # prints the dashboard's address


def _job_runtime_env_vars() -> dict[str, str]:
    """Environment variables the submitted job's runtime env sets (empty outside a Ray job)."""
    import json

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job_config = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    return dict((job_config.get("runtime_env") or {}).get("env_vars") or {})


def use_gpu(cfg: Config) -> bool:
    if cfg.train.use_gpu == "false":
        return False
    import ray

    available = ray.cluster_resources().get("GPU", 0) > 0
    if cfg.train.use_gpu == "true" and not available:
        raise RuntimeError("--use-gpu true, but the Ray cluster has no GPU")
    return available


def fit(loop: Callable[[dict[str, Any]], Any], loop_config: dict[str, Any], cfg: Config, *, name: str,
        storage_path: str | Path, callbacks: list | None = None):
    """Run ``loop`` on ``cfg.train.num_workers`` Ray Train workers; returns the ``ray.train.Result``.

    Failures are retried here, not inside Ray Train, so that a deterministic one is not: a worker
    that raises bad input (``InputError``: a dataset, config, bank or model reference) or a
    ``TrainingAborted`` fails the run at once with that exception, its class and message intact;
    anything else (a lost worker or node) restarts the run from its latest checkpoint (same name
    and storage: Ray Train V2 reloads it) up to ``train.max_failures`` times (-1: no limit)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

    gpu = use_gpu(cfg)
    loop_config = {**loop_config, "config": {**loop_config["config"],
                                            "train": {**loop_config["config"]["train"], "use_gpu": str(gpu).lower()}}}
    storage = absolute(storage_path)
    if not is_remote(storage):  # lets a restarted worker find checkpoints Ray had not registered yet
        loop_config["run_dir"] = str(Path(storage) / name)
    loop_config["run_uri"] = join(storage, name)  # where its checkpoints go (a failed copy is removed there)
    log.info("Ray Train run %s: %d worker(s), %s, storage %s", name, cfg.train.num_workers,
             "GPU/NCCL" if gpu else "CPU/gloo", storage)
    budget = cfg.train.max_failures if cfg.train.max_failures >= 0 else 10**9
    for failures in range(budget + 1):
        trainer = TorchTrainer(
            StopOnAbort(loop),
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=gpu,
                                         resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                                               **({"GPU": 1} if gpu else {})}),
            run_config=RunConfig(name=name, storage_path=storage, callbacks=callbacks,
                                 failure_config=FailureConfig(max_failures=0),  # retried by this loop
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        try:
            result = trainer.fit()
            break
        except TrainingFailedError as error:
            deterministic = deterministic_failure(error)
            if deterministic is not None:
                raise deterministic from None
            # Only the workers' failures are retried, as Ray Train's own policy does: a controller
            # error is Ray's to handle (it retries the retryable ones itself), and it is also how a
            # Tune trial that ASHA stopped ends (its report callback raises), which must stay stopped.
            if not isinstance(error, WorkerGroupError) or failures == budget:
                raise
            log.warning("Ray Train run %s failed (%s); restarting from its latest checkpoint (failure %d of at "
                        "most %s)", name, _first_line(error), failures + 1,
                        cfg.train.max_failures if cfg.train.max_failures >= 0 else "unlimited")
    aborted = (result.metrics or {}).get(ABORTED)
    if aborted:
        raise TrainingAborted(f"Ray Train run {name}: {aborted}")
    return result


def deterministic_failure(error: BaseException) -> BaseException | None:
    """The first worker's (lowest rank) bad-input or abort exception inside a Ray Train failure,
    unwrapped from Ray's wrappers; None for failures a retry may cure."""
    from dkd_ray.errors import InputError

    causes = [e for _, e in sorted((getattr(error, "worker_failures", None) or {}).items())]
    causes.append(getattr(error, "controller_failure", None))
    for cause in causes:
        seen: set[int] = set()
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            if isinstance(cause, (InputError, TrainingAborted)):
                return cause
            # Ray Train wraps a worker's exception (_base_exc), Ray core a task's (cause)
            cause = (getattr(cause, "_base_exc", None) or getattr(cause, "cause", None) or cause.__cause__
                     or cause.__context__)
    return None


def _first_line(error: BaseException) -> str:
    """``rank 1: ActorDiedError: ...`` for a worker failure, else the error's first line."""
    for rank, cause in sorted((getattr(error, "worker_failures", None) or {}).items()):
        cause = getattr(cause, "_base_exc", None) or cause
        text = next((line for line in str(cause).splitlines() if line.strip()), "")
        return f"rank {rank}: {type(cause).__name__}: {text}"[:300]
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


ABORTED = "aborted"


class StopOnAbort:
    """Wraps a training loop: a ``TrainingAborted`` raised by every rank (a deterministic failure)
    is reported as the run's last result (with an ``aborted`` checkpoint saying why) and the workers
    return normally; ``fit`` then raises it on the driver, once. Lost workers and other errors
    still raise, and ``fit`` retries them."""

    def __init__(self, loop: Callable[[dict[str, Any]], Any]) -> None:
        self.loop = loop
        self.__name__ = getattr(loop, "__name__", "train_loop")

    def __call__(self, config: dict[str, Any]) -> Any:
        import tempfile

        import ray.train

        try:
            return self.loop(config)
        except TrainingAborted as error:
            # With a checkpoint: Result.metrics are those of the latest checkpoint. It holds no
            # training state (no meta.json), so resuming still picks the last real checkpoint.
            with tempfile.TemporaryDirectory(prefix="dkd-aborted-") as tmp:
                checkpoint = None
                if ray.train.get_context().get_world_rank() == 0:
                    Path(tmp, "ABORTED.txt").write_text(f"{error}\n")
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({ABORTED: str(error)}, checkpoint=checkpoint, checkpoint_dir_name="aborted")
            return None
