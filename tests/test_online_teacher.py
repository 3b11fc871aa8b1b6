"""The online-teacher option (``distill.use_bank=false``) end to end: a teacher trained in-process
(the shared ``tiny_teacher`` run), then a student that loads it from its checkpoint folder and
runs it on roi_align crops of every batch, at the teacher's own input size."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dkd_ray.config import preset
from dkd_ray.distill.online import OnlineTeacher
from dkd_ray.models.loading import load_model
from dkd_ray.train.session import LocalSession
from dkd_ray.train.student_loop import train_student
from tests.tiny import TINY_OVERRIDES

KD_LOSSES = ("loss_kd_prob", "loss_kd_pair", "loss_kd_tri")


def test_student_with_the_online_teacher_from_a_checkpoint(tiny_cuhk, tiny_teacher, tmp_path, monkeypatch):
    trained = load_model(tiny_teacher, role="teacher").spec["config"]["teacher"]
    teacher_size = (trained["input_height"], trained["input_width"])
    calls = []
    original = OnlineTeacher.__call__

    def recording(self, images, boxes):
        emb, logits = original(self, images, boxes)
        calls.append((self.crop_size, self.crops(images, boxes).shape, bool(torch.isfinite(emb).all())))
        return emb, logits

    monkeypatch.setattr(OnlineTeacher, "__call__", recording)
    # The student's own config names another teacher input size: the teacher's stored one must win.
    cfg = preset("cpu-small", TINY_OVERRIDES + [
        "distill.use_bank=false", "train.max_iters=2", "student.epochs=1",
        f"teacher.input_height={teacher_size[0] // 2}", f"teacher.input_width={teacher_size[1] // 2}"])
    session = LocalSession(checkpoint_root=tmp_path)
    metrics = train_student({"config": cfg.to_dict(), "data_root": str(tiny_cuhk), "bank_path": "",
                             "teacher_ref": str(tiny_teacher)}, session)

    assert "cuhk_sysu/full/mAP" in metrics  # reached the end: final evaluation done
    assert len(calls) == 2 and all(finite for _, _, finite in calls)
    assert all(size == teacher_size and tuple(shape[2:]) == teacher_size for size, shape, _ in calls)
    trained_epoch = next(r for r in session.reports if any(k.startswith("train/loss_kd") for k in r))
    for name in KD_LOSSES:
        value = trained_epoch[f"train/{name}"]
        assert math.isfinite(value) and value > 0, (name, value)


def test_teacher_ref_reaches_ray_workers_as_a_loadable_reference(tmp_path, monkeypatch):
    from dkd_ray.stages import worker_teacher_ref

    (tmp_path / "teacher").mkdir()
    monkeypatch.chdir(tmp_path)
    assert worker_teacher_ref("teacher") == str(tmp_path / "teacher")  # workers run in another folder
    for ref in ("models:/dkd-teacher-cuhk_sysu/3", "models:/dkd-teacher-cuhk_sysu@champion",
                "0123456789abcdef0123456789abcdef", ""):
        assert worker_teacher_ref(ref) == ref
    assert Path(worker_teacher_ref(str(tmp_path / "teacher"))).is_absolute()
