"""Logging a model to MLflow: the serialised module plus plain weights and the config that rebuilds it."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import _short

if TYPE_CHECKING:  # heavy imports stay lazy: importing dkd_ray must not import mlflow
    import numpy as np
    from mlflow.models.model import ModelInfo
    from torch import nn

logger = logging.getLogger(__name__)

STATE_DICT_FILE = "state_dict.pt"
CONFIG_FILE = "config.json"


def _log_model(model: nn.Module, name: str, input_example: np.ndarray, *, run_id: str,
               config: Any, tags: Mapping[str, Any] | None, serialization: str,
               experiment_id: str | None = None) -> ModelInfo:
    if serialization not in ("auto", "pt2", "pickle"):
        raise ValueError(f"serialization must be auto, pt2 or pickle, got {serialization!r}")
    with _active_experiment(experiment_id):
        return _log_model_in_experiment(model, name, input_example, run_id=run_id, config=config, tags=tags,
                                        serialization=serialization)


@contextmanager
def _active_experiment(experiment_id: str | None):
    """MLflow files a logged model under the process's active experiment (the Default one unless
    set), not under its run's, and the UI then shows the run without its model: make the run's
    experiment the active one for the call, then restore what was active (other trackers, the
    environment variable MLflow sets, subprocesses)."""
    import mlflow
    from mlflow.tracking import fluent

    if experiment_id is None:
        yield
        return
    saved_id, saved_env = fluent._active_experiment_id, os.environ.get("MLFLOW_EXPERIMENT_ID")
    try:
        mlflow.set_experiment(experiment_id=experiment_id)
        yield
    finally:
        fluent._active_experiment_id = saved_id
        if saved_env is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = saved_env


def _log_model_in_experiment(model: nn.Module, name: str, input_example: np.ndarray, *, run_id: str,
                             config: Any, tags: Mapping[str, Any] | None, serialization: str) -> ModelInfo:
    import mlflow.pytorch
    import numpy as np
    import torch
    import torchvision
    from mlflow.models import infer_signature

    from dkd_ray.train.checkpoint import cpu_copy, unwrap_model

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
