"""``load_model``: an MLflow model URI, a run id or a local folder, to a module, safely."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import ModelNotFoundError, _is_rejection, _short
from .model_logging import CONFIG_FILE, STATE_DICT_FILE
from .naming import tracking_uri
from .redaction import redact_uri
from .registry import _use_uri

if TYPE_CHECKING:  # heavy imports stay lazy: importing dkd_ray must not import mlflow
    from torch import nn


PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"  # read here only when explicitly set
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


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
        raise names_nothing(text)
    return _load_local(_download(model_uri, uri), builder, map_location, text, trust_pickle)


def names_nothing(ref: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"{ref!r}: no such file or folder, and not an MLflow model URI (models:/name/3, "
                              "models:/name@alias, runs:/<run id>/<name>) nor a run id")


def check_model_uri(ref: str, uri: str | None = None) -> str:
    """That the MLflow reference ``ref`` (a models:/ version or alias, a runs:/ URI, a run id, a
    logged-model id) names something that exists, without downloading it; returns its model URI.
    ``ModelNotFoundError`` (bad input, exit status 2) names what is missing."""
    from mlflow.exceptions import MlflowException

    logged_model = re.compile(r"m-[0-9a-f]{32}")
    target = ref.removeprefix("models:/")
    if not (ref.startswith(("models:/", "runs:/")) or _RUN_ID.fullmatch(ref) or logged_model.fullmatch(ref)):
        raise names_nothing(ref)
    if ref.startswith("models:/") and not logged_model.fullmatch(target) and "@" not in target \
            and not target.partition("/")[2]:
        name = target.partition("/")[0]
        raise ModelNotFoundError(f"{ref!r}: give a version or an alias (models:/{name}/3, models:/{name}@champion)")
    client = _use_uri(uri)
    try:
        if ref.startswith("runs:/"):
            client.get_run(ref.removeprefix("runs:/").split("/", 1)[0])
        elif _RUN_ID.fullmatch(ref):
            return _run_model_uri(ref, uri)
        elif logged_model.fullmatch(target):
            client.get_logged_model(target)
            return f"models:/{target}"
        elif "@" in target:
            client.get_model_version_by_alias(*target.split("@", 1))
        else:
            client.get_model_version(*target.split("/", 1))
    except MlflowException as error:
        if _is_rejection(error):
            raise ModelNotFoundError(f"no model {ref!r} in MLflow at {redact_uri(uri or tracking_uri())}: "
                                     f"{_short(error)}") from None
        raise
    return ref


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
