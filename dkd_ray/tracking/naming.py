"""Where runs go and what they, the experiments and the registered models are called."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlencode


PIPELINE_ENV = "DKD_PIPELINE_ID"
NOTE_TAG = "mlflow.note.content"  # an experiment's or run's description, shown (as Markdown) by the UI
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # the UI's model-training view, not its GenAI one
# MLflow 3.17's UI picks the view from its GenAI / Model training switch (kept in the browser)
# rather than from the kind tag; a link with this query opens the training view whatever it holds.
TRAINING_VIEW_QUERY = {"workflowType": "machine_learning"}


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


def experiment_description(name: str) -> str:
    """What an experiment's runs are and how to compare them (its description in the UI)."""
    return (f"**{name}**: runs of dkd-ray (Diverse Knowledge Distillation "
            "for end-to-end person search, trained on Ray).\n\n"
            "- `teacher-…`: the Re-ID teacher on ground-truth crops (metrics `teacher_gt/…`: two-step on ground truth);\n"
            "- `student-…`: the end-to-end student (metrics `<protocol>/mAP`, `<protocol>/top1`, `det/ap`, and "
            "`two_step/…`, the teacher on the student's own detections);\n"
            "- `sweep-…` with its `trial-…` runs nested under it: a Ray Tune search of the distillation weights.\n\n"
            "The runs of one pipeline share the tag `pipeline_id` (filter: `tags.pipeline_id = '<id>'`); each run's "
            "description links to its siblings. Registered versions (Models tab) carry the full metric names "
            "as tags, their teacher and knowledge bank, and a table of their metrics.")


SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + key: an experiment tag holding a saved runs-table view
DEFAULT_COLUMNS = ["attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`"]  # the UI's own defaults


def saved_view(search_filter: str, metrics: list[str], params: list[str] = (), order_by: str | None = None,
               ascending: bool = False) -> dict:
    """A runs-table view as the UI stores a shared one: the filter, sorted by ``order_by`` (best
    first: descending unless ``ascending``), with the given metric and param columns shown beside
    the UI's default ones."""
    columns = DEFAULT_COLUMNS + [f"metrics.`{m}`" for m in metrics] + [f"params.`{p}`" for p in params]
    view = {"searchFilter": search_filter, "selectedColumns": columns}
    if order_by:
        view.update(orderByKey=f"metrics.`{order_by}`", orderByAsc=ascending)
    return view


def runs_view_link(experiment_id: str, share_key: str | None = None) -> str:
    """A link, relative to the MLflow UI, to the experiment's runs table in the training view,
    opened on the saved view ``share_key`` (see ``saved_view``) when given."""
    query = dict(TRAINING_VIEW_QUERY)
    if share_key:
        query["viewStateShareKey"] = share_key
    return f"#/experiments/{experiment_id}/runs?{urlencode(query)}"


def version_tags(cfg: Any, metrics: Mapping[str, float] | None = None, headline: str | None = None) -> dict[str, str]:
    """Tags for a registered model version: dataset, preset, every metric under its full name
    (``cuhk_sysu/g100/mAP``, ``det/ap``, …) and, from the ``headline`` protocol (``cuhk_sysu/g100``),
    ``mAP`` and ``top1`` (what the registry's rules and the UI's version list read) plus ``headline``
    naming that protocol."""
    tags = {"dataset": cfg.data.dataset, "preset": cfg.preset}
    metrics = dict(metrics or {})
    if headline:
        tags["headline"] = headline
        tags["mAP"] = _metric_text(metrics.get(f"{headline}/mAP", float("nan")))  # missing: refused
        if f"{headline}/top1" in metrics:
            tags["top1"] = _metric_text(metrics[f"{headline}/top1"])
    tags.update({key: _metric_text(value) for key, value in metrics.items()
                 if _is_listed_metric(key) or (headline is None and "/" not in key)})
    return tags


def _is_listed_metric(key: str) -> bool:
    """What a version's tags list: mAP and top-1 of every protocol, and detection AP / recall
    (not top-5/10, query counts or progress counters, which would bury them in the UI's paged
    tag list). Without a headline, plain keys (``mAP``, ``top1``) are taken as given."""
    return key.endswith(("/mAP", "/top1")) or key.startswith("det/")


def _metric_text(value: Any) -> str:
    value = float(value)
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def source_tags(job: str) -> dict[str, str]:
    """MLflow's source tags for a run created by this process: the job script and, when the
    project is a git checkout, its commit (so the UI's Source column says what produced a run)."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else f"{job}.py"
    tags = {"mlflow.source.type": "JOB", "mlflow.source.name": script}
    commit = project_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def project_commit() -> str | None:
    """The git commit of the dkd_ray checkout this code runs from (None for an installed copy)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


def new_pipeline_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
