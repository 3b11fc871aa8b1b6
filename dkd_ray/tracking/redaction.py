"""Secrets never leave the process: credentials in URIs and secret-looking params are masked."""

from __future__ import annotations

import re
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit


_SECRET_KEY = re.compile(r"token|passw|secret|api[_-]?key|access[_-]?key|private[_-]?key|credential",
                         re.IGNORECASE)
_SECRET_QUERY = re.compile(r"((?:token|passw\w*|secret|api[_-]?key|access[_-]?key|sig\w*)=)[^&]*",
                           re.IGNORECASE)


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
