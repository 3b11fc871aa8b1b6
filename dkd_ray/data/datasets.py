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
from collections import OrderedDict
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


def load_image_uint8(path: str | Path) -> torch.Tensor:
    """Decode an image file to a uint8 ``[3, H, W]`` tensor (a quarter of the float's bytes)."""
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


class ImageCache:
    """Decoded images by path, least recently used out first, bounded in bytes (not in count: a
    PRW frame is 6 MB as uint8, a synthetic scene 0.2 MB). Person crops of one scene are often
    drawn close together (the bank walks the boxes image by image), so a small cache saves most
    decodes. One per loader process."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._images: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._images)

    def get(self, path: str) -> torch.Tensor:
        """The image as float ``[3, H, W]`` in [0, 1]."""
        image = self._images.get(path)
        if image is None:
            image = load_image_uint8(path)
            self._images[path] = image
            self.bytes += image.numel()
            while self.bytes > self.max_bytes and len(self._images) > 1:
                _, evicted = self._images.popitem(last=False)
                self.bytes -= evicted.numel()
        else:
            self._images.move_to_end(path)
        return image.float().div_(255.0)


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
    0 gives the exact box (the knowledge bank). Then BoT's training augmentation: flip
    (``flip_prob``), zero padding by ``pad`` pixels and a random crop back to ``crop_size``, and
    random erasing (probability ``random_erasing``, see ``random_erase``). Every random choice
    comes from ``sample_rng(seed, epoch, index)``.
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
        pad: int = 0,
        seed: int = 0,
        cache_bytes: int = 256 * 2**20,
    ) -> None:
        self.ann = annotations
        if box_rows is None:
            box_rows = labelled_box_rows(annotations, split)
        self.box_rows = np.asarray(box_rows, dtype=np.int64)
        self.box_image = annotations.images.box_image_index()[self.box_rows]
        self.pids = annotations.images.pids[self.box_rows].astype(np.int64)
        self.crop_size = tuple(crop_size)
        self.isa_strength, self.flip_prob, self.seed, self.epoch = isa_strength, flip_prob, seed, 0
        self.random_erasing, self.pad = random_erasing, pad
        self.images = ImageCache(cache_bytes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.box_rows)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, int, int]:
        image_index = int(self.box_image[item])
        image = self.images.get(str(self.ann.image_path(image_index)))
        box = torch.from_numpy(self.ann.images.boxes[self.box_rows[item]].copy())[None]
        rng = sample_rng(self.seed, self.epoch, item)
        if self.isa_strength > 0:
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            box = jitter_boxes(box, tuple(image.shape[-2:]), self.isa_strength, generator=generator)[:, 0]
        crop = crop_and_resize(image, box[0], self.crop_size)
        if self.flip_prob > 0 and rng.random() < self.flip_prob:
            crop = crop.flip(-1)
        if self.pad > 0:
            crop = pad_and_random_crop(crop, self.pad, rng)
        if self.random_erasing > 0 and rng.random() < self.random_erasing:
            crop = random_erase(crop, rng)
        return crop, int(self.pids[item]), int(self.box_rows[item]), image_index


def pad_and_random_crop(crop: torch.Tensor, pad: int, rng: np.random.Generator) -> torch.Tensor:
    """BoT: zero-pad ``pad`` pixels on every side, then cut a crop of the original size at random."""
    height, width = crop.shape[-2:]
    padded = torch.nn.functional.pad(crop, (pad, pad, pad, pad))
    top, left = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
    return padded[:, top:top + height, left:left + width]


# BoT's random erasing: area 2-40 % of the crop, aspect ratio 0.3-3.3 drawn linearly, up to 100
# tries. BoT fills the normalised tensor with fixed values; the intent is the mean colour, and
# the teacher normalises its inputs itself, so the fill is the ImageNet mean (0 once normalised).
ERASE_AREA, ERASE_MIN_ASPECT, ERASE_TRIES = (0.02, 0.4), 0.3, 100
ERASE_FILL = (0.485, 0.456, 0.406)


def random_erase(crop: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Erase one random rectangle of ``crop`` [3,h,w] with the mean colour (BoT's rule)."""
    height, width = crop.shape[-2:]
    for _ in range(ERASE_TRIES):
        area = rng.uniform(*ERASE_AREA) * height * width
        aspect = rng.uniform(ERASE_MIN_ASPECT, 1 / ERASE_MIN_ASPECT)
        h, w = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if 0 < h < height and 0 < w < width:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            crop = crop.clone()
            crop[:, top:top + h, left:left + w] = torch.tensor(ERASE_FILL, dtype=crop.dtype)[:, None, None]
            return crop
    return crop


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
