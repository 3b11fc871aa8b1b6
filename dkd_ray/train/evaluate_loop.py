"""Evaluate a trained model on the test protocol on Ray Train workers (inference sharded).

Used where a model exists already: a sweep's champion, ``jobs/evaluate.py --model``. The student's
gathered arrays travel in the run's checkpoint (``evaluation/``), as at the end of training, so
the driver writes per-query results and plots without running the model again; the teacher is
evaluated on the ground-truth boxes (the two-step reference with a perfect detector).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from dkd_ray.config import Config
from dkd_ray.models.loading import load_model
from dkd_ray.train.evaluation import evaluate_student
from dkd_ray.train.session import Session, current_session
from dkd_ray.train.teacher_finish import evaluate_teacher_on_ground_truth
from dkd_ray.train.workdata import load_training_annotations


def evaluate_model(loop_config: dict[str, Any], session: Session | None = None) -> dict[str, float]:
    """``loop_config``: ``{"config", "data_root", "model_ref", "role": "student" | "teacher"}``.
    Reports the metrics (and, for the student, the arrays) once; returns them on rank 0."""
    cfg = Config.from_dict(loop_config["config"])
    session = session or current_session(cfg.train.use_gpu, loop_config.get("checkpoint_root"),
                                        loop_config.get("run_dir"), loop_config.get("run_uri"))
    role = loop_config.get("role", "student")
    model = load_model(loop_config["model_ref"], role=role, map_location=session.device).to(session.device).eval()
    annotations = load_training_annotations(loop_config)
    with tempfile.TemporaryDirectory(prefix="dkd-eval-") as tmp:
        directory = Path(tmp)
        if role == "teacher":  # crops at the teacher's own input size
            metrics = evaluate_teacher_on_ground_truth(model, annotations, Config.from_dict(model.spec["config"]), session)
        else:
            metrics, arrays = evaluate_student(model, annotations, cfg, session)
            if arrays is not None:
                arrays.save(directory / "evaluation")
        session.report(metrics, directory if session.is_main else None, name="evaluation")
    return metrics
