"""Two data-parallel workers (gloo on 127.0.0.1, as Ray Train sets them up): the evaluation a
training run does with its test set sharded over the workers equals one process evaluating the
saved checkpoint. The random-init student trains its BatchNorm layers, and each worker updates
its own running statistics from its own batches, so this holds only if the workers' statistics are
made equal before they evaluate and before rank 0's copy is saved."""

from __future__ import annotations


import numpy as np
import torch

from dkd_ray.config import preset
from dkd_ray.train.session import LocalSession
from tests.ddp import train_student_on_workers
from tests.tiny import TINY_OVERRIDES


def _config():
    # 3 iterations per worker, different batches per worker: the BatchNorm statistics drift apart.
    return preset("cpu-small", TINY_OVERRIDES + ["train.max_iters=3", "data.dataset=synthetic",
                                                "eval.score_threshold=0.05", "train.seed=3"])


def test_sharded_evaluation_during_training_matches_the_saved_model(tiny_cuhk, tiny_teacher, tmp_path):
    from dkd_ray.data import load_annotations
    from dkd_ray.models.loading import load_model
    from dkd_ray.train.evaluation import EvaluationArrays, student_arrays
    from dkd_ray.train.workdata import dataset_layout

    checkpoint = train_student_on_workers({"config": _config().to_dict(), "data_root": str(tiny_cuhk),
                                           "bank_path": str(tiny_teacher / "bank")}, tmp_path)
    during_training = EvaluationArrays.load(checkpoint / "evaluation")

    cfg = _config()
    annotations = load_annotations(dataset_layout(cfg), tiny_cuhk)
    saved = load_model(checkpoint, role="student")
    statistics = [m.running_mean for m in saved.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert statistics and any(s.abs().sum() > 0 for s in statistics)  # trained BatchNorm, not frozen
    alone = student_arrays(saved, annotations, cfg, LocalSession(checkpoint_root=tmp_path / "alone"))

    gallery = during_training.gallery
    assert np.array_equal(gallery.offsets, alone.gallery.offsets), "detections per image differ"
    np.testing.assert_allclose(gallery.boxes, alone.gallery.boxes, atol=1e-3)
    np.testing.assert_allclose(gallery.embeddings, alone.gallery.embeddings, atol=1e-4)
    np.testing.assert_allclose(during_training.query_embeddings, alone.query_embeddings, atol=1e-4)

