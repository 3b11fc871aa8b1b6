"""Where runs go and what they, the experiments and the registered models are called."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, Mapping


PIPELINE_ENV = "DKD_PIPELINE_ID"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def experiment_name(dataset: str) -> str:
    return f"dkd-ray/{dataset}"


def registered_model_name(role: str, dataset: str) -> str:
    """``dkd-teacher-<dataset>`` / ``dkd-student-<dataset>``."""
    if role not in ("teacher", "student"):
        raise ValueError(f"model role must be 'teacher' or 'student', got {role!r}")
    return f"dkd-{role}-{dataset}"


def version_tags(cfg: Any, metrics: Mapping[str, float] | None = None) -> dict[str, str]:
    """Tags for a registered model version: dataset, preset and the given metrics (mAP, top-1)."""
    tags = {"dataset": cfg.data.dataset, "preset": cfg.preset}
    tags.update({key: f"{float(value):.4f}" for key, value in (metrics or {}).items()})
    return tags


def new_pipeline_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
