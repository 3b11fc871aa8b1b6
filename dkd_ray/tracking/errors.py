"""Errors: a model reference that resolves to nothing; a request the server refused (retrying will
not help) against one it never answered; error text that is safe to log."""

from __future__ import annotations

import re

from dkd_ray.errors import InputError


class ModelNotFoundError(InputError, LookupError):
    """A model reference (URI, run id, path) resolves to no model."""


def _is_rejection(error: Exception) -> bool:
    """A 4xx answer: the server is up and refused this request (retrying would not help)."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and 400 <= error.get_http_status_code() < 500


def _short(error: Exception, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    text = re.sub(r"//[^/@\s]+@", "//***@", text)  # credentials inside URLs in the message
    return text if len(text) <= limit else text[:limit] + "..."
