"""Knowledge bank (build, load, lookup, shards, atomic write) and the online teacher.

A tiny stand-in teacher with the ReIDTeacher interface keeps these tests independent of the
real teacher: ``forward_with_logits(crops) -> (L2-normalised emb [B, dt], logits [B, K])``.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dkd_ray.distill import bank as bank_module
from dkd_ray.distill.bank import KnowledgeBank, build_knowledge_bank, build_knowledge_bank_sharded
from dkd_ray.distill.online import OnlineTeacher

CROP = (16, 8)
DIM, CLASSES = 6, 4


class TinyTeacher(nn.Module):
    """Conv + 2x2 pooled grid (so a horizontal flip changes the output) + BN-neck + classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.embed = nn.Linear(16, DIM)
        self.neck = nn.BatchNorm1d(DIM)  # train and eval mode differ: the bank must use eval
        self.classifier = nn.Linear(DIM, CLASSES)
        self.embedding_dim, self.num_classes = DIM, CLASSES
        with torch.no_grad():  # non-trivial running statistics
            self.neck.running_mean.uniform_(-0.5, 0.5)
            self.neck.running_var.uniform_(0.5, 2.0)

    def forward_with_logits(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = F.adaptive_avg_pool2d(torch.relu(self.conv(crops)), (2, 2)).flatten(1)
        features = self.neck(self.embed(grid))
        return F.normalize(features, dim=1), self.classifier(features)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.forward_with_logits(crops)[0]


class FailingTeacher(TinyTeacher):
    """Raises on its fifth call: a crash in the middle of building; notes the folder at that time."""

    def __init__(self, folder) -> None:
        super().__init__()
        self.calls, self.folder, self.files_at_crash = 0, folder, None

    def forward_with_logits(self, crops):
        self.calls += 1
        if self.calls == 5:
            self.files_at_crash = sorted(p.name for p in self.folder.iterdir())
            raise RuntimeError("teacher crashed")
        return super().forward_with_logits(crops)


BOX_INDEX = torch.tensor([0, 2, 3, 5, 7, 8, 11])  # global box rows with gaps (unlabelled boxes)
IMAGE_INDEX = torch.tensor([0, 0, 1, 1, 2, 3, 3])


def _crops(n: int = len(BOX_INDEX)) -> torch.Tensor:
    return torch.rand(n, 3, *CROP, generator=torch.Generator().manual_seed(1))  # random: not symmetric


def _batches(crops, box_index, image_index, size=3):
    for start in range(0, len(crops), size):
        yield crops[start:start + size], box_index[start:start + size], image_index[start:start + size]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    teacher, crops = TinyTeacher(), _crops()
    teacher.train()  # the builder must switch to eval and restore the mode afterwards
    path = tmp_path_factory.mktemp("bank") / "bank.parquet"
    meta = {"teacher_uri": "models:/dkd-teacher/3", "dataset": "synthetic", "splits": ["train"]}
    build_knowledge_bank(teacher, _batches(crops, BOX_INDEX, IMAGE_INDEX), path, metadata=meta, progress=False)
    assert teacher.training
    return teacher.eval(), crops, path, meta


def test_lookup_returns_the_teachers_outputs_for_box_and_flip(built):
    teacher, crops, path, _ = built
    bank = KnowledgeBank.load(path)
    assert len(bank) == 2 * len(BOX_INDEX)
    assert (bank.embedding_dim, bank.num_classes) == (DIM, CLASSES)
    order = torch.tensor([4, 0, 6, 4])  # any order, repeats allowed (FSA copies share their box)
    with torch.no_grad():
        plain = teacher.forward_with_logits(crops[order])
        flipped = teacher.forward_with_logits(torch.flip(crops[order], dims=(3,)))
    for flip, expected in ((False, plain), (True, flipped)):
        emb, logits = bank.lookup(BOX_INDEX[order], torch.full((4,), flip))
        torch.testing.assert_close(emb, expected[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(logits, expected[1], rtol=0, atol=1e-6)
    assert not torch.allclose(plain[0], flipped[0], atol=1e-3)  # the flip really is a different input
    mixed_emb, _ = bank.lookup(BOX_INDEX[order], torch.tensor([False, True, False, True]))
    torch.testing.assert_close(mixed_emb[1], flipped[0][1], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed_emb[2], plain[0][2], rtol=0, atol=1e-6)


def test_unknown_box_is_a_key_error_naming_it(built):
    bank = KnowledgeBank.load(built[2])
    with pytest.raises(KeyError, match=r"\(4, False\)") as error:
        bank.lookup(torch.tensor([0, 4, 2, 99, -1]), torch.zeros(5, dtype=torch.bool))
    assert "(99, False)" in str(error.value) and "(-1, False)" in str(error.value)
    assert "3 box(es)" in str(error.value)


def test_metadata_round_trip(built):
    _, _, path, meta = built
    stored = KnowledgeBank.load(path).metadata
    for key, value in meta.items():
        assert stored[key] == value
    assert (stored["embedding_dim"], stored["num_classes"]) == (DIM, CLASSES)
    assert (stored["crop_height"], stored["crop_width"]) == CROP
    assert stored["flips"] == [False, True]
    assert stored["teacher_class"].endswith("TinyTeacher")


def test_reserved_or_unserialisable_metadata_is_rejected(tmp_path):
    batches = list(_batches(_crops(), BOX_INDEX, IMAGE_INDEX))
    with pytest.raises(ValueError, match="embedding_dim"):
        build_knowledge_bank(TinyTeacher(), batches, tmp_path / "a.parquet", metadata={"embedding_dim": 3},
                             progress=False)
    with pytest.raises(TypeError, match="when"):
        build_knowledge_bank(TinyTeacher(), batches, tmp_path / "b.parquet", metadata={"when": object()},
                             progress=False)


def test_crash_mid_way_leaves_no_bank(tmp_path, monkeypatch):
    monkeypatch.setattr(bank_module, "_ROWS_PER_ROW_GROUP", 2)  # rows reach the disk before the crash
    path = tmp_path / "bank.parquet"
    teacher = FailingTeacher(tmp_path)
    with pytest.raises(RuntimeError, match="teacher crashed"):
        build_knowledge_bank(teacher, _batches(_crops(), BOX_INDEX, IMAGE_INDEX, size=2), path, progress=False)
    assert len(teacher.files_at_crash) == 1 and teacher.files_at_crash[0].endswith(".tmp")  # written, unpublished
    assert list(tmp_path.iterdir()) == []  # neither the bank nor its temporary file


def test_many_row_groups_and_progress_lines(built, tmp_path, monkeypatch, capsys):
    teacher, crops, single_path, _ = built
    monkeypatch.setattr(bank_module, "_ROWS_PER_ROW_GROUP", 2)  # several row groups: chunked columns
    path = build_knowledge_bank(teacher, _batches(crops, BOX_INDEX, IMAGE_INDEX, size=2), tmp_path / "b.parquet",
                                progress_every=2)
    lines = capsys.readouterr().out.splitlines()
    counts = [re.match(r"knowledge bank b\.parquet: (\d+) batches, (\d+) rows, \d+ crops/s", line)
              for line in lines if "batches" in line]
    assert [(int(m.group(1)), int(m.group(2))) for m in counts] == [(2, 8), (4, 14)]  # 4 batches of <= 2 boxes
    assert "14 rows written" in lines[-1]
    flips = torch.tensor([True, False] * 3 + [False])
    for got, expected in zip(KnowledgeBank.load(path).lookup(BOX_INDEX, flips),
                             KnowledgeBank.load(single_path).lookup(BOX_INDEX, flips)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_sharded_parts_load_as_one_bank(built, tmp_path):
    teacher, crops, single_path, _ = built
    single = KnowledgeBank.load(single_path)
    rows = torch.arange(len(BOX_INDEX))
    for shard in range(3):
        mine = rows[shard::3]
        build_knowledge_bank_sharded(teacher, _batches(crops[mine], BOX_INDEX[mine], IMAGE_INDEX[mine]), tmp_path,
                                     shard_index=shard, num_shards=3, progress=False)
    bank = KnowledgeBank.load(tmp_path)
    assert len(bank) == len(single)
    flips = torch.tensor([False, True] * 3 + [True])
    for got, expected in zip(bank.lookup(BOX_INDEX, flips), single.lookup(BOX_INDEX, flips)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(bank.image_index.sort().values, single.image_index.sort().values)

    (tmp_path / "part-00001-of-00003.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="part-00001-of-00003"):
        KnowledgeBank.load(tmp_path)


def test_overlapping_shards_are_rejected(built, tmp_path):
    teacher, crops, _, _ = built
    for shard in range(2):  # both shards hold every box
        build_knowledge_bank_sharded(teacher, _batches(crops, BOX_INDEX, IMAGE_INDEX), tmp_path,
                                     shard_index=shard, num_shards=2, progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        KnowledgeBank.load(tmp_path)


def test_parts_from_different_teachers_are_rejected(built, tmp_path):
    teacher, crops, _, _ = built
    for shard, uri in ((0, "models:/t/1"), (1, "models:/t/2")):
        mine = torch.arange(len(BOX_INDEX))[shard::2]
        build_knowledge_bank_sharded(teacher, _batches(crops[mine], BOX_INDEX[mine], IMAGE_INDEX[mine]), tmp_path,
                                     shard_index=shard, num_shards=2, metadata={"teacher_uri": uri},
                                     progress=False)
    with pytest.raises(ValueError, match="teacher_uri"):
        KnowledgeBank.load(tmp_path)


# ------------------------------------------------------------------------------------ online teacher
def _smooth_image(height: int, width: int) -> torch.Tensor:
    y = torch.arange(height, dtype=torch.float32)[:, None]
    x = torch.arange(width, dtype=torch.float32)[None, :]
    return torch.stack([
        0.5 + 0.4 * torch.sin(x / 9.0) * torch.cos(y / 13.0),
        0.5 + 0.4 * torch.cos(x / 7.0 + y / 11.0),
        (x + y) / (height + width),
    ])


def test_online_crop_of_a_box_the_size_of_the_crop_is_the_cut_crop():
    image = _smooth_image(60, 40)
    online = OnlineTeacher(TinyTeacher(), crop_size=CROP)
    crop = online.crops([image], [torch.tensor([[10.0, 20.0, 18.0, 36.0]])])  # 8 wide, 16 high
    torch.testing.assert_close(crop[0], image[:, 20:36, 10:18], rtol=0, atol=1e-5)


def test_online_teacher_matches_the_bank_up_to_interpolation(tmp_path):
    teacher = TinyTeacher().eval()
    images = [_smooth_image(60, 40), _smooth_image(48, 52).flip(2)]
    boxes = [torch.tensor([[4.0, 6.0, 20.0, 38.0], [21.0, 10.0, 37.0, 58.0]]),  # 2x and 3x larger than CROP
             torch.tensor([[30.0, 2.0, 42.0, 26.0]])]  # 1.5x
    # The bank's crops: cut the exact box, resize with an anti-aliased bilinear filter.
    exact = torch.stack([
        F.interpolate(image[None, :, int(y1):int(y2), int(x1):int(x2)], size=CROP, mode="bilinear",
                      antialias=True, align_corners=False)[0]
        for image, image_boxes in zip(images, boxes) for x1, y1, x2, y2 in image_boxes.tolist()
    ])
    box_index = torch.tensor([10, 11, 12])
    build_knowledge_bank(teacher, [(exact, box_index, torch.tensor([0, 0, 1]))], tmp_path / "b.parquet",
                         flips=(False,), progress=False)
    bank = KnowledgeBank.load(tmp_path / "b.parquet")
    bank_emb, bank_logits = bank.lookup(box_index, torch.zeros(3, dtype=torch.bool))

    online = OnlineTeacher(teacher, crop_size=CROP)
    crops = online.crops(images, boxes)
    # Smooth image: only the resize filters differ (a box shifted by 1 px differs by ~0.02 here).
    assert (crops - exact).abs().mean(dim=(1, 2, 3)).max() < 0.005
    assert (crops - exact).abs().max() < 0.05
    emb, logits = online(images, boxes)
    assert emb.shape == (3, DIM) and logits.shape == (3, CLASSES)
    distance = (emb - bank_emb).norm(dim=1)
    assert distance.max() < 0.005, distance
    torch.testing.assert_close(logits, bank_logits, rtol=0, atol=0.02)
    # The tolerance means something: a box 2 px off is several times further from the bank.
    shifted = [boxes[0] + torch.tensor([2.0, 0.0, 2.0, 0.0]), boxes[1]]
    shifted_distance = (online(images, shifted)[0] - bank_emb).norm(dim=1)[:2]
    assert (shifted_distance > 4 * distance[:2]).all(), (shifted_distance, distance)


def test_online_teacher_batched_tensor_equals_list_and_stays_frozen():
    teacher = TinyTeacher()
    online = OnlineTeacher(teacher, crop_size=CROP)
    teacher.train()  # e.g. the student's .train() reached it: the online teacher must not care
    images = [_smooth_image(40, 30), _smooth_image(40, 30).flip(1)]
    boxes = [torch.tensor([[2.0, 3.0, 14.0, 30.0]]), torch.tensor([[5.0, 1.0, 25.0, 39.0], [0.0, 0.0, 9.0, 20.0]])]
    emb_list, logits_list = online(images, boxes)
    emb_batch, logits_batch = online(torch.stack(images), boxes)
    torch.testing.assert_close(emb_list, emb_batch)
    torch.testing.assert_close(logits_list, logits_batch)
    assert not teacher.training
    assert not emb_list.requires_grad and all(not p.requires_grad for p in teacher.parameters())
    assert math.isclose(emb_list.norm(dim=1).mean().item(), 1.0, rel_tol=1e-5)
    empty_emb, empty_logits = online(images, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert empty_emb.shape == (0, DIM) and empty_logits.shape == (0, CLASSES)


def test_identity_prototypes_are_normalised_means_over_both_flips():
    import torch

    from dkd_ray.distill.bank import KnowledgeBank

    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    bank = KnowledgeBank(image_index=torch.zeros(4, dtype=torch.long), box_index=torch.tensor([0, 0, 1, 2]),
                         flipped=torch.tensor([False, True, False, False]), embedding=emb,
                         logits=torch.zeros(4, 3), metadata={})
    box_pids = torch.tensor([0, 0, -1])  # boxes 0 and 1: identity 0; box 2 not a training identity
    prototypes = bank.identity_prototypes(box_pids, num_classes=2)
    # Identity 0: mean of (1,0), (0,1), (0,1) -> direction (1, 2); identity 1: no rows -> zero.
    torch.testing.assert_close(prototypes[0], torch.tensor([1.0, 2.0]) / 5 ** 0.5)
    torch.testing.assert_close(prototypes[1], torch.zeros(2))
