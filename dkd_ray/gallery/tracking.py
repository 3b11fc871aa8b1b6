"""An indexing run in MLflow: the model's lineage (reference and weights digest), the counts,
``index.json`` and the search picture of a sample query (the index's most confident detection,
searched by image + box). Never fatal: an unreachable server costs the record, not the index."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from .index import IndexSummary, read_index

log = logging.getLogger(__name__)
EXPERIMENT = "dkd-ray/gallery"


def sample_search(model_ref: str, index_uri: str, tracking_uri: str | None, out_dir: Path) -> dict | None:
    from .index import boxes_of
    from .search_job import run_search

    _, table = read_index(index_uri)
    if not len(table):
        return None
    best = int(table.column("score").to_numpy().argmax())
    args = argparse.Namespace(model=model_ref, index=index_uri, query=[table.column("source")[best].as_py()],
                              box=[float(v) for v in boxes_of(table)[best]], top_k=10, min_score=0.0, source="",
                              time_range=None, method="auto", output_dir=out_dir, tracking_uri=tracking_uri)
    if Path(args.query[0]).suffix.lower() not in {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}:
        return None  # a video frame: the query must be an image file
    return run_search(args)


def log_index_run(uri: str, summary: IndexSummary, model_ref: str, index_uri: str) -> str | None:
    """The MLflow run id, or None when it could not be logged (a warning says why)."""
    try:
        import mlflow
        from mlflow import MlflowClient

        from dkd_ray.tracking import redact_uri

        from .index import read_info

        info = read_info(index_uri)
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            EXPERIMENT, tags={"mlflow.note.content": "Gallery indexes built by jobs/index_gallery.py: which model "
                                                     "(reference and weights digest), what was indexed, a sample search."})
        run = client.create_run(experiment_id, run_name=f"index-{Path(index_uri.rstrip('/')).name}", tags={
            "role": "index", "model_ref": redact_uri(str(model_ref)), "model_digest": info.model_digest,
            "index_uri": redact_uri(index_uri), "mlflow.source.name": "jobs/index_gallery.py"})
        run_id = run.info.run_id
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in {
            "files_new": summary.files_indexed, "files_already_indexed": summary.files_skipped,
            "frames": summary.frames, "boxes": summary.boxes, "seconds": summary.seconds,
            "files_in_index": len(info.files), "boxes_in_index": sum(f["boxes"] for f in info.files.values())}.items()])
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "index.json").write_text(info.to_json())
            client.log_artifact(run_id, str(Path(tmp) / "index.json"))
            outcome = sample_search(model_ref, index_uri, uri, Path(tmp) / "sample_search")
            if outcome is not None:
                client.log_artifacts(run_id, str(Path(tmp) / "sample_search"), "sample_search")
        client.set_terminated(run_id, "FINISHED")
        return run_id
    except Exception as error:  # noqa: BLE001 - the index is built; its record is best effort
        log.warning("the index is built, but its MLflow run could not be logged (%s: %s)", type(error).__name__, error)
        return None
