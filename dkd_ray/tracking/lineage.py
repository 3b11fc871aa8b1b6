"""What a run and a registered version say about where they come from, in the MLflow UI's terms:
the dataset input of a run, a run's description linking its siblings, a version's description
(a Markdown table of its metrics) and its teacher as a registry URI rather than a local path."""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

from .naming import registered_model_name, runs_view_link, saved_view

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "checkpoint"  # on a teacher version: the checkpoint it was logged from


def dataset_profile(annotations: Any) -> dict[str, int]:
    """Split sizes of an ``Annotations``: images, boxes and identities for training; gallery
    images and queries for the test protocol."""
    images = annotations.images
    train = images.indices("train")
    counts = images.box_offsets[1:] - images.box_offsets[:-1]
    return {"train_images": int(len(train)), "train_boxes": int(counts[train].sum()),
            "train_identities": int(annotations.num_train_ids), "test_images": int(len(images.indices("test"))),
            "queries": int(len(annotations.queries))}


def log_dataset(tracker: Any, cfg: Any, annotations: Any, source: str) -> None:
    """The run's dataset input: ``<dataset>``, the folder or URI,
    the annotation table's fingerprint as digest, the split sizes; the same facts as tags."""
    name = cfg.data.dataset  # which one exactly: the source and the digest say
    digest = annotations.images.fingerprint()
    profile = dataset_profile(annotations)
    tracker.log_dataset(name, source, digest, profile)
    tracker.set_tags({"dataset.name": name, "dataset.source": source, "dataset.digest": digest[:16]})


def pipeline_view(tracker: Any, pipeline_id: str | None, head: str) -> str | None:
    """Save the comparison of a pipeline's runs (teacher and student, headline metrics as
    columns, best student first) in the experiment; returns its link, None when not saved."""
    if not pipeline_id:
        return None
    key = f"pipeline-{pipeline_id}"
    view = saved_view(f"tags.pipeline_id = '{pipeline_id}'", order_by=f"{head}/mAP", metrics=[
        f"{head}/mAP", f"{head}/top1", "det/ap", f"two_step/{head}/mAP", f"teacher_gt/{head}/mAP"])
    return runs_view_link(tracker.experiment_id, key) if tracker.save_view(key, view) else None


def sweep_view(tracker: Any, name: str, metric: str, params: list[str], mode: str = "max") -> str | None:
    """Save the comparison of a sweep's trials (nested under ``tracker``'s run): its metric and
    searched params as columns, best first; returns its link."""
    if tracker.run_id is None:
        return None
    key = f"sweep-{name}"
    view = saved_view(f"tags.mlflow.parentRunId = '{tracker.run_id}'", metrics=[metric], params=params, order_by=metric,
                      ascending=mode == "min")
    return runs_view_link(tracker.experiment_id, key) if tracker.save_view(key, view) else None


def pipeline_description(role: str, pipeline_id: str | None, link: str | None) -> str:
    """A run's description: what it is, and the link to its pipeline's saved comparison."""
    what = {"teacher": "The Re-ID teacher (ground-truth crops); its knowledge bank feeds the student.",
            "student": "The distilled end-to-end student (detector + Re-ID)."}.get(role, f"A {role} run.")
    if not link:
        return what
    return f"{what}\n\nCompare the runs of pipeline `{pipeline_id}`: [teacher and student, side by side]({link})."


def sweep_description(link: str | None) -> str:
    """The sweep's parent run: what it is and the link to its trials' comparison."""
    text = "A Ray Tune sweep of the distillation weights and augmentation strength; its trials are nested below."
    return text + (f"\n\nCompare the trials: [best first, with the searched settings]({link})." if link else "")


def version_description(role: str, metrics: Mapping[str, float], headline: str | None,
                        lineage: Mapping[str, str | None]) -> str:
    """A registered version's description: a Markdown table of mAP / top-1 per protocol
    (headline first), detection figures, then where it comes from (teacher, bank, run, config)."""
    protocols = sorted({key.rsplit("/", 1)[0] for key in metrics if key.endswith(("/mAP", "/top1"))},
                       key=lambda p: (p != headline, p))
    lines = [f"**{role.capitalize()}**" + (f", headline protocol `{headline}`" if headline else "") + ".", "",
             "| protocol | mAP | top-1 |", "| --- | ---: | ---: |"]
    for protocol in protocols:
        label = f"**{protocol}**" if protocol == headline else protocol
        lines.append(f"| {label} | {_percent(metrics.get(f'{protocol}/mAP'))} | {_percent(metrics.get(f'{protocol}/top1'))} |")
    detection = [f"{key.split('/', 1)[1]} {_percent(value)}" for key, value in sorted(metrics.items())
                 if key.startswith("det/")]
    if detection:
        lines += ["", "Detection: " + ", ".join(detection) + "."]
    facts = [f"- {what}: `{value}`" for what, value in lineage.items() if value]
    if facts:
        lines += [""] + facts
    return "\n".join(lines)


def _percent(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "–"
    return f"{100 * number:.1f} %" if math.isfinite(number) else str(number)


def teacher_model_uri(teacher_ref: str, dataset: str, uri: str | None = None) -> str:
    """``teacher_ref`` as the registry names it: ``models:/dkd-teacher-<dataset>/<version>`` when
    a version of that model was logged from this checkpoint (its ``checkpoint`` tag), the
    reference itself otherwise (a models:/ URI, a run id, an unregistered checkpoint)."""
    if not teacher_ref or teacher_ref.startswith("models:/"):
        return teacher_ref
    from mlflow import MlflowClient

    from .naming import tracking_uri

    uri = uri or tracking_uri()
    name = registered_model_name("teacher", dataset)
    try:
        versions = MlflowClient(uri, uri).search_model_versions(f"name = '{name}'")
    except Exception as error:  # noqa: BLE001 - lineage is a courtesy: the path is still right
        logger.warning("could not look %s up in the registry (%s); recording the path", teacher_ref, error)
        return teacher_ref
    from dkd_ray import storage

    forms = {str(teacher_ref), storage.absolute(str(teacher_ref))}
    matching = [v for v in versions if v.tags.get(CHECKPOINT_TAG) in forms]
    if not matching:
        return teacher_ref
    return f"models:/{name}/{max(int(v.version) for v in matching)}"
