"""Scene transforms, datasets and samplers: boxes stay on their pixels, shards are disjoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dkd_ray.data.datasets import (ERASE_FILL, ImageCache, PersonCropDataset, SceneDataset, collate_scenes,
                                   labelled_box_rows, load_image, pad_and_random_crop, random_erase)
from dkd_ray.data.samplers import PKBatchSampler, SkipBatches, scene_sampler
from dkd_ray.data.transforms import hflip_scene, resize_scene
from dkd_ray.distill.jitter import jitter_boxes
from tests.scene_fixtures import box_colour, painted_scene

BOXES = [[(10, 20, 40, 70, 0), (70, 5, 110, 45, -1)], [(0, 0, 30, 30, 1), (50, 40, 120, 80, 0)]]


def _colour_inside(image: torch.Tensor, box: torch.Tensor, margin: int) -> torch.Tensor:
    x1, y1, x2, y2 = (int(round(v)) for v in box.tolist())
    return image[:, y1 + margin : y2 - margin, x1 + margin : x2 - margin].reshape(3, -1)


@pytest.mark.parametrize("short_side,max_side,flip", [(200, 400, False), (200, 400, True), (40, 1000, True), (80, 100, False)])
def test_resize_and_flip_keep_boxes_on_their_pixels(tmp_path, short_side, max_side, flip):
    ann = painted_scene(tmp_path, BOXES)
    image = load_image(ann.image_path(0))
    boxes = torch.from_numpy(ann.images.boxes_of(0).copy())
    out, out_boxes = resize_scene(image, boxes, short_side, max_side)
    if flip:
        out, out_boxes = hflip_scene(out, out_boxes)
    h, w = out.shape[-2:]
    scale = min(short_side / 80, max_side / 120)
    assert (h, w) == (round(80 * scale), round(120 * scale))
    for k, box in enumerate(out_boxes, start=1):
        expected = torch.tensor(box_colour(k), dtype=torch.float32) / 255
        inside = _colour_inside(out, box, margin=2)
        assert inside.numel() > 0
        # Every pixel well inside the transformed box still carries the box's colour.
        assert torch.allclose(inside, expected[:, None].expand_as(inside), atol=0.02)
    # Numeric check of the mapping itself.
    sx, sy = w / 120, h / 80
    x1, y1, x2, y2 = BOXES[0][0][:4]
    expected_box = [x1 * sx, y1 * sy, x2 * sx, y2 * sy]
    if flip:
        expected_box = [w - x2 * sx, y1 * sy, w - x1 * sx, y2 * sy]
    assert torch.allclose(out_boxes[0], torch.tensor(expected_box), atol=1e-4)


def test_double_flip_is_identity():
    image = torch.rand(3, 7, 11)
    boxes = torch.tensor([[1.0, 2.0, 5.5, 6.0]])
    img2, boxes2 = hflip_scene(*hflip_scene(image, boxes))
    assert torch.equal(img2, image) and torch.allclose(boxes2, boxes)


def test_scene_dataset_targets_and_deterministic_flip(tmp_path):
    ann = painted_scene(tmp_path, BOXES)
    ds = SceneDataset(ann, short_side=160, max_side=400, flip_prob=0.5, seed=3)
    flips = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        image, target = ds[0]
        flips.append(target["flipped"])
        assert target["boxes"].shape == (2, 4) and target["pids"].tolist() == [0, -1]
        assert target["box_index"].tolist() == [0, 1] and target["orig_size"] == (80, 120)
        # The labelled box is still painted its own colour after resize and (maybe) flip.
        inside = _colour_inside(image, target["boxes"][0], margin=2)
        assert torch.allclose(inside.mean(1), torch.tensor(box_colour(1), dtype=torch.float32) / 255, atol=0.02)
        again, target_again = ds[0]
        assert target_again["flipped"] == target["flipped"] and torch.equal(again, image)
    assert any(flips) and not all(flips)
    images, targets = collate_scenes([ds[0], ds[1]])
    assert len(images) == 2 and targets[1]["box_index"].tolist() == [2, 3]


def test_scene_dataset_skips_an_unreadable_image(tmp_path, caplog):
    ann = painted_scene(tmp_path, BOXES)
    ann.image_path(0).write_bytes(b"not an image")
    ds = SceneDataset(ann, short_side=80, max_side=200)
    _, target = ds[0]
    assert target["image_index"] == 1
    assert "scene0.png" in caplog.text


def test_person_crops_exact_and_isa(tmp_path):
    ann = painted_scene(tmp_path, BOXES)
    rows = labelled_box_rows(ann)
    assert rows.tolist() == [0, 2, 3]
    exact = PersonCropDataset(ann, crop_size=(32, 16))
    crop, pid, box_index, image_index = exact[0]
    assert crop.shape == (3, 32, 16) and (pid, box_index, image_index) == (0, 0, 0)
    assert torch.allclose(crop.mean((1, 2)), torch.tensor(box_colour(1), dtype=torch.float32) / 255, atol=0.02)
    jittered = PersonCropDataset(ann, crop_size=(32, 16), isa_strength=0.5, seed=1)
    a, b = jittered[0][0], jittered[0][0]
    assert torch.equal(a, b)  # same (seed, epoch, index): same jitter
    jittered.set_epoch(1)
    assert not torch.equal(jittered[0][0], a)
    assert not torch.allclose(a, crop)


def test_bot_pad_crop_and_random_erasing():
    crop = torch.rand(3, 64, 32)
    rng = np.random.default_rng(0)
    shifted = [pad_and_random_crop(crop, 10, rng) for _ in range(50)]
    assert all(s.shape == crop.shape for s in shifted)
    # Each is the crop moved by up to 10 px with black borders: some rows or columns are zero.
    assert any(torch.equal(s, crop) for s in shifted) or all((s == 0).any() for s in shifted)
    assert sum(not torch.equal(s, crop) for s in shifted) > 40
    fill = torch.tensor(ERASE_FILL)[:, None]
    fractions = []
    for seed in range(200):
        erased = random_erase(crop, np.random.default_rng(seed))
        changed = (erased != crop).any(0)
        assert torch.allclose(erased[:, changed], fill.expand(3, int(changed.sum())))  # filled with the mean
        fractions.append(changed.float().mean().item())
    assert 0.015 < min(fractions) and max(fractions) < 0.45  # area 2-40 % (rounding aside)
    assert torch.equal(random_erase(crop, np.random.default_rng(5)), random_erase(crop, np.random.default_rng(5)))


def test_teacher_crops_are_deterministic_per_sample_with_every_augmentation(tmp_path):
    ann = painted_scene(tmp_path, BOXES)
    crops = PersonCropDataset(ann, crop_size=(32, 16), isa_strength=0.2, flip_prob=0.5, random_erasing=0.5,
                              pad=4, seed=3)
    first = [crops[i][0] for i in range(len(crops))]
    assert all(torch.equal(a, crops[i][0]) for i, a in enumerate(first))  # any loader process, any rank


def test_image_cache_is_bounded_in_bytes(tmp_path):
    from PIL import Image

    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((100, 100, 3), 40 * i, dtype=np.uint8)).save(path)
        paths.append(str(path))
    cache = ImageCache(max_bytes=2 * 3 * 100 * 100)  # room for two images as uint8
    for path in paths:
        image = cache.get(path)
        assert image.dtype == torch.float32 and image.shape == (3, 100, 100)
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    assert cache.get(paths[-1])[0, 0, 0].item() == pytest.approx(160 / 255)


def test_scene_sampler_shards_are_disjoint_and_reshuffled():
    data = list(range(23))
    shards = [list(scene_sampler(data, rank=r, world_size=3, seed=5)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    assert set().union(*map(set, shards)) == set(data)
    sampler = scene_sampler(data, rank=0, world_size=3, seed=5)
    sampler.set_epoch(1)
    assert list(sampler) != shards[0]


def test_pk_sampler_epoch_covers_every_crop_about_once_as_bot_does():
    # 30 identities with 4..15 crops: 8 * 30 = 240 crops cut into 4-groups, a remainder left out.
    counts = np.tile([4, 6, 8, 10, 15, 5], 5)
    pids = np.repeat(np.arange(30), counts)
    groups = int((counts // 4).sum())  # 51
    workers = [PKBatchSampler(pids, p=4, k=4, rank=r, world_size=2, seed=3) for r in range(2)]
    assert len(workers[0]) == len(workers[1]) == (groups // 4) // 2 == 6
    drawn = []
    for sampler in workers:
        for batch in sampler:
            ids = pids[batch].reshape(4, 4)
            assert (ids == ids[:, :1]).all() and len(set(ids[:, 0])) == 4  # 4 identities x 4 crops
            drawn.extend(batch)
    assert len(drawn) == len(set(drawn)) == 6 * 2 * 16  # no crop twice in an epoch: one pass
    # Many more iterations than one group per identity would give (30 // 4 = 7 batches).
    old = PKBatchSampler(pids, p=4, k=4, world_size=1, seed=3, epoch_unit="identities")
    assert len(old) == 7 and len(PKBatchSampler(pids, p=4, k=4, world_size=1, seed=3)) == 12
    # Identities seen in proportion to their crops: the 15-crop ones three times as often as the 5s.
    one = PKBatchSampler(pids, p=4, k=4, seed=0)
    seen = np.concatenate([pids[b] for e in range(20) for b in (one.set_epoch(e), list(one))[1]])
    per_identity = np.bincount(seen, minlength=30) / 20
    assert per_identity[counts == 15].mean() > 2.5 * per_identity[counts == 5].mean()


def test_pk_sampler_batches_disjoint_identities_across_workers():
    pids = np.repeat(np.arange(20), [1, 2, 3, 4, 5] * 4)
    workers = [PKBatchSampler(pids, p=4, k=3, rank=r, world_size=2, seed=0, epoch_unit="identities")
               for r in range(2)]
    seen = []
    for sampler in workers:
        assert len(sampler) == 2
        for batch in sampler:
            assert len(batch) == 12
            ids = pids[batch].reshape(4, 3)
            assert (ids == ids[:, :1]).all() and len(set(ids[:, 0])) == 4
            seen.extend(ids[:, 0].tolist())
    assert len(seen) == len(set(seen))  # no identity in two batches of one epoch
    first = [b for b in workers[0]]
    workers[0].set_epoch(1)
    assert [b for b in workers[0]] != first


def test_skip_batches_resumes_mid_epoch():
    sampler = PKBatchSampler(np.repeat(np.arange(12), 4), p=2, k=2, seed=7)
    full = list(sampler)
    assert list(SkipBatches(sampler, 2)) == full[2:] and len(SkipBatches(sampler, 2)) == len(full) - 2


def test_jitter_strength_zero_is_identity_and_stays_inside():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 100.0], [0.0, 0.0, 5.0, 5.0]])
    assert torch.equal(jitter_boxes(boxes, (120, 80), 0.0, num=3), boxes[:, None].expand(2, 3, 4))
    out = jitter_boxes(boxes, (120, 80), 1.0, num=500, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 500, 4)
    assert (out[..., 0] >= 0).all() and (out[..., 1] >= 0).all()
    assert (out[..., 2] <= 80).all() and (out[..., 3] <= 120).all()
    assert (out[..., 2] - out[..., 0] >= 1 - 1e-5).all() and (out[..., 3] - out[..., 1] >= 1 - 1e-5).all()


@pytest.mark.parametrize("strength", [0.1, 0.3])
def test_jitter_statistics_match_strength(strength):
    # A box far from the borders, so clipping never applies: log-scale and centre shift are
    # uniform on [-s, s], whose mean absolute value is s / 2.
    box = torch.tensor([[400.0, 400.0, 440.0, 480.0]])
    out = jitter_boxes(box, (2000, 2000), strength, num=20000, generator=torch.Generator().manual_seed(1))[0]
    w, h = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
    log_w = torch.log(w / 40)
    shift_x = ((out[:, 0] + out[:, 2]) / 2 - 420) / 40
    assert abs(log_w.mean().item()) < 0.01
    assert log_w.abs().mean().item() == pytest.approx(strength / 2, rel=0.05)
    assert log_w.abs().max().item() <= strength + 1e-5
    assert shift_x.abs().mean().item() == pytest.approx(strength / 2, rel=0.05)
    assert torch.log(h / 80).abs().max().item() <= strength + 1e-5
