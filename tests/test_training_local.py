"""The training loops in-process (no Ray): teacher -> bank -> student, and exact resumption."""

from __future__ import annotations

import torch

from dkd_ray.config import preset
from dkd_ray.data import load_annotations
from dkd_ray.data.datasets import labelled_box_rows
from dkd_ray.distill.bank import KnowledgeBank
from dkd_ray.models.loading import load_model
from dkd_ray.train.checkpoint import load_checkpoint
from dkd_ray.train.session import LocalSession
from dkd_ray.train.student_loop import train_student
from tests.tiny import TINY_OVERRIDES


def test_teacher_checkpoint_holds_model_and_complete_bank(tiny_cuhk, tiny_teacher):
    annotations = load_annotations("cuhk_sysu", tiny_cuhk)
    state = load_checkpoint(tiny_teacher)
    assert state.extra["role"] == "teacher" and state.iteration == 2
    bank = KnowledgeBank.load(tiny_teacher / "bank")
    rows = labelled_box_rows(annotations, "train")
    assert len(bank) == 2 * len(rows)  # every labelled training box, plain and flipped
    teacher = load_model(tiny_teacher, role="teacher")
    emb, logits = bank.lookup(torch.from_numpy(rows[:3]), torch.tensor([False, True, False]))
    assert emb.shape == (3, teacher.embedding_dim) and logits.shape == (3, annotations.num_train_ids)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-4)


def _student_run(tiny_cuhk, tiny_teacher, root, trace, monkeypatch, max_iters, overrides=()):
    monkeypatch.setenv("DKD_TRACE_FILE", str(trace))
    cfg = preset("cpu-small", TINY_OVERRIDES + ["train.deterministic=true", "train.checkpoint_every_iters=2",
                                                f"train.max_iters={max_iters}", "student.epochs=2", *overrides])
    session = LocalSession(checkpoint_root=root)
    metrics = train_student({"config": cfg.to_dict(), "data_root": str(tiny_cuhk),
                             "bank_path": str(tiny_teacher / "bank")}, session)
    return session, metrics


def test_interrupted_and_resumed_student_ends_with_identical_weights(tiny_cuhk, tiny_teacher, tmp_path, monkeypatch):
    total = 5  # crosses the epoch boundary (the tiny train split is 4 batches of 2 images... per epoch)
    straight, metrics = _student_run(tiny_cuhk, tiny_teacher, tmp_path / "straight", tmp_path / "straight.txt",
                                     monkeypatch, total)
    assert "cuhk_sysu/full/mAP" in metrics and 0.0 <= metrics["cuhk_sysu/full/mAP"] <= 1.0
    # The interrupted run stops after 3 iterations: its latest checkpoint is from iteration 2.
    resumed_root = tmp_path / "resumed"
    _student_run(tiny_cuhk, tiny_teacher, resumed_root, tmp_path / "first.txt", monkeypatch, 3)
    latest = LocalSession(checkpoint_root=resumed_root).latest_checkpoint()
    (resumed_root / "LATEST").write_text(
        sorted(p.name for p in resumed_root.iterdir() if p.name.startswith("student_e") and "i0000002" in p.name)[0])
    assert latest is not None
    _student_run(tiny_cuhk, tiny_teacher, resumed_root, tmp_path / "second.txt", monkeypatch, total)

    straight_trace = (tmp_path / "straight.txt").read_text().split("\n")[:-1]
    first = (tmp_path / "first.txt").read_text().split("\n")[:-1]
    second = (tmp_path / "second.txt").read_text().split("\n")[:-1]
    # Lineage of the resumed model: iterations 1-2 of the first run, then 3..5 of the second.
    assert [line.split()[0] for line in second] == ["3", "4", "5"]
    assert first[:2] + second == straight_trace  # same batches, none skipped or repeated

    a = load_checkpoint(LocalSession(checkpoint_root=tmp_path / "straight").latest_checkpoint()).model
    b = load_checkpoint(LocalSession(checkpoint_root=resumed_root).latest_checkpoint()).model
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_student_with_a_validation_split_reports_validation_metrics_only(tiny_cuhk, tiny_teacher, tmp_path):
    cfg = preset("cpu-small", TINY_OVERRIDES + ["train.max_iters=1", "data.validation_fraction=0.3"])
    metrics = train_student({"config": cfg.to_dict(), "data_root": str(tiny_cuhk),
                             "bank_path": str(tiny_teacher / "bank")}, LocalSession(checkpoint_root=tmp_path))
    assert "val/mAP" in metrics and "val/top1" in metrics and 0.0 <= metrics["val/mAP"] <= 1.0
    counts = [v for k, v in metrics.items() if k.startswith("val/cuhk_sysu/g") and k.endswith("/num_queries")]
    assert counts and all(c > 0 for c in counts)  # held-out identities were searched for
    assert not any(k.startswith("cuhk_sysu/") for k in metrics)  # the test protocol was not run
