"""Ray Train wiring: the one place a TorchTrainer is built.

Every job (and every Tune trial) runs a loop function from ``teacher_loop``/``student_loop``
through ``fit``: ``ScalingConfig`` from the config (workers, GPUs, CPUs per worker), DDP over NCCL
on GPUs and gloo on CPUs, checkpoints in ``storage_path/name`` (a local folder, NFS or S3), and
``FailureConfig`` restarting failed workers from the latest checkpoint. Submitting the same
``name`` and ``storage_path`` again resumes the run (Ray Train V2 reloads its checkpoint state).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dkd_ray.config import Config
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
    """Run ``loop`` on ``cfg.train.num_workers`` Ray Train workers; returns the ``ray.train.Result``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = use_gpu(cfg)
    loop_config = {**loop_config, "config": {**loop_config["config"],
                                            "train": {**loop_config["config"]["train"], "use_gpu": str(gpu).lower()}}}
    storage = str(storage_path) if "://" in str(storage_path) else str(Path(storage_path).resolve())
    if "://" not in storage:  # lets a restarted worker find checkpoints Ray had not registered yet
        loop_config["run_dir"] = str(Path(storage) / name)
    trainer = TorchTrainer(
        StopOnAbort(loop),
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    log.info("Ray Train run %s: %d worker(s), %s, storage %s", name, cfg.train.num_workers,
             "GPU/NCCL" if gpu else "CPU/gloo", storage)
    result = trainer.fit()
    aborted = (result.metrics or {}).get(ABORTED)
    if aborted:
        raise TrainingAborted(f"Ray Train run {name}: {aborted}")
    return result


ABORTED = "aborted"


class StopOnAbort:
    """Wraps a training loop: a ``TrainingAborted`` raised by every rank (a deterministic failure)
    is reported as the run's last result and the workers return normally, so Ray Train does not
    spend ``max_failures`` restarting into the same failure; ``fit`` then raises it on the driver.
    Lost workers and other errors still raise, and are retried."""

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
