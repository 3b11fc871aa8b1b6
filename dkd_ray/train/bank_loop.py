"""Build the knowledge bank of an existing teacher on the cluster (one shard per worker), for a
student run whose teacher came from the registry without a recorded bank."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from dkd_ray.config import Config
from dkd_ray.models.loading import load_model
from dkd_ray.train.session import Session, current_session
from dkd_ray.train.teacher_finish import build_bank_shard
from dkd_ray.train.workdata import load_training_annotations


def build_bank(loop_config: dict[str, Any], session: Session | None = None) -> None:
    cfg = Config.from_dict(loop_config["config"])
    session = session or current_session(cfg.train.use_gpu, loop_config.get("checkpoint_root"),
                                        loop_config.get("run_dir"), loop_config.get("run_uri"))
    uri = (loop_config.get("mlflow") or {}).get("uri") or loop_config.get("tracking_uri")  # the driver's MLflow
    teacher = load_model(loop_config["teacher_ref"], role="teacher", uri=uri).to(session.device)
    annotations = load_training_annotations(loop_config)
    with tempfile.TemporaryDirectory(prefix="dkd-bank-") as tmp:
        build_bank_shard(teacher, annotations, cfg, session, Path(tmp), metadata={"teacher": loop_config["teacher_ref"]})
        session.report({"bank_shards": session.world_size}, Path(tmp), name="knowledge_bank")
