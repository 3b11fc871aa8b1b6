"""The MLflow model registry: register a version, alias it, find the newest.

The registry only ever holds models that were measured: a version needs a finite headline
metric (its ``mAP`` tag). A diverged run (mAP nan or inf) would otherwise sort above every real
version in the UI, and "newest registered teacher" or a sweep's champion could pick it.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Mapping

from dkd_ray.errors import InputError

from .naming import tracking_uri

logger = logging.getLogger(__name__)

HEADLINE_TAG = "mAP"
LATEST_GOOD_ALIAS = "latest-good"  # the newest version whose headline and detection figures are finite
GOOD_TAGS = (HEADLINE_TAG, "top1")  # plus every det/... tag


class UnmeasuredModelError(InputError, ValueError):
    """A model without a finite headline metric may not be registered or aliased."""


def finite_headline(tags: Mapping[str, Any] | None) -> float | None:
    """The version tags' headline metric as a finite float, else None (missing, unparsable, nan, inf)."""
    try:
        value = float((tags or {})[HEADLINE_TAG])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None

def all_metrics_finite(tags: Mapping[str, Any] | None) -> bool:
    """True when the headline mAP / top-1 and every detection figure (``det/...``) are finite.
    Other protocols may be nan by design (a gallery or cross-camera protocol with no query that
    can be evaluated on small data) and do not make a version bad."""
    if finite_headline(tags) is None:
        return False
    for key, value in (tags or {}).items():
        if key in GOOD_TAGS or key.startswith("det/"):
            try:
                if not math.isfinite(float(value)):
                    return False
            except (TypeError, ValueError):
                return False
    return True


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
                   alias: str | None = None, uri: str | None = None, description: str | None = None) -> ModelVersion:
    """Register ``model_uri`` as a new version of ``name`` (created if missing); tag, describe
    (Markdown) and alias it; ``latest-good`` moves to it when all its metric tags are finite.
    Refused (``UnmeasuredModelError``) unless ``tags`` carry a finite headline metric."""
    import mlflow

    if finite_headline(tags) is None:
        raise UnmeasuredModelError(f"{model_uri} not registered as {name}: its {HEADLINE_TAG} is "
                                   f"{(tags or {}).get(HEADLINE_TAG, 'missing')!s} (a registered model needs a finite one)")
    _use_uri(uri)
    version = mlflow.register_model(model_uri, name, await_registration_for=60,
                                    tags={k: str(v) for k, v in (tags or {}).items()})
    client = _use_uri(uri)
    if alias:
        set_alias(name, alias, version.version, uri=uri)
    if all_metrics_finite(tags):
        client.set_registered_model_alias(name, LATEST_GOOD_ALIAS, str(version.version))
    if description:  # last: a courtesy that must not cost the version its aliases
        try:
            client.update_model_version(name, version.version, description=description)
        except Exception as error:  # noqa: BLE001
            logger.warning("%s version %s registered without its description: %s", name, version.version, error)
    return version


def set_alias(name: str, alias: str, version: str | int, *, uri: str | None = None) -> None:
    """Point ``name@alias`` (e.g. ``champion``) at ``version``; refused for a version without a
    finite headline metric (one registered before this rule, or tagged by hand)."""
    client = _use_uri(uri)
    tags = client.get_model_version(name, str(version)).tags
    if finite_headline(tags) is None:
        raise UnmeasuredModelError(f"{name} version {version} not given the alias {alias!r}: its {HEADLINE_TAG} "
                                   f"is {tags.get(HEADLINE_TAG, 'missing')} (an alias needs a finite one)")
    client.set_registered_model_alias(name, alias, str(version))


def latest_registered(name: str, *, uri: str | None = None) -> ModelVersion | None:
    """The newest version of registered model ``name`` with a finite headline metric, or None.
    Versions without one (registered by older releases, or by hand) are skipped."""
    versions = [v for v in _use_uri(uri).search_model_versions(f"name = '{name}'") if finite_headline(v.tags) is not None]
    return max(versions, key=lambda v: int(v.version)) if versions else None
