"""jobs/evaluate.py --model: the test protocol of a trained student, its inference sharded over
2 Ray Train workers of a local cluster, agrees with the evaluation the training run did itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from dkd_ray.config import preset
from dkd_ray.eval.arrays import Detections
from dkd_ray.train.evaluation import EvaluationArrays
from dkd_ray.train.session import LocalSession
from dkd_ray.train.student_loop import train_student
from tests.tiny import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]


def test_sharded_model_evaluation_matches_the_training_runs_own(tiny_cuhk, tiny_teacher, tmp_path):
    cfg = preset("cpu-small", TINY_OVERRIDES + ["train.max_iters=2", "data.dataset=synthetic",
                                                "eval.score_threshold=0.05"])
    session = LocalSession(checkpoint_root=tmp_path / "student")
    trained_metrics = train_student({"config": cfg.to_dict(), "data_root": str(tiny_cuhk),
                                     "bank_path": str(tiny_teacher / "bank")}, session)
    checkpoint = session.latest_checkpoint()
    own = EvaluationArrays.load(checkpoint / "evaluation")

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--dataset", "synthetic", "--data-root", str(tiny_cuhk),
         "--model", str(checkpoint), "--num-workers", "2", "--use-gpu", "false", "--score-threshold", "0.05",
         "--storage-path", str(tmp_path / "runs"), "--output-dir", str(out), "--no-plots"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]

    gallery = Detections.load(out / "gallery.npz")
    assert np.array_equal(gallery.offsets, own.gallery.offsets)  # every test image, in image order
    np.testing.assert_allclose(gallery.boxes, own.gallery.boxes, atol=1e-3)
    np.testing.assert_allclose(gallery.embeddings, own.gallery.embeddings, atol=1e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    for key, value in trained_metrics.items():
        if key in metrics:
            assert abs(metrics[key] - value) < 1e-6, key
    assert "cuhk_sysu/full/mAP" in metrics and "MLflow run" in result.stdout
