"""MLflow runs, model logging, the model registry and model loading.

Where runs go: ``tracking_uri()`` is ``MLFLOW_TRACKING_URI`` when set (a tracking server on a
cluster), else a SQLite store ``<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts``, which
``mlflow ui --backend-store-uri sqlite:///mlflow.db`` (run in the same folder) shows. Resolve it
once in the job's driver and hand it to the Ray workers (``Tracker(uri=...)``): a worker's
working directory is Ray's, not the user's.

Layout: one experiment per dataset (``dkd-ray/<dataset>``, or ``--experiment``), one run per job.
The runs of one pipeline (teacher, knowledge bank, student, evaluation) share the tag
``pipeline_id`` (``DKD_PIPELINE_ID`` in the environment, inherited by the jobs a pipeline
submits); filter them in the UI with ``tags.pipeline_id = '<id>'``. Tags are used rather than
nesting because the stages are separate Ray jobs; Tune trials, which do share a driver, are
nested under the sweep's run with ``parent_run_id``.

Robustness: training never waits on MLflow. ``Tracker`` turns every call into a best effort:
when the server cannot be reached (at start or mid-run) it warns once, keeps params, tags,
metrics and artifact paths in memory, and tries again after a back-off (30 s, doubling up to
10 min), flushing what it kept once the server answers. MLflow's own HTTP retries are cut to
one retry and a 20 s timeout (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``..._TIMEOUT`` /
``..._BACKOFF_FACTOR``, unless the user set them) so a dead server costs seconds, not the
minutes of MLflow's defaults. Rank 0 tracks; other ranks get a disabled ``Tracker`` whose calls
return at once. Values of params whose names look secret (token, password, secret, api key,
credential) and the user:password part of URIs are never sent or logged.

Models: ``log_model`` writes one MLflow model holding
- the module serialised by ``mlflow.pytorch.log_model`` with a signature inferred from the input
  example: ``pt2`` (``torch.export``, a graph: loading runs no code) when the model exports,
  else ``pickle`` (the whole module; unpickling runs arbitrary code, so ``load_model`` refuses it
  unless given ``trust_pickle=True`` or ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true`` is set);
- ``extra_files/state_dict.pt`` and ``extra_files/config.json``: the weights as plain tensors and
  the config that rebuilds the architecture.
``load_model(ref, builder=...)`` prefers the second form: ``builder(config_dict)`` rebuilds the
module from this project's code and the weights are read with ``torch.load(weights_only=True)``
(safe, and it survives refactors that rename classes, which break pickles). Without a builder it
loads the serialised module (fine for pt2 from any source; pickle only from sources you trust).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # heavy imports stay lazy: importing dkd_ray must not import mlflow
    import numpy as np
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models.model import ModelInfo
    from torch import nn

logger = logging.getLogger(__name__)
T = TypeVar("T")

PIPELINE_ENV = "DKD_PIPELINE_ID"
PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"  # read here only when explicitly set
STATE_DICT_FILE = "state_dict.pt"
CONFIG_FILE = "config.json"
_HTTP_DEFAULTS = {  # MLflow's defaults (7 retries, 120 s timeout) could stall training ~4 min
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_SECRET_KEY = re.compile(r"token|passw|secret|api[_-]?key|access[_-]?key|private[_-]?key|credential",
                         re.IGNORECASE)
_SECRET_QUERY = re.compile(r"((?:token|passw\w*|secret|api[_-]?key|access[_-]?key|sig\w*)=)[^&]*",
                           re.IGNORECASE)
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


class ModelNotFoundError(LookupError):
    """A model reference (URI, run id, path) resolves to no model."""


# ------------------------------------------------------------------------------------ naming
def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def experiment_name(dataset: str) -> str:
    return f"dkd-ray/{dataset}"


def registered_model_name(role: str, dataset: str) -> str:
    """``dkd-teacher-<dataset>`` / ``dkd-student-<dataset>``."""
    if role not in ("teacher", "student"):
        raise ValueError(f"model role must be 'teacher' or 'student', got {role!r}")
    return f"dkd-{role}-{dataset}"


def version_tags(cfg: Any, metrics: Mapping[str, float] | None = None) -> dict[str, str]:
    """Tags for a registered model version: dataset, preset and the given metrics (mAP, top-1)."""
    tags = {"dataset": cfg.data.dataset, "preset": cfg.preset}
    tags.update({key: f"{float(value):.4f}" for key, value in (metrics or {}).items()})
    return tags


def new_pipeline_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


# ------------------------------------------------------------------------------------ secrets
def redact_uri(uri: str) -> str:
    """Drop ``user:password@`` and secret-looking query values from a URI."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable uri>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = _SECRET_QUERY.sub(r"\1***", parts.query)
    if netloc == parts.netloc and query == parts.query:
        return uri  # nothing secret; urlunsplit would also drop the empty netloc of sqlite:////abs
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Mask values of secret-looking keys and credentials inside URI-valued strings."""
    clean = {}
    for key, value in params.items():
        if _SECRET_KEY.search(str(key)):
            clean[key] = "***"
        elif isinstance(value, str) and "://" in value:
            clean[key] = redact_uri(value)
        else:
            clean[key] = value
    return clean


def _param_text(value: Any) -> str:
    if isinstance(value, (tuple, list)):  # the same form the CLI overrides accept: 40,70
        return ",".join(str(v) for v in value)
    return str(value)


# ------------------------------------------------------------------------------------ tracker
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
        if registered_name:
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


def _is_rejection(error: Exception) -> bool:
    """A 4xx answer: the server is up and refused this request (retrying would not help)."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and 400 <= error.get_http_status_code() < 500


def _short(error: Exception, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    text = re.sub(r"//[^/@\s]+@", "//***@", text)  # credentials inside URLs in the message
    return text if len(text) <= limit else text[:limit] + "..."


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


# ------------------------------------------------------------------------------------ models
def _log_model(model: nn.Module, name: str, input_example: np.ndarray, *, run_id: str,
               config: Any, tags: Mapping[str, Any] | None, serialization: str) -> ModelInfo:
    import mlflow.pytorch
    import numpy as np
    import torch
    import torchvision
    from mlflow.models import infer_signature

    from dkd_ray.train.checkpoint import cpu_copy, unwrap_model

    if serialization not in ("auto", "pt2", "pickle"):
        raise ValueError(f"serialization must be auto, pt2 or pickle, got {serialization!r}")
    model = unwrap_model(model)
    was_training = model.training
    device = next(model.parameters(), torch.empty(0)).device
    model.eval().cpu()  # logged on CPU so that it loads anywhere; moved back below
    example = np.asarray(input_example)
    try:
        with torch.no_grad():
            output = model(torch.from_numpy(example))
        signature = infer_signature(example, _numpy_output(output))
        # MLflow checks an input example by serving it, which needs one output tensor; a
        # detector returns per-image dicts, so it is described by its signature alone.
        served_example = example if isinstance(output, torch.Tensor) else None
        config_dict = config if isinstance(config, dict) or config is None else config.to_dict()
        with tempfile.TemporaryDirectory() as tmp:
            state_path, config_path = Path(tmp) / STATE_DICT_FILE, Path(tmp) / CONFIG_FILE
            torch.save(cpu_copy(model.state_dict()), state_path)
            config_path.write_text(json.dumps(config_dict or {}, indent=2, sort_keys=True))

            def log(fmt: str) -> ModelInfo:
                return mlflow.pytorch.log_model(
                    model, name=name, input_example=served_example, signature=signature,
                    serialization_format=fmt, extra_files=[str(state_path), str(config_path)],
                    tags=dict(tags or {}), run_id=run_id,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                      f"torchvision=={torchvision.__version__.split('+')[0]}",
                                      f"numpy=={np.__version__}"])

            if serialization != "auto":
                return log(serialization)
            try:
                return log("pt2")
            except Exception as error:  # noqa: BLE001 - torch.export cannot trace every model
                if not _is_export_failure(error):
                    raise
                logger.warning("torch.export could not trace %r (%s); logging it as a pickle "
                               "(load it with builder=... for weights-only loading)", name, _short(error))
                return log("pickle")
    finally:
        model.to(device).train(was_training)


def _is_export_failure(error: Exception) -> bool:
    """Anything but a failure to reach MLflow: torch.export raises many error types."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, OSError):  # includes requests' connection errors and timeouts
        return False
    return not (isinstance(error, MlflowException) and "API request to" in str(error))


def _numpy_output(output: Any) -> Any:
    """Model output as something ``infer_signature`` accepts (None when it has no tensor form)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output.detach().cpu().numpy()
    if isinstance(output, Mapping) and all(isinstance(v, torch.Tensor) for v in output.values()):
        return {k: v.detach().cpu().numpy() for k, v in output.items()}
    return None


def _use_uri(uri: str | None):
    import mlflow
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def register_model(model_uri: str, name: str, *, tags: Mapping[str, Any] | None = None,
                   alias: str | None = None, uri: str | None = None) -> ModelVersion:
    """Register ``model_uri`` as a new version of ``name`` (created if missing); tag and alias it."""
    import mlflow

    _use_uri(uri)
    version = mlflow.register_model(model_uri, name, await_registration_for=60,
                                    tags={k: str(v) for k, v in (tags or {}).items()})
    if alias:
        set_alias(name, alias, version.version, uri=uri)
    return version


def set_alias(name: str, alias: str, version: str | int, *, uri: str | None = None) -> None:
    """Point ``name@alias`` (e.g. ``champion``) at ``version``."""
    _use_uri(uri).set_registered_model_alias(name, alias, str(version))


def latest_registered(name: str, *, uri: str | None = None) -> ModelVersion | None:
    """The newest version of registered model ``name``, or None if it has none."""
    versions = _use_uri(uri).search_model_versions(f"name = '{name}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def load_model(ref: str | os.PathLike, *, builder: Callable[[dict], nn.Module] | None = None,
               map_location: Any = "cpu", uri: str | None = None,
               trust_pickle: bool = False) -> nn.Module:
    """Load a model from any of the places this project puts one.

    ``ref``: an MLflow model URI (``models:/name/3``, ``models:/name@champion``,
    ``runs:/<run id>/<name>``, ``models:/<model id>``), a bare run id (its only logged model),
    an MLflow model directory, or a checkpoint (a directory with ``state.pt`` or the file).
    ``builder(config_dict) -> nn.Module`` rebuilds the architecture; it is required for
    checkpoints and makes MLflow models load weights-only (see the module docstring).
    Without it, a pt2 model loads as a graph module; a pickled one only with ``trust_pickle``.
    """
    text = os.fspath(ref)
    path = Path(text).expanduser()
    if not _URI_SCHEME.match(text) and path.exists():
        return _load_local(path, builder, map_location, text, trust_pickle)
    if _URI_SCHEME.match(text):
        model_uri = text
    elif _RUN_ID.fullmatch(text):
        model_uri = _run_model_uri(text, uri)
    elif re.fullmatch(r"m-[0-9a-f]{32}", text):  # an MLflow 3 logged-model id
        model_uri = f"models:/{text}"
    else:
        raise ModelNotFoundError(
            f"model reference {text!r} is neither an existing path, an MLflow URI "
            "(models:/name/3, models:/name@alias, runs:/<run id>/<name>) nor a run id")
    return _load_local(_download(model_uri, uri), builder, map_location, text, trust_pickle)


def _download(model_uri: str, uri: str | None) -> Path:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    _use_uri(uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                    dst_path=tempfile.mkdtemp(prefix="dkd-model-"))
    except MlflowException as error:
        if _is_rejection(error):
            raise ModelNotFoundError(f"no model at {model_uri!r} in MLflow at "
                                     f"{redact_uri(uri or tracking_uri())}: {_short(error)}") from error
        raise
    return Path(local)


def _run_model_uri(run_id: str, uri: str | None) -> str:
    from mlflow.exceptions import MlflowException

    client = _use_uri(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if _is_rejection(error):
            raise ModelNotFoundError(f"no MLflow run {run_id!r} at "
                                     f"{redact_uri(uri or tracking_uri())}") from error
        raise
    outputs = run.outputs.model_outputs if run.outputs else []
    models = [client.get_logged_model(output.model_id) for output in outputs]
    models = [m for m in models if str(m.status).endswith("READY")]  # not failed attempts
    if len(models) == 1:
        return f"models:/{models[0].model_id}"
    if not models:
        raise ModelNotFoundError(f"MLflow run {run_id!r} logged no model")
    names = sorted(m.name for m in models)
    raise ModelNotFoundError(f"MLflow run {run_id!r} logged several models {names}; "
                             f"pick one with runs:/{run_id}/<name>")


def _load_local(path: Path, builder: Callable[[dict], nn.Module] | None, map_location: Any,
                ref: str, trust_pickle: bool = False) -> nn.Module:
    from dkd_ray.train.checkpoint import STATE_FILE, load_checkpoint

    if path.is_file() or (path / STATE_FILE).is_file():
        if builder is None:
            raise ValueError(f"{ref!r} is a training checkpoint: pass builder=... to rebuild the "
                             "model from the config stored in it")
        state = load_checkpoint(path, map_location=map_location)
        return _build(builder, state.config, state.model, ref)
    if (path / "MLmodel").is_file():
        return _load_mlflow_dir(path, builder, map_location, ref, trust_pickle)
    raise ModelNotFoundError(f"{ref!r} holds no model: expected an MLflow model directory "
                             f"(with MLmodel) or a checkpoint ({STATE_FILE})")


def _load_mlflow_dir(path: Path, builder: Callable[[dict], nn.Module] | None, map_location: Any,
                     ref: str, trust_pickle: bool) -> nn.Module:
    import mlflow.pytorch
    import torch

    extra = path / "extra_files"
    if builder is not None and (extra / STATE_DICT_FILE).is_file():
        config = json.loads((extra / CONFIG_FILE).read_text()) if (extra / CONFIG_FILE).is_file() else {}
        weights = torch.load(extra / STATE_DICT_FILE, map_location=map_location, weights_only=True)
        return _build(builder, config, weights, ref)
    pickled = (path / "data" / "model.pth").is_file()
    if pickled and not (trust_pickle or os.environ.get(PICKLE_ENV, "").lower() in ("1", "true")):
        raise ValueError(
            f"{ref!r} was logged as a pickle; unpickling runs code, so it is refused: pass "
            f"builder=... (weights-only loading), or trust_pickle=True / {PICKLE_ENV}=true if "
            "you trust its source")
    return mlflow.pytorch.load_model(str(path), device=map_location)


def _build(builder: Callable[[dict], nn.Module], config: dict, weights: dict, ref: str) -> nn.Module:
    model = builder(config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(f"weights in {ref!r} do not fit the model built from its config: "
                         f"{_short(error, 600)}") from error
    return model.eval()
