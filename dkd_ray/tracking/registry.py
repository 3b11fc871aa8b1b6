"""The MLflow model registry: register a version, alias it, find the newest."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from .naming import tracking_uri

if TYPE_CHECKING:  # heavy imports stay lazy: importing dkd_ray must not import mlflow
    from mlflow.entities.model_registry import ModelVersion


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
