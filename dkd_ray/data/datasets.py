"""Torch datasets over the internal annotation form.

- ``SceneDataset``: whole scene images with their boxes and person ids (the student, evaluation).
- ``PersonCropDataset``: labelled-person crops (the teacher, the knowledge bank), with ISA
  (crops from jittered ground-truth boxes) through the shared ``jitter_boxes``.

Random choices (flip, jitter) are drawn from ``(seed, epoch, index)``, not from a worker's global
RNG, so a sample is the same whichever loader process or cluster worker produces it, and a run
resumed mid-epoch sees exactly the samples it would have seen. Call ``set_epoch`` each epoch.

A scene that fails to decode is reported once and replaced by the next readable one, so a long
run never dies on one bad file (``jobs/validate_dataset.py`` lists such files up front).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dkd_ray.data.annotations import Annotations
from dkd_ray.data.transforms import hflip_scene, resize_scene
from dkd_ray.distill.jitter import jitter_boxes

log = logging.getLogger(__name__)

_UNREADABLE = (OSError, UnidentifiedImageError, ValueError)


def load_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to a float ``[3, H, W]`` tensor in [0, 1] (grayscale/CMYK -> RGB)."""
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255.0)


@lru_cache(maxsize=64)
def _cached_image(path: str) -> torch.Tensor:
    # Person crops of one scene are often drawn close together (P x K batches, the bank).
    return load_image(path)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


class SceneDataset(Dataset):
    """Scenes of one split: ``(image [3,H,W], target)`` with ``target`` holding ``boxes`` [n,4],
    ``pids`` [n] (-1 unlabelled), ``box_index`` [n] (global box rows), ``image_index``,
    ``flipped``, ``orig_size`` (h, w) and ``scale``."""

    def __init__(
        self,
        annotations: Annotations,
        indices: np.ndarray | None = None,
        *,
        split: str = "train",
        short_side: int = 900,
        max_side: int = 1500,
        flip_prob: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.ann = annotations
        self.indices = np.asarray(annotations.images.indices(split) if indices is None else indices, dtype=np.int64)
        self.short_side, self.max_side = short_side, max_side
        self.flip_prob, self.seed, self.epoch = flip_prob, seed, 0
        self._reported: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, dict]:
        for offset in range(min(len(self.indices), 16)):
            position = (item + offset) % len(self.indices)
            image_index = int(self.indices[position])
            try:
                return self._load(position, image_index)
            except _UNREADABLE as err:
                if image_index not in self._reported:
                    self._reported.add(image_index)
                    log.warning("skipping unreadable image %s: %s", self.ann.image_path(image_index), err)
        raise RuntimeError(f"no readable image near position {item} of {self.ann.root}: run jobs/validate_dataset.py")

    def _load(self, position: int, image_index: int) -> tuple[torch.Tensor, dict]:
        images = self.ann.images
        start, stop = images.box_offsets[image_index], images.box_offsets[image_index + 1]
        image = load_image(self.ann.image_path(image_index))
        orig_size = tuple(image.shape[-2:])
        boxes = torch.from_numpy(images.boxes[start:stop].copy())
        image, boxes = resize_scene(image, boxes, self.short_side, self.max_side)
        flipped = bool(self.flip_prob > 0 and sample_rng(self.seed, self.epoch, position).random() < self.flip_prob)
        if flipped:
            image, boxes = hflip_scene(image, boxes)
        target = {
            "boxes": boxes,
            "pids": torch.from_numpy(images.pids[start:stop].astype(np.int64)),
            "box_index": torch.arange(start, stop, dtype=torch.int64),
            "image_index": image_index,
            "flipped": flipped,
            "orig_size": orig_size,
            "scale": image.shape[-1] / orig_size[1],
        }
        return image, target


def collate_scenes(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    images, targets = zip(*batch)
    return list(images), list(targets)


class PersonCropDataset(Dataset):
    """Crops of labelled people: ``(crop [3,h,w], pid, box_index, image_index)``.

    ``isa_strength > 0`` takes each crop from a jittered copy of its ground-truth box (ISA);
    0 gives the exact box (the knowledge bank). ``random_erasing`` is the usual Re-ID erasing.
    """

    def __init__(
        self,
        annotations: Annotations,
        box_rows: np.ndarray | None = None,
        *,
        split: str = "train",
        crop_size: tuple[int, int] = (256, 128),
        isa_strength: float = 0.0,
        flip_prob: float = 0.0,
        random_erasing: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.ann = annotations
        if box_rows is None:
            box_rows = labelled_box_rows(annotations, split)
        self.box_rows = np.asarray(box_rows, dtype=np.int64)
        self.box_image = annotations.images.box_image_index()[self.box_rows]
        self.pids = annotations.images.pids[self.box_rows].astype(np.int64)
        self.crop_size = tuple(crop_size)
        self.isa_strength, self.flip_prob, self.seed, self.epoch = isa_strength, flip_prob, seed, 0
        self.eraser = None
        if random_erasing > 0:
            from torchvision.transforms import RandomErasing

            self.eraser = RandomErasing(p=random_erasing, value=0.0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.box_rows)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, int, int]:
        image_index = int(self.box_image[item])
        image = _cached_image(str(self.ann.image_path(image_index)))
        box = torch.from_numpy(self.ann.images.boxes[self.box_rows[item]].copy())[None]
        rng = sample_rng(self.seed, self.epoch, item)
        if self.isa_strength > 0:
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            box = jitter_boxes(box, tuple(image.shape[-2:]), self.isa_strength, generator=generator)[:, 0]
        crop = crop_and_resize(image, box[0], self.crop_size)
        if self.flip_prob > 0 and rng.random() < self.flip_prob:
            crop = crop.flip(-1)
        if self.eraser is not None:
            crop = self.eraser(crop)
        return crop, int(self.pids[item]), int(self.box_rows[item]), image_index


def crop_and_resize(image: torch.Tensor, box: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear crop of ``box`` (x1 y1 x2 y2) from ``image`` [3,H,W] resized to ``size`` (h, w)."""
    from torchvision.ops import roi_align

    rois = torch.cat([box.new_zeros(1), box.to(image.dtype)])[None]
    return roi_align(image[None], rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)[0]


def labelled_box_rows(annotations: Annotations, split: str = "train") -> np.ndarray:
    """Global box rows of the labelled people (pid >= 0) in the images of ``split``."""
    images = annotations.images
    in_split = np.zeros(len(images), dtype=bool)
    in_split[images.indices(split)] = True
    return np.flatnonzero(in_split[images.box_image_index()] & (images.pids >= 0))
