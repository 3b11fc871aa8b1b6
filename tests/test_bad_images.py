"""Training survives a bad image: scene and crop datasets skip an unreadable file (missing,
truncated, empty, a symlink loop), log it once, count it, keep their batches whole, and raise a
DatasetError naming the files only past ``max_unreadable_fraction`` (issue 12)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from dkd_ray.data.cache import load_annotations
from dkd_ray.data.datasets import PersonCropDataset, SceneDataset, collate_scenes
from dkd_ray.data.matlab import DatasetError
from dkd_ray.data.samplers import PKBatchSampler
from dkd_ray.errors import InputError
from dkd_ray.models.reid_losses import BatchHardTripletLoss
from tests.scene_fixtures import painted_scene

KINDS = ["missing", "truncated", "empty", "symlink_loop"]
CROP = (32, 16)


def break_image(path: Path, kind: str) -> None:
    if kind == "missing":
        path.unlink()
    elif kind == "truncated":  # the header survives: only a full decode notices
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "symlink_loop":
        path.unlink()
        path.symlink_to(path)  # ELOOP on open
    else:
        raise ValueError(kind)


@pytest.fixture
def annotations(tiny_cuhk, tmp_path):
    """A private copy of the synthetic tiny CUHK-SYSU (its images are about to be broken)."""
    root = tmp_path / "CUHK-SYSU"
    shutil.copytree(tiny_cuhk, root, ignore=shutil.ignore_patterns(".dkd_cache"))
    return load_annotations("cuhk_sysu", root, use_cache=False)


def teacher_crops(annotations, **kwargs) -> PersonCropDataset:
    return PersonCropDataset(annotations, crop_size=CROP, isa_strength=0.2, flip_prob=0.5, seed=1, **kwargs)


def replaceable_images(crops: PersonCropDataset) -> list[int]:
    """Training images each of whose labelled people also has a crop in another image."""
    good = []
    for image in np.unique(crops.box_image):
        pids = crops.pids[crops.box_image == image]
        if all(((crops.pids == p) & (crops.box_image != image)).any() for p in pids):
            good.append(int(image))
    return good


def warnings_about(caplog, path: Path) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and str(path) in r.getMessage()]


@pytest.mark.parametrize("kind", KINDS)
def test_scene_dataset_skips_counts_and_logs_one_bad_image_once(annotations, kind, caplog):
    train = annotations.images.indices("train")
    bad = int(train[3])
    path = annotations.image_path(bad)
    break_image(path, kind)
    scenes = SceneDataset(annotations, short_side=48, max_side=96)
    caplog.set_level(logging.WARNING)
    seen = []
    for _ in range(2):  # two epochs: still one warning
        for batch in BatchSampler(SequentialSampler(scenes), batch_size=4, drop_last=False):
            images, targets = collate_scenes([scenes[i] for i in batch])
            assert len(images) == len(targets) == len(batch)  # the batch keeps its size
            for image, target in zip(images, targets):
                assert image.shape[0] == 3 and min(image.shape[-2:]) > 0
                assert target["boxes"].shape == (len(target["pids"]), 4)
                seen.append(target["image_index"])
    assert bad not in seen and set(seen) == set(train.tolist()) - {bad}
    assert seen.count(int(train[4])) == 4  # the bad scene's place went to the next one, each epoch
    assert len(scenes.unreadable) == 1 and path in scenes.unreadable
    assert len(warnings_about(caplog, path)) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_crop_dataset_replaces_a_bad_crop_by_the_same_identity(annotations, kind, caplog):
    crops = teacher_crops(annotations)
    assert crops.on_unreadable == "replace"
    bad = replaceable_images(crops)[0]
    path = annotations.image_path(bad)
    break_image(path, kind)
    caplog.set_level(logging.WARNING)
    hit = np.flatnonzero(crops.box_image == bad)
    assert len(hit) > 0
    for item in range(len(crops)):
        crop, pid, box_index, image_index = crops[item]
        assert crop.shape == (3, *CROP)
        assert pid == crops.pids[item]  # the same identity: labels and P x K groups stay true
        assert image_index != bad and box_index in crops.box_rows
        assert annotations.images.pids[box_index] == pid  # the replacement's own box
        if item not in hit:
            assert box_index == crops.box_rows[item]
    assert len(crops.unreadable) == 1 and path in crops.unreadable
    assert len(warnings_about(caplog, path)) == 1
    # Deterministic: again, and in a fresh copy (another loader process), the same replacement.
    fresh = teacher_crops(annotations)
    for item in hit:
        first, again, other = crops[int(item)], crops[int(item)], fresh[int(item)]
        assert torch.equal(first[0], again[0]) and torch.equal(first[0], other[0])
        assert first[1:] == again[1:] == other[1:]


def test_pk_batches_keep_their_shape_through_loader_workers(annotations, caplog):
    crops = teacher_crops(annotations)
    bad = replaceable_images(crops)[0]
    break_image(annotations.image_path(bad), "truncated")
    p, k = 4, 2
    sampler = PKBatchSampler(crops.pids, p, k, seed=0)
    loader = DataLoader(crops, batch_sampler=sampler, num_workers=1)
    batches = 0
    for images, pids, box_rows, image_index in loader:
        assert images.shape == (p * k, 3, *CROP)
        groups = pids.reshape(p, k)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) == p
        assert bad not in image_index.tolist()
        loss = BatchHardTripletLoss(0.3)(torch.randn(p * k, 8), pids)
        assert torch.isfinite(loss)  # every anchor has a positive and a negative
        batches += 1
    assert batches == len(sampler) > 0


def test_an_identity_with_no_readable_crop_borrows_another_identitys(tmp_path, caplog):
    # scene0: pid 0; scene1: pid 1 (its only crop) and pid 0.
    ann = painted_scene(tmp_path, [[(10, 20, 40, 70, 0)], [(0, 0, 30, 30, 1), (50, 40, 120, 80, 0)]])
    crops = PersonCropDataset(ann, crop_size=CROP, flip_prob=0.5, seed=0)
    break_image(ann.image_path(1), "empty")
    crop, pid, box_index, image_index = crops[1]  # pid 1's crop
    assert (pid, box_index, image_index) == (0, 0, 0) and crop.shape == (3, *CROP)
    assert crops[1][1:] == (0, 0, 0) and len(crops.unreadable) == 1


@pytest.mark.parametrize("which", ["scenes", "crops"])
def test_more_bad_images_than_allowed_raise_a_dataset_error_naming_them(annotations, which):
    dataset = SceneDataset(annotations, short_side=48, max_side=96) if which == "scenes" else teacher_crops(annotations)
    assert dataset.unreadable.allowed == 1  # 1 % of 24 images, at least one
    images = replaceable_images(teacher_crops(annotations))[:2]
    paths = [annotations.image_path(i) for i in images]
    for path in paths:
        break_image(path, "missing")
    with pytest.raises(DatasetError) as raised:
        for item in range(len(dataset)):
            dataset[item]
    assert isinstance(raised.value, InputError)  # never retried
    assert any(str(p) in str(raised.value) for p in paths)
    assert raised.value.file in {str(p) for p in paths}
    # A larger allowance (constructor parameter) lets the same split through.
    lenient = (SceneDataset(annotations, short_side=48, max_side=96, max_unreadable_fraction=0.25)
               if which == "scenes" else teacher_crops(annotations, max_unreadable_fraction=0.25))
    assert lenient.unreadable.allowed >= 2
    for item in range(len(lenient)):
        lenient[item]
    assert len(lenient.unreadable) == 2


def test_too_many_bad_images_stay_a_dataset_error_across_loader_workers(annotations):
    # A DataLoader re-raises a worker's exception by its type with one argument; a type that
    # refuses that comes back as RuntimeError, which Ray would retry.
    crops = teacher_crops(annotations)
    for image in replaceable_images(crops)[:2]:
        break_image(annotations.image_path(image), "missing")
    loader = DataLoader(crops, batch_size=len(crops), num_workers=1)
    with pytest.raises(DatasetError, match="unreadable"):
        next(iter(loader))


def test_bank_crops_never_replace_a_bad_image(annotations):
    exact = PersonCropDataset(annotations, crop_size=CROP)  # the knowledge bank's crops
    assert exact.on_unreadable == "raise"
    bad = int(exact.box_image[0])
    path = annotations.image_path(bad)
    break_image(path, "truncated")
    readable = int(np.flatnonzero(exact.box_image != bad)[0])
    assert exact[readable][2] == exact.box_rows[readable]
    with pytest.raises(DatasetError) as raised:
        exact[0]
    assert raised.value.file == str(path) and "knowledge bank" in str(raised.value)
