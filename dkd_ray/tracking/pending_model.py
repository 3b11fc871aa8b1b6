"""Logging a model and registering it, in steps that survive an MLflow outage.

``Tracker.log_model`` sends a ``PendingModel``: log the model into its run, then register it.
Each step is done once: a step that got through is remembered (and, for a retry from another
process, found again in MLflow: the run's READY logged model of that name, the version of that
registered model from that run), so a retry after an outage never logs a second copy nor
creates a second version. While the server is away the tracker keeps the pending model (the
module itself, in memory) and sends it when the server answers. If it is still away when the
tracker closes, the spool keeps a ``model`` record instead: the checkpoint that holds the weights
and what the registration needs (version tags, alias, description). The replay rebuilds the
model from that checkpoint, under the registry's usual rule (no version without a finite
headline metric).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Mapping

from dkd_ray.errors import InputError

from .errors import _is_rejection, _short

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)


class ModelNotLogged(InputError):
    """The model itself could not be serialised or logged (not the server's fault): retrying
    cannot help, so it is dropped with this message rather than kept waiting."""


@dataclass
class PendingModel:
    name: str  # the model's name in the run ("model")
    checkpoint: str | None  # where the weights are; None: it lives only in this process
    serialization: str
    example_shape: tuple[int, ...]
    registered_name: str | None = None
    version_tags: dict[str, str] | None = None
    alias: str | None = None
    description: str | None = None
    tags: dict[str, str] | None = None
    model_uri: str | None = None  # set once logged
    version: str | None = None  # set once registered
    module: nn.Module | None = field(default=None, repr=False)  # in memory only, never spooled
    config: Any = field(default=None, repr=False)

    @classmethod
    def of(cls, model: nn.Module, name: str, input_example, *, checkpoint: str | None, config: Any,
           serialization: str, registered_name: str | None, version_tags: Mapping[str, Any] | None,
           alias: str | None, description: str | None, tags: Mapping[str, Any] | None) -> PendingModel:
        return cls(name, None if checkpoint is None else str(checkpoint), serialization,
                   tuple(int(n) for n in input_example.shape), registered_name,
                   None if version_tags is None else {k: str(v) for k, v in version_tags.items()},
                   alias, description, None if tags is None else {k: str(v) for k, v in tags.items()},
                   module=model, config=config)

    @property
    def done(self) -> bool:
        return self.model_uri is not None and (not self.registered_name or self.version is not None)

    def record(self) -> dict[str, Any]:
        """The spool line (``kind: model``); only for a model with a checkpoint."""
        return {"kind": "model", "name": self.name, "checkpoint": self.checkpoint,
                "serialization": self.serialization, "example_shape": list(self.example_shape),
                "registered_name": self.registered_name, "version_tags": self.version_tags,
                "alias": self.alias, "description": self.description, "tags": self.tags,
                "model_uri": self.model_uri}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PendingModel:
        shape = tuple(int(n) for n in record["example_shape"])
        if not (record.get("checkpoint") or record.get("model_uri")) or not shape:
            raise ValueError("needs a checkpoint (or the logged model_uri) and an example_shape")
        return cls(str(record["name"]), record.get("checkpoint"), str(record.get("serialization") or "auto"), shape,
                   record.get("registered_name"), record.get("version_tags"), record.get("alias"),
                   record.get("description"), record.get("tags"), record.get("model_uri"))

    def load(self) -> tuple[nn.Module, Any]:
        """The module and its config: the one in memory, else rebuilt from the checkpoint
        (``weights_only``; a missing or broken checkpoint raises here, before MLflow is asked)."""
        if self.module is None:
            from dkd_ray.models.loading import load_model

            self.module = load_model(self.checkpoint)
            self.config = self.module.spec
        return self.module, self.config

    def send(self, run_id: str, experiment_id: str | None, uri: str) -> Any:
        """Do the steps not done yet; returns MLflow's ``ModelInfo`` (or an object with its
        ``model_uri`` and ``registered_model_version``). An outage propagates (the steps done so
        far are kept); a model that cannot be serialised raises ``ModelNotLogged``."""
        from mlflow import MlflowClient

        from .model_logging import _log_model
        from .registry import HEADLINE_TAG, finite_headline, register_model

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        info: Any = None
        if self.model_uri is None:
            self.model_uri = _logged_before(client, run_id, self.name)
        if self.model_uri is None:
            import numpy as np

            model, config = self.load()
            example = np.random.default_rng(0).random(self.example_shape, dtype=np.float32)
            try:
                info = _log_model(model, self.name, example, run_id=run_id, config=config, tags=self.tags,
                                  serialization=self.serialization, experiment_id=experiment_id)
            except Exception as error:
                from .tracker import _is_unreachable

                if _is_unreachable(error) or _is_rejection(error):
                    raise
                raise ModelNotLogged(f"model {self.name!r} could not be logged: {_short(error)}") from error
            self.model_uri = info.model_uri
        if self.registered_name and self.version is None:
            if finite_headline(self.version_tags) is None:
                logger.warning("model %r logged but NOT registered as %s: its %s is %s (a registered model needs a "
                               "finite one)", self.name, self.registered_name, HEADLINE_TAG,
                               (self.version_tags or {}).get(HEADLINE_TAG, "missing"))
                self.registered_name = None
            else:
                self.version = _registered_before(client, run_id, self.registered_name) or str(register_model(
                    self.model_uri, self.registered_name, tags=self.version_tags, alias=self.alias, uri=uri,
                    description=self.description).version)
        if info is None:
            info = SimpleNamespace(model_uri=self.model_uri)
        info.registered_model_version = self.version
        return info


def _logged_before(client: Any, run_id: str, name: str) -> str | None:
    """The URI of the run's READY logged model called ``name`` (an earlier try that got through)."""
    from mlflow.entities import LoggedModelStatus

    for output in client.get_run(run_id).outputs.model_outputs or []:
        model = client.get_logged_model(output.model_id)
        if model.name == name and model.status == LoggedModelStatus.READY:
            return model.model_uri
    return None


def _registered_before(client: Any, run_id: str, registered_name: str) -> str | None:
    """The version of ``registered_name`` already made from this run, if any."""
    versions = [v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.name == registered_name]
    if not versions:
        return None
    version = str(max(int(v.version) for v in versions))
    logger.info("%s version %s (from run %s) was registered before: not registered again",
                registered_name, version, run_id)
    return version
