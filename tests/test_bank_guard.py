"""The knowledge bank belongs to one annotation table, one set of identities and one teacher:
it records the table's fingerprint and the teacher's own input size, and a student refuses a
bank built on other annotations or over another number of classes."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from torch import nn

from dkd_ray.config import preset
from dkd_ray.data import load_annotations
from dkd_ray.data.splits import validation_split
from dkd_ray.distill.bank import FINGERPRINT_KEY, BankMismatchError, KnowledgeBank, build_knowledge_bank
from dkd_ray.models.loading import load_model
from dkd_ray.train.session import LocalSession
from tests.tiny import TINY_OVERRIDES


@pytest.fixture(scope="module")
def annotations(tiny_cuhk):
    return load_annotations("cuhk_sysu", tiny_cuhk)


def _one_box_moved(annotations):
    """The same dataset re-parsed with one box 1 px to the right (a re-parse, a fixed annotation)."""
    boxes = annotations.images.boxes.copy()
    boxes[3] += [1.0, 0.0, 1.0, 0.0]
    return replace(annotations, images=replace(annotations.images, boxes=boxes))


def test_fingerprint_covers_boxes_and_order_but_not_the_validation_view(annotations):
    images = annotations.images
    reference = images.fingerprint()
    assert reference == images.fingerprint() and len(reference) == 64
    assert _one_box_moved(annotations).images.fingerprint() != reference
    swapped = images.boxes.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # same boxes, other order: box rows would name other people
    assert replace(images, boxes=swapped).fingerprint() != reference
    pids = images.pids.copy()
    pids[int((images.pids >= 0).argmax())] += 1  # one labelled box's identity
    assert replace(images, pids=pids).fingerprint() != reference
    training_view, validation_view = validation_split(annotations, 0.3, seed=0)
    assert training_view.images.fingerprint() == reference  # box rows unchanged: the bank still fits
    assert validation_view.images.fingerprint() == reference


def test_bank_of_the_teacher_matches_its_annotations(tiny_teacher, annotations):
    bank = KnowledgeBank.load(tiny_teacher / "bank", annotations_fingerprint=annotations.images.fingerprint(),
                              num_classes=annotations.num_train_ids)
    assert bank.metadata[FINGERPRINT_KEY] == annotations.images.fingerprint()


def test_bank_built_on_another_table_is_refused_naming_path_and_fingerprints(tiny_teacher, annotations):
    moved = _one_box_moved(annotations).images.fingerprint()
    path = tiny_teacher / "bank"
    with pytest.raises(BankMismatchError) as error:
        KnowledgeBank.load(path, annotations_fingerprint=moved, num_classes=annotations.num_train_ids)
    message = str(error.value)
    assert str(path) in message
    assert annotations.images.fingerprint() in message and moved in message  # stored and current
    assert "Rebuild the bank for this dataset" in message


def test_bank_with_another_class_count_is_refused_naming_both(tiny_teacher, annotations):
    classes = annotations.num_train_ids
    with pytest.raises(BankMismatchError, match=rf"over {classes} classes.* {classes + 2} identities") as error:
        KnowledgeBank.load(tiny_teacher / "bank", annotations_fingerprint=annotations.images.fingerprint(),
                           num_classes=classes + 2)
    assert str(tiny_teacher / "bank") in str(error.value)


class _Teacher(nn.Module):
    embedding_dim, num_classes = 3, 2

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 5)

    def forward_with_logits(self, crops):
        out = self.linear(crops.mean(dim=(2, 3)))
        return nn.functional.normalize(out[:, :3], dim=1), out[:, 3:]


def test_old_bank_without_fingerprint_is_accepted_with_a_warning(tmp_path, caplog):
    crops = torch.rand(2, 3, 8, 4)
    build_knowledge_bank(_Teacher(), [(crops, torch.tensor([0, 1]), torch.tensor([0, 0]))], tmp_path / "old.parquet",
                         progress=False)
    with caplog.at_level(logging.WARNING, logger="dkd_ray.distill.bank"):
        bank = KnowledgeBank.load(tmp_path / "old.parquet", annotations_fingerprint="ab" * 32, num_classes=2)
    assert len(bank) == 4
    assert any("no annotations fingerprint" in r.getMessage() and "old.parquet" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(BankMismatchError, match="over 2 classes"):  # the class count is still checked
        KnowledgeBank.load(tmp_path / "old.parquet", annotations_fingerprint="ab" * 32, num_classes=3)


def test_bank_records_the_teachers_input_size_not_the_student_configs(tiny_cuhk, tiny_teacher, annotations, tmp_path):
    """A bank built for a student run (``bank_loop``) from a stored teacher: crops at the teacher's
    own input size, whatever the student's config says."""
    from dkd_ray.train.bank_loop import build_bank

    trained = load_model(tiny_teacher, role="teacher").spec["config"]["teacher"]
    teacher_size = [trained["input_height"], trained["input_width"]]
    student_size = [teacher_size[0] // 2, teacher_size[1] // 2]
    assert KnowledgeBank.load(tiny_teacher / "bank").metadata["teacher_input_size"] == teacher_size

    cfg = preset("cpu-small", TINY_OVERRIDES + [f"teacher.input_height={student_size[0]}",
                                                f"teacher.input_width={student_size[1]}"])
    build_bank({"config": cfg.to_dict(), "data_root": str(tiny_cuhk), "teacher_ref": str(tiny_teacher)},
               LocalSession(checkpoint_root=tmp_path))
    bank = KnowledgeBank.load(tmp_path / "knowledge_bank" / "bank",
                              annotations_fingerprint=annotations.images.fingerprint(),
                              num_classes=annotations.num_train_ids)
    assert bank.metadata["teacher_input_size"] == teacher_size
    assert [bank.metadata["crop_height"], bank.metadata["crop_width"]] == teacher_size  # what it was fed
    assert bank.metadata["teacher"] == str(tiny_teacher)


def test_student_refuses_a_bank_of_other_annotations(tiny_teacher, annotations):
    """The student loop's bank loading is guarded (``build_teacher_knowledge`` gets its annotations)."""
    from dkd_ray.train.student_loop import build_teacher_knowledge

    cfg = preset("cpu-small", TINY_OVERRIDES)
    loop_config = {"bank_path": str(tiny_teacher / "bank")}
    knowledge, dim = build_teacher_knowledge(cfg, loop_config, torch.device("cpu"), annotations)
    assert knowledge is not None and dim > 0
    training_view, _ = validation_split(annotations, 0.3, seed=0)  # a validation run's view still fits
    assert build_teacher_knowledge(cfg, loop_config, torch.device("cpu"), training_view)[0] is not None
    with pytest.raises(BankMismatchError, match="Rebuild the bank"):
        build_teacher_knowledge(cfg, loop_config, torch.device("cpu"), _one_box_moved(annotations))
