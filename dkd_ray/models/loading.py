"""Build and load the project's models from any reference: an MLflow model URI, a run id, an
MLflow model folder or a training checkpoint (a folder, or its URI on object storage). Weights are always read with ``weights_only=True``
and the architecture is rebuilt from the stored config (never unpickled).

A model *spec* is the small dict stored beside the weights: ``{"role": "teacher"|"student",
"num_classes": K, "config": Config.to_dict()}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from dkd_ray.config import Config

ROLES = ("teacher", "student")


def model_spec(role: str, cfg: Config, num_classes: int) -> dict[str, Any]:
    if role not in ROLES:
        raise ValueError(f"unknown model role {role!r}; expected one of {ROLES}")
    return {"role": role, "num_classes": int(num_classes), "config": cfg.to_dict()}


def teacher_input_size(teacher: nn.Module, cfg: Config | None = None) -> tuple[int, int]:
    """``(height, width)`` of the crops ``teacher`` was trained on: from its stored config
    (``teacher.spec``, set by ``load_model``), else from ``cfg`` (a teacher being trained now,
    whose run config is its own). Never take it from another run's config: a student's
    ``teacher.input_*`` need not match the teacher it is given."""
    stored = (getattr(teacher, "spec", None) or {}).get("config", {}).get("teacher")
    if stored:
        return int(stored["input_height"]), int(stored["input_width"])
    if cfg is None:
        raise ValueError(f"{type(teacher).__name__} has no stored config (spec) and no config was given: "
                         "its input size is unknown")
    return int(cfg.teacher.input_height), int(cfg.teacher.input_width)


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The untrained architecture a spec describes."""
    try:
        role, num_classes, cfg = spec["role"], int(spec["num_classes"]), Config.from_dict(spec["config"])
    except KeyError as missing:
        raise ValueError(f"model spec lacks {missing}: expected role, num_classes and config") from None
    if role == "teacher":
        from dkd_ray.models.teacher import build_teacher

        return build_teacher(cfg.teacher, num_classes)
    if role == "student":
        from dkd_ray.models.student import build_student

        return build_student(cfg, num_classes)
    raise ValueError(f"unknown model role {role!r} in spec; expected one of {ROLES}")


def role_weights(weights: dict, role: str) -> dict:
    """The inference model's weights from a training state (the student trains inside
    ``DistilledStudent``: keep ``student.*``, drop the training-only KD projection)."""
    if role == "student" and any(k.startswith("student.") for k in weights):
        return {k[len("student."):]: v for k, v in weights.items() if k.startswith("student.")}
    return weights


def load_model(ref: str | os.PathLike, *, role: str | None = None, map_location: Any = "cpu",
               uri: str | None = None) -> nn.Module:
    """A teacher or student in eval mode from ``ref`` (see the module docstring).
    ``role`` checks that the reference holds the expected kind of model."""
    from dkd_ray import storage
    from dkd_ray.train.checkpoint import STATE_FILE, load_checkpoint

    if storage.is_remote(ref):  # a checkpoint on object storage: this node's cached copy
        try:
            ref = storage.localize(ref)
        except FileNotFoundError as error:
            from dkd_ray.tracking import ModelNotFoundError

            raise ModelNotFoundError(f"{os.fspath(ref)}: {error}") from None
    path = Path(os.fspath(ref)).expanduser()
    if path.exists() and (path.is_file() or (path / STATE_FILE).is_file()):
        state = load_checkpoint(path, map_location=map_location)
        stored_role = state.extra.get("role")
        if stored_role is None:
            raise ValueError(f"checkpoint {path} does not say which model it holds (extra.role missing)")
        spec = {"role": stored_role, "num_classes": state.extra["num_classes"], "config": state.config}
        model = build_model(spec)
        model.load_state_dict(role_weights(state.model, stored_role))
        model.spec = spec
    else:
        from dkd_ray import tracking

        holder: dict[str, Any] = {}

        def builder(spec: dict) -> nn.Module:
            holder["spec"] = spec
            return build_model(spec)

        model = tracking.load_model(ref, builder=builder, map_location=map_location, uri=uri)
        model.spec = holder.get("spec", {})
    found = getattr(model, "spec", {}).get("role")
    if role is not None and found is not None and found != role:
        raise ValueError(f"{os.fspath(ref)!r} holds a {found}, not a {role}")
    return model.eval()


def check_model_ref(ref: str | os.PathLike, role: str, *, uri: str | None = None) -> None:
    """Fail fast on the driver, before any Ray worker starts, when ``ref`` cannot give a ``role``
    model: a local checkpoint or model folder is loaded (cheap, and it finds an empty or corrupt
    one); an MLflow reference is looked up without downloading it. Raises ``ModelNotFoundError``
    naming the reference."""
    from dkd_ray import storage
    from dkd_ray.errors import InputError
    from dkd_ray.tracking import ModelNotFoundError
    from dkd_ray.tracking.loading import check_model_uri

    text = os.fspath(ref)
    if not text.strip():
        raise ModelNotFoundError(f"empty {role} reference")
    path = Path(text).expanduser()
    if storage.is_remote(text):
        from dkd_ray.train.checkpoint import STATE_FILE

        if not storage.exists(storage.join(text, STATE_FILE)) and not (text.endswith(".pt") and storage.exists(text)):
            raise ModelNotFoundError(f"{text}: no checkpoint there (no {STATE_FILE})")
        return
    if "://" in text or not path.exists():
        check_model_uri(text, uri)
        return
    try:
        load_model(path, role=role)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a broken file raises, say which file
        raise ModelNotFoundError(f"{text}: not a readable {role} ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''})") from None

