"""``Tracker``: one MLflow run per job, best effort, buffered in memory while the server is away."""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

from dkd_ray.errors import InputError

from .errors import _is_rejection, _short
from .model_logging import CONFIG_FILE, _log_model
from .naming import PIPELINE_ENV, experiment_name, tracking_uri
from .redaction import _param_text, redact_params, redact_uri
from .registry import HEADLINE_TAG, finite_headline, register_model, set_alias

if TYPE_CHECKING:  # heavy imports stay lazy: importing dkd_ray must not import mlflow
    import numpy as np
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models.model import ModelInfo
    from torch import nn

logger = logging.getLogger(__name__)
T = TypeVar("T")

_HTTP_DEFAULTS = {  # MLflow's defaults (7 retries, 120 s timeout) could stall training ~4 min
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


class Tracker:
    """One MLflow run for one job; every call is best effort and never raises or hangs training.

    ``enabled=False`` (ranks other than 0) makes every method return None at once.
    ``run_id`` attaches to an existing run instead of creating one (the driver creates the run
    and passes its id to the workers, so Ray's worker restarts keep logging into the same run).
    """

    def __init__(self, dataset: str, job: str, *, experiment: str | None = None,
                 run_name: str | None = None, run_id: str | None = None, uri: str | None = None,
                 enabled: bool = True, pipeline_id: str | None = None,
                 parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None,
                 checkpoint_dir: str | None = None, retry_after_s: float = 30.0,
                 max_retry_after_s: float = 600.0, max_buffered_metrics: int = 200_000,
                 owns_run: bool | None = None):
        self.enabled = enabled
        self.uri = uri or tracking_uri()
        self.experiment = experiment or experiment_name(dataset)
        self.run_name = run_name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.checkpoint_dir = checkpoint_dir
        self._run_id = run_id
        self._owns_run = run_id is None if owns_run is None else owns_run  # end() sets the status
        self._tags = {"dataset": dataset, "job": job, **{k: str(v) for k, v in (tags or {}).items()}}
        pipeline_id = pipeline_id or os.environ.get(PIPELINE_ENV)
        if pipeline_id:
            self._tags["pipeline_id"] = pipeline_id
        if parent_run_id:
            self._tags["mlflow.parentRunId"] = parent_run_id
        self._retry_after_s, self._max_retry_after_s = retry_after_s, max_retry_after_s
        self._delay_s = retry_after_s
        self._next_try = 0.0
        self._offline = False
        self._start_ms: int | None = None
        self._client = None
        self._pending_params: dict[str, str] = {}
        self._pending_tags: dict[str, str] = {}
        self._pending_metrics: collections.deque = collections.deque(maxlen=max_buffered_metrics)
        self._pending_artifacts: list[tuple[str, str | None]] = []
        self._spool: Path | None = None  # local copies of log_dict artifacts until sent
        if enabled and self.uri.startswith(("http://", "https://")):
            for key, value in _HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)

    # -------------------------------------------------------------- lifecycle
    @property
    def run_id(self) -> str | None:
        """The MLflow run id, or None while the run could not be created (or when disabled)."""
        return self._run_id if self.enabled else None

    def start(self) -> str | None:
        """Create (or attach to) the run now; returns its id, or None if MLflow is unreachable."""
        if not self.enabled:
            return None
        self._start_ms = self._start_ms or int(time.time() * 1000)
        self._send("start the run", lambda: None)
        return self._run_id

    def __enter__(self) -> Tracker:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def end(self, status: str = "FINISHED") -> None:
        """Flush what is pending and mark the run finished (only a run this tracker created)."""
        if not self.enabled:
            return
        self._next_try = 0.0  # one last attempt, whatever the back-off says
        if self._owns_run:
            self._send("end the run", lambda: self._client.set_terminated(self._run_id, status))
        else:
            self.flush()
        if self._spool is not None and not self._pending_artifacts:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None
        if self._pending_metrics or self._pending_params or self._pending_artifacts:
            logger.warning("MLflow tracking at %s: %d metric values, %d params and %d artifacts "
                           "were never recorded; the checkpoints in %s are intact",
                           redact_uri(self.uri), len(self._pending_metrics),
                           len(self._pending_params), len(self._pending_artifacts),
                           self.checkpoint_dir or "the run's storage path")

    def flush(self) -> bool:
        """Send what is pending now (ignoring the back-off); True when nothing is left."""
        if not self.enabled:
            return True
        self._next_try = 0.0
        self._send("flush", lambda: None)
        return not (self._pending_metrics or self._pending_params or self._pending_tags
                    or self._pending_artifacts)

    # -------------------------------------------------------------- logging
    def log_config(self, cfg: Any) -> None:
        """Flat params (``cfg.to_flat_dict()``), dataset/preset tags and a ``config.json`` artifact."""
        if not self.enabled:
            return
        self.log_params(cfg.to_flat_dict())
        self.set_tags({"dataset": cfg.data.dataset, "preset": cfg.preset})
        self.log_dict(cfg.to_dict(), CONFIG_FILE)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self._pending_params.update({k: _param_text(v) for k, v in redact_params(params).items()})
        self._send("log params", lambda: None)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self._pending_tags.update({k: str(v) for k, v in redact_params(tags).items()})
        self._send("set tags", lambda: None)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Values may be floats, numpy or 0-d torch scalars; kept in memory while MLflow is away."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            self._pending_metrics.append(Metric(key, float(value), now, int(step or 0)))
        self._send("log metrics", lambda: None)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        self._pending_artifacts.append((str(path), artifact_path))
        self._send("log artifacts", lambda: None)

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.log_artifact(directory, artifact_path)  # a directory is uploaded recursively

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """A JSON artifact; written to a local spool first so it survives an outage."""
        if not self.enabled:
            return
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix="dkd-mlflow-spool-"))
        target = self._spool / artifact_file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(dict(dictionary), indent=2, sort_keys=True, default=str))
        folder = str(Path(artifact_file).parent)
        self.log_artifact(target, None if folder == "." else folder)

    def log_model(self, model: nn.Module, name: str, input_example: np.ndarray, *,
                  config: Any = None, registered_name: str | None = None,
                  version_tags: Mapping[str, Any] | None = None,
                  tags: Mapping[str, Any] | None = None, serialization: str = "auto",
                  alias: str | None = None) -> ModelInfo | None:
        """Log ``model`` (see the module docstring) and optionally register it as a new version.

        ``config``: a ``Config`` or dict stored as ``config.json`` for ``load_model(builder=...)``.
        ``serialization``: ``auto`` (pt2, falling back to pickle when torch.export fails),
        ``pt2`` or ``pickle``. ``input_example``: a batch for the signature (and for tracing).
        The model is logged from the CPU (so it loads anywhere) and moved back to its device.
        Returns MLflow's ``ModelInfo`` (``model_uri``, ``registered_model_version``) or None
        when MLflow could not be reached.
        """
        if not self.enabled:
            return None
        info = self._send(f"log model {name!r}", lambda: _log_model(
            model, name, input_example, run_id=self._run_id, config=config, tags=tags,
            serialization=serialization))
        if info is None:
            logger.warning("model %r was not logged to MLflow; the weights remain in the "
                           "checkpoints (%s)", name, self.checkpoint_dir or "the run's storage path")
            return None
        if registered_name and finite_headline(version_tags) is None:
            headline = (version_tags or {}).get(HEADLINE_TAG, "missing")
            logger.warning("model %r logged but NOT registered as %s: its %s is %s (a registered model needs a "
                           "finite one)", name, registered_name, HEADLINE_TAG, headline)
            self.set_tags({"registration": f"refused: {HEADLINE_TAG}={headline}"})
        elif registered_name:
            version = self.register_model(info.model_uri, registered_name, tags=version_tags,
                                          alias=alias)
            if version is not None:
                info.registered_model_version = version.version
        return info

    def register_model(self, model_uri: str, name: str, *, tags: Mapping[str, Any] | None = None,
                       alias: str | None = None) -> ModelVersion | None:
        if not self.enabled:
            return None
        return self._send(f"register {name!r}", lambda: register_model(
            model_uri, name, tags=tags, alias=alias, uri=self.uri))

    def set_alias(self, name: str, alias: str, version: str | int) -> bool:
        if not self.enabled:
            return False
        done = self._send(f"set alias {name}@{alias}",
                          lambda: set_alias(name, alias, version, uri=self.uri) or True)
        return bool(done)

    # -------------------------------------------------------------- the guard
    def _send(self, what: str, action: Callable[[], T]) -> T | None:
        """Run ``action`` after creating the run and flushing pending data; never raises."""
        if self._offline and time.monotonic() < self._next_try:
            return None  # in back-off: cheap no-op, data stays pending
        try:
            self._ensure_run()
            self._flush_pending()
            result = action()
        except Exception as error:  # noqa: BLE001 - tracking must never stop training
            if isinstance(error, InputError):  # refused by our own rules (registry.py), not by the server
                logger.warning("refused to %s: %s", what, error)
                return None
            if _is_rejection(error):
                logger.warning("MLflow rejected the request to %s: %s", what, _short(error))
                return None
            self._went_offline(what, error)
            return None
        if self._offline:
            self._offline = False
            self._delay_s = self._retry_after_s
            logger.warning("MLflow tracking at %s is reachable again; pending data was sent",
                           redact_uri(self.uri))
        return result

    def _went_offline(self, what: str, error: Exception) -> None:
        if not self._offline:
            logger.warning(
                "MLflow tracking at %s unreachable (%s: %s); training continues, checkpoints are "
                "kept in %s; metrics are buffered and retried every %.0f s or more",
                redact_uri(self.uri), what, _short(error),
                self.checkpoint_dir or "the run's storage path", self._delay_s)
        else:
            self._delay_s = min(self._delay_s * 2, self._max_retry_after_s)
        self._offline = True
        self._next_try = time.monotonic() + self._delay_s

    def _ensure_run(self) -> None:
        if self._client is None:
            import mlflow
            from mlflow import MlflowClient

            # log_model and register_model go through MLflow's process-wide URIs.
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_registry_uri(self.uri)
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        if self._run_id is not None:
            return
        experiment_id = _experiment_id(self._client, self.experiment, self.uri)
        run = self._client.create_run(experiment_id, start_time=self._start_ms or int(time.time() * 1000),
                                      tags=dict(self._tags), run_name=self.run_name)
        self._run_id = run.info.run_id
        logger.info("MLflow run %s (%s) in experiment %r at %s", self._run_id, self.run_name,
                    self.experiment, redact_uri(self.uri))

    def _flush_pending(self) -> None:
        from mlflow.entities import Metric, Param, RunTag

        def batches(items: list, size: int):
            return (items[i:i + size] for i in range(0, len(items), size))

        for chunk in batches(list(self._pending_params.items()), 100):  # MLflow's batch limits
            self._send_batch(params=[Param(k, v) for k, v in chunk])
            for key, _ in chunk:
                self._pending_params.pop(key, None)
        for chunk in batches(list(self._pending_tags.items()), 100):
            self._send_batch(tags=[RunTag(k, v) for k, v in chunk])
            for key, _ in chunk:
                self._pending_tags.pop(key, None)
        while self._pending_metrics:
            chunk = [self._pending_metrics[i] for i in range(min(1000, len(self._pending_metrics)))]
            self._send_batch(metrics=[m if math.isfinite(m.value) else
                                      Metric(m.key, float("nan"), m.timestamp, m.step) for m in chunk])
            for _ in chunk:
                self._pending_metrics.popleft()
        while self._pending_artifacts:
            path, artifact_path = self._pending_artifacts[0]
            if os.path.isdir(path):
                self._client.log_artifacts(self._run_id, path, artifact_path)
            elif os.path.exists(path):
                self._client.log_artifact(self._run_id, path, artifact_path)
            else:
                logger.warning("artifact %s no longer exists; not logged", path)
            self._pending_artifacts.pop(0)

    def _send_batch(self, **batch: list) -> None:
        try:
            self._client.log_batch(self._run_id, **batch)
        except Exception as error:
            if not _is_rejection(error):
                raise
            # A rejected batch (e.g. a param changed value) would block the queue forever.
            logger.warning("MLflow rejected %s; dropped: %s", ", ".join(batch), _short(error))


def _experiment_id(client: Any, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    location = _local_artifact_location(uri, name)
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another trial/job
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _local_artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts beside a SQLite store (``<db folder>/mlartifacts``); servers choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri[len("sqlite:///"):])
    return (database.parent.resolve() / "mlartifacts" / experiment).as_uri()
