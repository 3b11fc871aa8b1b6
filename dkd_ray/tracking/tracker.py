"""``Tracker``: one MLflow run per job, best effort, buffered while the server is away.

Nothing logged while the server is away is lost: params, tags, metric values (with the step and
timestamp they were logged at) and artifact paths wait in memory, past ``max_buffered_metrics``
metric values in a spool file (``spool.py``), and are sent in order once the server answers.
``close()`` (end of a training loop or of a job) retries for a bounded time and then writes what
is still pending to ``<checkpoint_dir>/mlflow_pending.jsonl`` with the command that replays it.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

from dkd_ray.errors import InputError

from .errors import _is_rejection, _short
from .model_logging import CONFIG_FILE
from .pending_model import ModelNotLogged, PendingModel
from .naming import (EXPERIMENT_KIND_TAG, NOTE_TAG, PIPELINE_ENV, SHARED_VIEW_TAG, TRAINING_KIND,
                     experiment_description, experiment_name, source_tags, tracking_uri)
from .redaction import _param_text, redact_params, redact_uri
from .registry import HEADLINE_TAG, finite_headline, register_model, set_alias
from .spool import (MetricTally, SpoolFile, create_spool, encode, metric_of, metric_record, replay_command,
                    run_record, usable_folder, write_lines)

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
CLOSE_TIMEOUT_ENV = "DKD_MLFLOW_CLOSE_TIMEOUT_S"  # default of Tracker(close_timeout_s=...): 30 s
_LIVE: weakref.WeakSet = weakref.WeakSet()  # trackers that may hold pending data at exit


class Tracker:
    """One MLflow run for one job; every call is best effort and never raises or hangs training.

    ``enabled=False`` (ranks other than 0) makes every method return None at once.
    ``run_id`` attaches to an existing run instead of creating one (the driver creates the run
    and passes its id to the workers, so Ray's worker restarts keep logging into the same run).
    ``retry_after_s`` / ``max_retry_after_s``: the back-off after the server stopped answering
    (doubling). ``max_buffered_metrics``: metric values kept in memory; more go to a spool file in
    ``checkpoint_dir`` (else a temporary folder). ``close_timeout_s``: how long ``close()`` keeps
    trying before it spools what is left (default ``$DKD_MLFLOW_CLOSE_TIMEOUT_S``, else 30 s).
    """

    def __init__(self, dataset: str, job: str, *, experiment: str | None = None,
                 run_name: str | None = None, run_id: str | None = None, uri: str | None = None,
                 enabled: bool = True, pipeline_id: str | None = None,
                 parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None,
                 checkpoint_dir: str | None = None, retry_after_s: float = 30.0,
                 max_retry_after_s: float = 600.0, max_buffered_metrics: int = 10_000,
                 close_timeout_s: float | None = None, owns_run: bool | None = None):
        self.enabled = enabled
        self.uri = uri or tracking_uri()
        self.experiment = experiment or experiment_name(dataset)
        self.run_name = run_name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.checkpoint_dir = None if checkpoint_dir is None else str(checkpoint_dir)
        self.close_timeout_s = _close_timeout(close_timeout_s)
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
        self._pending_metrics: collections.deque = collections.deque()  # never a maxlen: see _spill_metrics
        self._max_buffered_metrics = max(1, int(max_buffered_metrics))
        self._pending_artifacts: list[tuple[str, str | None]] = []
        self._pending_inputs: list[Any] = []  # mlflow DatasetInput entities (not spooled: see log_dataset)
        self._pending_models: list[PendingModel] = []  # log_model calls made during an outage
        self._experiment_id: str | None = None
        self._pending_end: tuple[str, int] | None = None  # set_terminated still to send (owned runs)
        self._end_queued = False
        self._artifact_dir: Path | None = None  # local copies of log_dict artifacts until sent
        self._spill: SpoolFile | None = None  # metric values past the memory bound, oldest first
        self._spill_failed = False
        self._temp_folder: Path | None = None
        self._late_metrics = MetricTally()  # what waited for the server, sent once it answered
        self._late: collections.Counter = collections.Counter()
        self._fresh: dict[str, Any] = {}  # what the call being made adds (not late when sent at once)
        self.spool_path: Path | None = None  # the spool the last close() left for the replay
        if enabled:
            _LIVE.add(self)
        if enabled and self.uri.startswith(("http://", "https://")):
            for key, value in _HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)

    # -------------------------------------------------------------- lifecycle
    @property
    def run_id(self) -> str | None:
        """The MLflow run id, or None while the run could not be created (or when disabled)."""
        return self._run_id if self.enabled else None

    @property
    def experiment_id(self) -> str | None:
        """The MLflow experiment's id once the run exists (None while MLflow is unreachable)."""
        if not self.enabled or self._run_id is None:
            return None
        if self._experiment_id is None and self._client is not None:  # a run attached to, not created
            try:
                self._experiment_id = self._client.get_run(self._run_id).info.experiment_id
            except Exception as error:  # noqa: BLE001 - best effort, like every call here
                logger.warning("could not read MLflow run %s (%s)", self._run_id, _short(error))
        return self._experiment_id

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
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def end(self, status: str = "FINISHED", timeout_s: float = 0.0) -> Path | None:
        """``close(status, timeout_s)`` with one last attempt by default (no waiting)."""
        return self.close(status, timeout_s)

    def close(self, status: str = "FINISHED", timeout_s: float | None = None) -> Path | None:
        """The end of the loop or job: send everything pending and, for a run this tracker created,
        mark it ``status``. Tries for up to ``timeout_s`` (default ``close_timeout_s``), a few
        attempts with growing pauses; if the server still does not answer, writes what is left to a
        spool file (``<checkpoint_dir>/mlflow_pending.jsonl``, else a temporary folder) and logs what
        was sent late, what is still pending and the command that replays it. Returns that file, or
        None when everything was sent. The tracker can be used again afterwards."""
        if not self.enabled:
            return None
        if self._owns_run and not self._end_queued:  # once: a second close does not change the status
            self._pending_end, self._end_queued = (status, int(time.time() * 1000)), True
        if self._has_pending():
            self.flush(self.close_timeout_s if timeout_s is None else timeout_s)
        if self._artifact_dir is not None and not self._pending_artifacts:
            shutil.rmtree(self._artifact_dir, ignore_errors=True)
            self._artifact_dir = None
        path = self._write_spool() if self._has_pending() else None
        self._report(path, timeout_s if timeout_s is not None else self.close_timeout_s)
        self._late_metrics, self._late = MetricTally(), collections.Counter()
        return path

    def flush(self, timeout_s: float = 0.0) -> bool:
        """Send what is pending now (ignoring the back-off), trying again for up to ``timeout_s``
        seconds while the server does not answer; True when nothing is left."""
        if not self.enabled:
            return True
        deadline = time.monotonic() + max(0.0, timeout_s)
        pause = min(1.0, max(timeout_s / 8, 0.05))
        while True:
            self._next_try = 0.0
            self._send("flush", lambda: None)
            remaining = deadline - time.monotonic()
            if not self._has_pending() or remaining <= 0:
                return not self._has_pending()
            time.sleep(min(pause, remaining))
            pause *= 2

    def pending(self) -> dict[str, int]:
        """What waits for the server now: counts of params, tags, metric values (memory and
        spool), artifacts, dataset inputs, models and the end status."""
        return {"params": len(self._pending_params), "tags": len(self._pending_tags),
                "metrics": len(self._pending_metrics) + (self._spill.unsent if self._spill else 0),
                "artifacts": len(self._pending_artifacts), "inputs": len(self._pending_inputs),
                "models": len(self._pending_models), "end": int(self._pending_end is not None)}

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
        fresh = {k: _param_text(v) for k, v in redact_params(params).items()}
        self._pending_params.update(fresh)
        self._send("log params", lambda: None, fresh={"params": set(fresh)})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        fresh = {k: str(v) for k, v in redact_params(tags).items()}
        self._pending_tags.update(fresh)
        self._send("set tags", lambda: None, fresh={"tags": set(fresh)})

    def set_description(self, text: str) -> None:
        """The run's description (Markdown, shown on its page in the UI)."""
        self.set_tags({NOTE_TAG: text})

    def save_view(self, key: str, view: Mapping[str, Any]) -> bool:
        """Store a runs-table view (``naming.saved_view``) in the experiment under ``key``, for
        ``naming.runs_view_link(experiment_id, key)``; True once stored."""
        if not self.enabled:
            return False
        return bool(self._send(f"save the runs view {key!r}", lambda: self._client.set_experiment_tag(
            self.experiment_id, SHARED_VIEW_TAG + key, json.dumps(dict(view))) or True))

    def log_dataset(self, name: str, source: str, digest: str, profile: Mapping[str, Any], *,
                    context: str = "training") -> None:
        """The run's dataset as an MLflow dataset input (the runs table's Dataset column): its
        ``name``, ``source`` (folder or URI), ``digest`` (of the annotation table) and ``profile``
        (split sizes). Sent with the rest; not spooled (the same facts are in the params and tags,
        which are), so a run that never reaches the server misses only the link."""
        if not self.enabled:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="local" if "://" not in source else
                          source.split("://", 1)[0], source=json.dumps({"uri": source}),
                          profile=json.dumps(dict(profile), sort_keys=True))
        self._pending_inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
        self._send("log the dataset", lambda: None, fresh={"inputs": 1})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Values may be floats, numpy or 0-d torch scalars; kept (with this step and the time
        now) while MLflow is away: in memory, past ``max_buffered_metrics`` in the spool file."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            self._pending_metrics.append(Metric(key, float(value), now, int(step or 0)))
        self._send("log metrics", lambda: None, fresh={"metrics": len(metrics)})
        if len(self._pending_metrics) > self._max_buffered_metrics:
            self._spill_metrics()

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        self._pending_artifacts.append((str(path), artifact_path))
        self._send("log artifacts", lambda: None, fresh={"artifacts": 1})

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.log_artifact(directory, artifact_path)  # a directory is uploaded recursively

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """A JSON artifact; written to a local spool first so it survives an outage."""
        if not self.enabled:
            return
        if self._artifact_dir is None:
            self._artifact_dir = Path(tempfile.mkdtemp(prefix="dkd-mlflow-spool-"))
        target = self._artifact_dir / artifact_file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(dict(dictionary), indent=2, sort_keys=True, default=str))
        folder = str(Path(artifact_file).parent)
        self.log_artifact(target, None if folder == "." else folder)

    def log_model(self, model: nn.Module, name: str, input_example: np.ndarray, *,
                  config: Any = None, registered_name: str | None = None,
                  version_tags: Mapping[str, Any] | None = None,
                  tags: Mapping[str, Any] | None = None, serialization: str = "auto",
                  alias: str | None = None, description: str | None = None,
                  checkpoint: str | None = None) -> ModelInfo | None:
        """Log ``model`` (see the module docstring) and optionally register it as a new version.

        ``config``: a ``Config`` or dict stored as ``config.json`` for ``load_model(builder=...)``.
        ``serialization``: ``auto`` (pt2, falling back to pickle when torch.export fails),
        ``pt2`` or ``pickle``. ``input_example``: a batch for the signature (and for tracing).
        The model is logged from the CPU (so it loads anywhere) and moved back to its device.
        Returns MLflow's ``ModelInfo`` (``model_uri``, ``registered_model_version``) or None
        when MLflow could not be reached: the model then waits like any other pending data and is
        logged (and registered) when the server answers; ``checkpoint`` (the folder holding its
        weights) lets a spool carry it past the end of the process, for the replay.
        """
        if not self.enabled:
            return None
        if registered_name and finite_headline(version_tags) is None:
            headline = (version_tags or {}).get(HEADLINE_TAG, "missing")
            logger.warning("model %r is logged but NOT registered as %s: its %s is %s (a registered model needs a "
                           "finite one)", name, registered_name, HEADLINE_TAG, headline)
            self.set_tags({"registration": f"refused: {HEADLINE_TAG}={headline}"})
            registered_name = None
        pending = PendingModel.of(model, name, input_example, checkpoint=checkpoint, config=config,
                                  serialization=serialization, registered_name=registered_name,
                                  version_tags=version_tags, alias=alias, description=description, tags=tags)
        info = self._send(f"log model {name!r}", lambda: pending.send(self._run_id, self.experiment_id, self.uri))
        if info is None and self._offline and not pending.done:  # the server is away: the model waits
            self._pending_models.append(pending)
            steps = ("registered as " + registered_name) if pending.model_uri else \
                ("logged" + (f" and registered as {registered_name}" if registered_name else ""))
            logger.warning("model %r waits for MLflow (unreachable): it is %s when the server answers%s", name, steps,
                           f", else spooled with its checkpoint {checkpoint}" if checkpoint else
                           "; its weights remain in the checkpoints")
        elif info is None:
            logger.warning("model %r was not logged to MLflow; the weights remain in the "
                           "checkpoints (%s)", name, self.checkpoint_dir or "the run's storage path")
        return info

    def register_model(self, model_uri: str, name: str, *, tags: Mapping[str, Any] | None = None,
                       alias: str | None = None, description: str | None = None) -> ModelVersion | None:
        if not self.enabled:
            return None
        return self._send(f"register {name!r}", lambda: register_model(
            model_uri, name, tags=tags, alias=alias, uri=self.uri, description=description))

    def set_alias(self, name: str, alias: str, version: str | int) -> bool:
        if not self.enabled:
            return False
        done = self._send(f"set alias {name}@{alias}",
                          lambda: set_alias(name, alias, version, uri=self.uri) or True)
        return bool(done)

    # -------------------------------------------------------------- the guard
    def _send(self, what: str, action: Callable[[], T], fresh: dict[str, Any] | None = None) -> T | None:
        """Run ``action`` after creating the run and flushing pending data; never raises.
        ``fresh``: what this call queued (anything else pending waited for the server: late)."""
        if self._offline and time.monotonic() < self._next_try:
            return None  # in back-off: cheap no-op, data stays pending
        late: collections.Counter = collections.Counter()
        self._fresh = fresh or {}
        try:
            self._ensure_run()
            self._flush_pending(late)
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
        finally:
            self._fresh = {}
        if self._offline:
            self._offline = False
            self._delay_s = self._retry_after_s
            logger.warning("MLflow tracking at %s is reachable again; what waited for it was sent: %s",
                           redact_uri(self.uri), _counts(late) or "nothing (it was the first call since)")
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
                                      tags={**source_tags(self._tags["job"]), **self._tags}, run_name=self.run_name)
        self._run_id, self._experiment_id = run.info.run_id, experiment_id
        logger.info("MLflow run %s (%s) in experiment %r at %s", self._run_id, self.run_name,
                    self.experiment, redact_uri(self.uri))
        if self._spill is not None:  # a crash from here on leaves a spool that names the run
            try:
                self._spill.append([{"kind": "run", "run_id": self._run_id}], count=False)
            except OSError:
                pass

    def _flush_pending(self, late: collections.Counter) -> None:
        """Send everything pending, oldest first; ``late`` counts what had waited (queued by an
        earlier call). Each item leaves the queue only once the server took it (or refused it for good)."""
        from mlflow.entities import Metric, Param, RunTag

        def batches(items: list, size: int):
            return (items[i:i + size] for i in range(0, len(items), size))

        for chunk in batches(list(self._pending_params.items()), 100):  # MLflow's batch limits
            self._send_batch(params=[Param(k, v) for k, v in chunk])
            for key, _ in chunk:
                self._pending_params.pop(key, None)
            self._count_late(late, "params", sum(k not in self._fresh.get("params", ()) for k, _ in chunk))
        for chunk in batches(list(self._pending_tags.items()), 100):
            self._send_batch(tags=[RunTag(k, v) for k, v in chunk])
            for key, _ in chunk:
                self._pending_tags.pop(key, None)
            self._count_late(late, "tags", sum(k not in self._fresh.get("tags", ()) for k, _ in chunk))
        while self._spill is not None:  # older than anything in memory
            try:
                records, offset = self._spill.read_unsent(1000)
            except (OSError, ValueError) as error:  # not the server's fault: never taken for an outage
                logger.warning("MLflow spool %s cannot be read any more (%s); %d metric values in it were "
                               "never recorded", self._spill.path, error, self._spill.unsent)
                self._spill = None
                break
            if records:
                self._send_batch(metrics=[metric_of(r) for r in records])
            self._spill.mark_sent(offset, len(records))
            for record in records:
                self._late_metrics.add(record["key"], record["step"])
            late["metric values"] += len(records)
            if not records:
                self._spill.remove()
                self._spill = None
        waited = len(self._pending_metrics) - self._fresh.get("metrics", 0)  # the oldest ones
        while self._pending_metrics:
            chunk = [self._pending_metrics[i] for i in range(min(1000, len(self._pending_metrics)))]
            self._send_batch(metrics=[m if math.isfinite(m.value) else
                                      Metric(m.key, float("nan"), m.timestamp, m.step) for m in chunk])
            for _ in chunk:
                self._pending_metrics.popleft()
            for m in chunk[:max(0, waited)]:
                self._late_metrics.add(m.key, m.step)
            late["metric values"] += min(len(chunk), max(0, waited))
            waited -= len(chunk)
        while self._pending_inputs:  # after the run's own data: a link, never worth blocking the queue for
            try:
                self._client.log_inputs(self._run_id, [self._pending_inputs[0]])
            except Exception as error:
                if _is_unreachable(error):
                    raise
                logger.warning("MLflow did not take the run's dataset input; dropped: %s", _short(error))
            self._pending_inputs.pop(0)
        waited = len(self._pending_artifacts) - self._fresh.get("artifacts", 0)
        while self._pending_artifacts:
            path, artifact_path = self._pending_artifacts[0]
            self._refusable(f"log artifact {path}", lambda: self._log_artifact(path, artifact_path))
            self._pending_artifacts.pop(0)
            self._count_late(late, "artifacts", int(waited > 0))
            waited -= 1
        while self._pending_models:  # before the end: a FINISHED run has its model
            pending = self._pending_models[0]
            try:
                self._refusable(f"log or register model {pending.name!r}",
                                lambda: pending.send(self._run_id, self.experiment_id, self.uri))
            except ModelNotLogged as error:  # cannot work on any retry
                logger.warning("%s; its weights remain in the checkpoints", error)
            self._pending_models.pop(0)
            self._count_late(late, "models", 1)
        if self._pending_end is not None:
            status, end_ms = self._pending_end
            self._refusable("end the run", lambda: self._client.set_terminated(self._run_id, status, end_ms))
            self._pending_end = None

    def _count_late(self, late: collections.Counter, what: str, n: int) -> None:
        if n:
            late[what] += n
            self._late[what] += n

    def _log_artifact(self, path: str, artifact_path: str | None) -> None:
        if os.path.isdir(path):
            self._client.log_artifacts(self._run_id, path, artifact_path)
        elif os.path.exists(path):
            self._client.log_artifact(self._run_id, path, artifact_path)
        else:
            logger.warning("artifact %s no longer exists; not logged", path)

    @staticmethod
    def _refusable(what: str, action: Callable[[], Any]) -> None:
        """Run ``action``; a refusal (4xx: retrying cannot help) is logged and the item dropped."""
        try:
            action()
        except Exception as error:
            if not _is_rejection(error):
                raise
            logger.warning("MLflow rejected the request to %s; dropped: %s", what, _short(error))

    def _send_batch(self, **batch: list) -> None:
        """One ``log_batch``. A refused batch would block the queue forever, so it is dropped; one
        refused for a bad value (e.g. a param that changed value, a metric key MLflow does not
        accept) is split first, so only the values the server refuses are left out."""
        try:
            self._client.log_batch(self._run_id, **batch)
        except Exception as error:
            if not _is_rejection(error):
                raise
            (kind, items), = batch.items()
            if len(items) > 1 and getattr(error, "error_code", "") == "INVALID_PARAMETER_VALUE":
                half = len(items) // 2
                self._send_batch(**{kind: items[:half]})
                self._send_batch(**{kind: items[half:]})
                return
            names = ", ".join(sorted({str(item.key) for item in items})[:5])
            logger.warning("MLflow rejected %d %s (%s); dropped: %s", len(items), kind, names, _short(error))

    # -------------------------------------------------------------- the spool
    def _has_pending(self) -> bool:
        return bool(self._pending_params or self._pending_tags or self._pending_metrics or self._pending_artifacts
                    or self._pending_inputs or self._pending_models
                    or self._pending_end is not None or (self._spill is not None and self._spill.unsent))

    def _run_record(self) -> dict[str, Any]:
        return run_record(uri=self.uri, experiment=self.experiment, run_name=self.run_name, run_id=self._run_id,
                          start_ms=self._start_ms, tags=self._tags, owns_run=self._owns_run)

    def _spool_folder(self, checkpoints: bool = True) -> tuple[Path, Path | None]:
        """The checkpoint folder when it is a writable local one, else a temporary folder (made
        once); the second item is that temporary folder, removed with the spool."""
        folder = usable_folder(self.checkpoint_dir) if checkpoints else None
        if folder is not None:
            return folder.resolve(), None
        if self._temp_folder is None or not self._temp_folder.is_dir():
            self._temp_folder = Path(tempfile.mkdtemp(prefix="dkd-mlflow-pending-"))
        return self._temp_folder, self._temp_folder

    def _spill_metrics(self) -> None:
        """Past the memory bound: append the pending metric values to the spool file, in order."""
        if self._spill_failed:
            return
        first = self._spill is None
        try:
            if self._spill is None:
                folder, temporary = self._spool_folder()
                self._spill = SpoolFile.create(folder, self._run_record(), temporary)
            self._spill.append(metric_record(m.key, m.value, m.timestamp, m.step) for m in self._pending_metrics)
        except OSError as error:
            self._spill_failed = True
            logger.warning("could not write the MLflow spool (%s): the %d pending metric values stay in memory",
                           error, len(self._pending_metrics))
            return
        if first:
            logger.warning("MLflow tracking at %s: more than %d metric values wait for the server; they are "
                           "spooled to %s and sent in order once it answers", redact_uri(self.uri),
                           self._max_buffered_metrics, self._spill.path)
        self._pending_metrics.clear()

    def _write_spool(self) -> Path | None:
        """Everything still pending into one spool file, for ``jobs/replay_mlflow.py``; the
        pending queues are emptied. None (and the data stays in memory) if no folder takes it."""
        try:
            path = self._spool_into(*self._spool_folder())
        except OSError as error:
            try:  # e.g. the checkpoint folder is full or read-only: a temporary folder then
                path = self._spool_into(*self._spool_folder(checkpoints=False))
            except OSError:
                logger.warning("MLflow tracking at %s: could not write a spool (%s); never recorded: %s",
                               redact_uri(self.uri), error, _counts(self.pending()))
                return None
        self._pending_params.clear()
        self._pending_tags.clear()
        self._pending_metrics.clear()
        self._pending_artifacts.clear()
        self._pending_models.clear()
        if self._pending_inputs:
            logger.warning("MLflow tracking at %s: the run's dataset input was not sent (its name, source and "
                           "digest are in the spooled params and tags)", redact_uri(self.uri))
            self._pending_inputs.clear()
        self._pending_end = None
        self.spool_path = path
        return path

    def _spool_into(self, folder: Path, temporary: Path | None) -> Path:
        spill = self._spill
        reuse = spill is not None and spill.path.parent == folder
        path = spill.path if reuse else create_spool(folder)
        try:
            self._write_spool_lines(path, spill)
        except OSError:
            if not reuse:
                path.unlink(missing_ok=True)
            raise
        if spill is not None:
            if spill.path != path:
                spill.remove()
            self._spill = None
        if self._artifact_dir is not None:
            shutil.rmtree(self._artifact_dir, ignore_errors=True)
            self._artifact_dir = None
        if temporary is not None:
            self._temp_folder = None  # the spool keeps that folder; a later spool gets its own
        return path

    def _write_spool_lines(self, path: Path, spill: SpoolFile | None) -> None:
        lines = [encode(self._run_record())]
        if self._pending_params:
            lines.append(encode({"kind": "params", "params": self._pending_params}))
        if self._pending_tags:
            lines.append(encode({"kind": "tags", "tags": self._pending_tags}))
        if spill is not None:
            lines += spill.unsent_lines()
        lines += [encode(metric_record(m.key, m.value, m.timestamp, m.step)) for m in self._pending_metrics]
        own = self._artifact_dir
        for local, artifact_path in self._pending_artifacts:
            if own is not None and Path(local).is_relative_to(own) and Path(local).is_file():  # a log_dict copy
                kept = path.with_name(path.name.removesuffix(".jsonl") + ".artifacts") / Path(local).relative_to(own)
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(local, kept)
                local = str(kept)
            lines.append(encode({"kind": "artifact", "path": str(Path(local).resolve()),
                                 "artifact_path": artifact_path}))
        for pending in self._pending_models:
            if pending.checkpoint or pending.model_uri:  # the replay can rebuild it, or only registers it
                lines.append(encode(pending.record()))
            else:
                logger.warning("model %r is not in the spool (no checkpoint given); its weights remain in the "
                               "checkpoints", pending.name)
        if self._pending_end is not None:
            lines.append(encode({"kind": "end", "status": self._pending_end[0], "end_ms": self._pending_end[1]}))
        write_lines(path, lines)

    def _report(self, path: Path | None, waited_s: float) -> None:
        """At close: what was sent late (after an outage) and what is still pending, where."""
        late = _counts(self._late, self._late_metrics)
        if path is None and not late:
            return
        message = [f"MLflow tracking at {redact_uri(self.uri)}"
                   + (f" (run {self._run_id})" if self._run_id else " (run not created yet)")]
        if late:
            message.append(f"sent late, after an outage: {late}")
        if path is not None:
            try:
                pending = _spooled(path)
            except Exception as error:  # noqa: BLE001 - a message must not fail the close
                pending = f"(the spool cannot be read back: {error})"
            tried = f"after {waited_s:.0f} s of retries" if waited_s >= 1 else "after one last attempt"
            message.append(f"still pending {tried}: {pending}; written to {path}; "
                           f"send it once the server answers with: {replay_command(path, self.uri)}")
        elif late:
            message.append("nothing is pending")
        logger.warning("; ".join(message))


def _is_unreachable(error: Exception) -> bool:
    """The server did not answer (connection refused, timeout, retries exhausted), as opposed to
    an answer refusing the request."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, OSError) or (isinstance(error, MlflowException) and "API request to" in str(error))


def _close_timeout(value: float | None) -> float:
    if value is not None:
        return max(0.0, float(value))
    try:
        return max(0.0, float(os.environ.get(CLOSE_TIMEOUT_ENV, "30")))
    except ValueError:
        logger.warning("%s=%r is not a number of seconds; using 30", CLOSE_TIMEOUT_ENV,
                       os.environ.get(CLOSE_TIMEOUT_ENV))
        return 30.0


def _counts(counts: Mapping[str, int], metrics: MetricTally | None = None) -> str:
    parts = [metrics.describe()] if metrics else []
    parts += [what if what.startswith("end status") else f"{n} {what}"
              for what, n in counts.items() if n and what != "metric values"]
    if not metrics and counts.get("metric values"):
        parts.insert(0, f"{counts['metric values']} metric values")
    return ", ".join(parts)


def _spooled(path: Path) -> str:
    """What a spool holds, as a message says it."""
    from .spool import read_spool

    spool = read_spool(path)
    metrics = MetricTally()
    for record in spool.metrics:
        metrics.add(record["key"], record["step"])
    counts = {"params": len(spool.params), "tags": len(spool.tags), "artifacts": len(spool.artifacts),
              "models": len(spool.models)}
    if spool.end is not None:
        counts[f"end status {spool.end['status']}"] = 1
    return _counts(counts, metrics) or "the run itself"


@atexit.register
def _spool_at_exit() -> None:
    """A tracker never closed (a loop that raised, a job that forgot to): its pending data goes
    to a spool file rather than vanishing with the process (no network at exit)."""
    for tracker in list(_LIVE):
        try:
            if tracker.enabled and tracker._has_pending():
                path = tracker._write_spool()
                if path is not None:
                    logger.warning("MLflow tracking at %s: the process exits with data not sent: %s; "
                                   "written to %s; send it with: %s", redact_uri(tracker.uri), _spooled(path),
                                   path, replay_command(path, tracker.uri))
        except Exception:  # noqa: BLE001 - never fail an exit
            pass


def _experiment_id(client: Any, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older release or by hand
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
            if NOTE_TAG not in experiment.tags:
                client.set_experiment_tag(experiment.experiment_id, NOTE_TAG, experiment_description(name))
        return experiment.experiment_id
    location = _local_artifact_location(uri, name)
    try:
        return client.create_experiment(name, artifact_location=location, tags={
            EXPERIMENT_KIND_TAG: TRAINING_KIND, NOTE_TAG: experiment_description(name)})
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
