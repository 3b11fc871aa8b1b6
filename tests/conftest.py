"""Shared fixtures: tiny synthetic datasets in the real layout, generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny import TINY_OVERRIDES

# Tests must never wait on a remote MLflow or pick up a user's server.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def tiny_cuhk(tmp_path_factory) -> Path:
    """A tiny synthetic CUHK-SYSU folder (pixels and MATLAB files, edge cases planted)."""
    from dkd_ray.data.synthetic import generate

    root = tmp_path_factory.mktemp("tiny") / "CUHK-SYSU"
    generate(root, "cuhk_sysu", "tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_teacher(tiny_cuhk, tmp_path_factory) -> Path:
    """A teacher trained in-process for 2 iterations on ``tiny_cuhk``: its final checkpoint
    folder, which holds ``state.pt`` and the knowledge bank (``bank/``)."""
    from dkd_ray.config import preset
    from dkd_ray.train.session import LocalSession
    from dkd_ray.train.teacher_loop import train_teacher

    cfg = preset("cpu-small", TINY_OVERRIDES + ["train.max_iters=2"])
    session = LocalSession(checkpoint_root=tmp_path_factory.mktemp("teacher"))
    train_teacher({"config": cfg.to_dict(), "data_root": str(tiny_cuhk)}, session)
    return session.latest_checkpoint()


@pytest.fixture(scope="session")
def tiny_students(tiny_cuhk, tiny_teacher, tmp_path_factory) -> tuple[Path, Path]:
    """Two checkpoints of one student trained in-process on ``tiny_cuhk`` (iterations 1 and 2:
    two models with different weights, for tests that tell models apart)."""
    from dkd_ray.config import preset
    from dkd_ray.train.session import LocalSession, checkpoint_folders
    from dkd_ray.train.student_loop import train_student

    cfg = preset("cpu-small", TINY_OVERRIDES + ["train.max_iters=2", "train.checkpoint_every_iters=1",
                                                "eval.two_step=false"])
    root = tmp_path_factory.mktemp("student")
    train_student({"config": cfg.to_dict(), "data_root": str(tiny_cuhk), "bank_path": str(tiny_teacher / "bank")},
                  LocalSession(checkpoint_root=root))
    newest, older = checkpoint_folders(root)[:2]
    return newest, older


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3-compatible server (moto) on 127.0.0.1 for one test module, with the standard
    ``AWS_*`` variables pointing this process at it while the module runs."""
    from tests.harness import s3_server

    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
