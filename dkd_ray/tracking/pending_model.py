"""A model that could not be logged while MLflow was away.

The tracker keeps it (the module itself, in memory) and logs and registers it as soon as the
server answers. If the server is still away when the tracker closes, the spool keeps a ``model``
record instead: the checkpoint that holds the weights and everything the registration needs (its
version tags, alias, description). The replay rebuilds the model from that checkpoint, so a run
finished during an outage still ends up with its model and its registered version, under the
registry's usual rule (no version without a finite headline metric).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo
    from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class PendingModel:
    name: str  # the artifact name in the run ("model")
    checkpoint: str | None  # where the weights are; None: it lives only in this process
    serialization: str
    example_shape: tuple[int, ...]
    registered_name: str | None = None
    version_tags: dict[str, str] | None = None
    alias: str | None = None
    description: str | None = None
    tags: dict[str, str] | None = None
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

    def record(self) -> dict[str, Any]:
        """The spool line (``kind: model``); only for a model with a checkpoint."""
        return {"kind": "model", "name": self.name, "checkpoint": self.checkpoint,
                "serialization": self.serialization, "example_shape": list(self.example_shape),
                "registered_name": self.registered_name, "version_tags": self.version_tags,
                "alias": self.alias, "description": self.description, "tags": self.tags}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PendingModel:
        shape = tuple(int(n) for n in record["example_shape"])
        if not record.get("checkpoint") or not shape:
            raise ValueError("needs a checkpoint and an example_shape")
        return cls(str(record["name"]), str(record["checkpoint"]), str(record.get("serialization") or "auto"), shape,
                   record.get("registered_name"), record.get("version_tags"), record.get("alias"),
                   record.get("description"), record.get("tags"))

    def load(self) -> tuple[nn.Module, Any]:
        """The module and its config: the one in memory, else rebuilt from the checkpoint
        (``weights_only``; a missing or broken checkpoint raises here, before MLflow is asked)."""
        if self.module is None:
            from dkd_ray.models.loading import load_model

            self.module = load_model(self.checkpoint)
            self.config = self.module.spec
        return self.module, self.config

    def send(self, run_id: str, experiment_id: str | None, uri: str) -> tuple[ModelInfo, str | None]:
        """Log the model into ``run_id`` and register it when asked (and measured); returns
        MLflow's ``ModelInfo`` and the registered version (None when not registered)."""
        import numpy as np

        from .model_logging import _log_model
        from .registry import HEADLINE_TAG, finite_headline, register_model

        model, config = self.load()
        example = np.random.default_rng(0).random(self.example_shape, dtype=np.float32)
        info = _log_model(model, self.name, example, run_id=run_id, config=config, tags=self.tags,
                          serialization=self.serialization, experiment_id=experiment_id)
        if not self.registered_name:
            return info, None
        if finite_headline(self.version_tags) is None:
            logger.warning("model %r logged but NOT registered as %s: its %s is %s (a registered model needs a "
                           "finite one)", self.name, self.registered_name, HEADLINE_TAG,
                           (self.version_tags or {}).get(HEADLINE_TAG, "missing"))
            return info, None
        version = register_model(info.model_uri, self.registered_name, tags=self.version_tags, alias=self.alias,
                                 uri=uri, description=self.description)
        return info, str(version.version)
