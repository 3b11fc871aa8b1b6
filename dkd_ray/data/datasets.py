"""Torch datasets over the internal annotation form.

- ``SceneDataset``: whole scene images with their boxes and person ids (the student, evaluation).
- ``PersonCropDataset``: labelled-person crops (the teacher, the knowledge bank), with ISA
  (crops from jittered ground-truth boxes) through the shared ``jitter_boxes``.

Random choices (flip, jitter) are drawn from ``(seed, epoch, index)``, not from a worker's global
RNG, so a sample is the same whichever loader process or cluster worker produces it, and a run
resumed mid-epoch sees exactly the samples it would have seen. Call ``set_epoch`` each epoch.

Unreadable images (missing, empty, truncated, corrupt, a symlink loop) are skipped so a long run
never dies on one bad file: each is logged once per process and counted, and past
``max_unreadable_fraction`` of the dataset's images (at least one allowed) the dataset raises a
``DatasetError`` naming them (bad input: fails at once, never retried). A bad scene is replaced by
the next readable one; a bad teacher crop by another crop of the same identity; the knowledge
bank's exact crops are never replaced (see ``PersonCropDataset``). ``jobs/validate_dataset.py``
lists such files up front.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dkd_ray.data.annotations import Annotations
from dkd_ray.data.matlab import DatasetError
from dkd_ray.data.transforms import hflip_scene, resize_scene
from dkd_ray.distill.jitter import jitter_boxes

log = logging.getLogger(__name__)

# What a bad file raises while it decodes: OSError covers missing (FileNotFoundError), empty or
# unknown (UnidentifiedImageError), truncated ("image file is truncated") and symlink loops (ELOOP);
# PIL raises SyntaxError / ValueError for some corrupt headers and DecompressionBombError (not an
# OSError) for absurd sizes. Only the decode is guarded, so a bug elsewhere is never "a bad image".
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

MAX_UNREADABLE_FRACTION = 0.01  # of a dataset's images; at least one is always allowed


class UnreadableImageError(DatasetError):
    """Too many unreadable images, or one the knowledge bank needs. (``DatasetError`` also takes
    the single argument a DataLoader re-raises a worker process's exception with.)"""


class UnreadableImages:
    """The images one dataset failed to decode in this process, each logged once.

    Counting is per process (each DataLoader worker has its own copy of the dataset and counts
    the images it was asked for) against the whole dataset's allowance: simple and needs no
    shared state; the cost is that bad images spread over many workers may exceed the allowance
    in total before any one process notices. Loader workers are new processes each epoch (copies
    of the main process's dataset), so their warnings repeat once per epoch. Past ``allowed``
    this raises ``UnreadableImageError`` (a ``DatasetError``).
    """

    def __init__(self, total: int, max_fraction: float, root: str | Path) -> None:
        if not 0 <= max_fraction <= 1:
            raise ValueError(f"max_unreadable_fraction must be in [0, 1], got {max_fraction}")
        self.total, self.max_fraction, self.root = total, max_fraction, root
        self.allowed = max(1, int(max_fraction * total))
        self.errors: dict[str, str] = {}  # path -> the error, in the order they were met

    def __len__(self) -> int:
        return len(self.errors)

    def __contains__(self, path: object) -> bool:
        return str(path) in self.errors

    def add(self, path: str | Path, error: BaseException) -> None:
        path = str(path)
        if path in self.errors:
            return
        self.errors[path] = f"{type(error).__name__}: {error}"
        log.warning("skipping unreadable image %s (%s); %d of at most %d in this process",
                    path, self.errors[path], len(self.errors), self.allowed)
        if len(self.errors) > self.allowed:
            raise self.error(f"{len(self.errors)} of the {self.total} images are unreadable, more than "
                             f"{self.max_fraction:.1%} (at most {self.allowed} allowed)")

    def error(self, message: str) -> UnreadableImageError:
        listed = "; ".join(f"{p} ({e})" for p, e in list(self.errors.items())[:10])
        more = f" and {len(self.errors) - 10} more" if len(self.errors) > 10 else ""
        first = next(iter(self.errors), self.root)
        return UnreadableImageError(first, f"{message}: {listed}{more}; run jobs/validate_dataset.py on {self.root}")


def load_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to a float ``[3, H, W]`` tensor in [0, 1] (grayscale/CMYK -> RGB)."""
    return load_image_uint8(path).float().div_(255.0)


def load_image_uint8(path: str | Path) -> torch.Tensor:
    """Decode an image file to a uint8 ``[3, H, W]`` tensor (a quarter of the float's bytes)."""
    with Image.open(path) as img:
        img.load()  # decode every byte now: a truncated file fails here, not as a grey band later
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
        max_unreadable_fraction: float = MAX_UNREADABLE_FRACTION,
    ) -> None:
        self.ann = annotations
        self.indices = np.asarray(annotations.images.indices(split) if indices is None else indices, dtype=np.int64)
        self.short_side, self.max_side = short_side, max_side
        self.flip_prob, self.seed, self.epoch = flip_prob, seed, 0
        self.unreadable = UnreadableImages(len(np.unique(self.indices)), max_unreadable_fraction, annotations.root)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, dict]:
        # A bad scene is replaced by the next readable one (deterministic: the same bad files give
        # the same replacement in every process). Each new failure is counted, and the count
        # raises past the allowance, so this loop decodes at most allowed + 1 bad files.
        for offset in range(len(self.indices)):
            position = (item + offset) % len(self.indices)
            image_index = int(self.indices[position])
            path = self.ann.image_path(image_index)
            if path in self.unreadable:
                continue
            try:
                image = load_image(path)
            except _UNREADABLE as err:
                self.unreadable.add(path, err)
                continue
            return self._load(position, image_index, image)
        raise self.unreadable.error(f"no readable image among the {len(self.indices)} of this dataset")

    def _load(self, position: int, image_index: int, image: torch.Tensor) -> tuple[torch.Tensor, dict]:
        images = self.ann.images
        start, stop = images.box_offsets[image_index], images.box_offsets[image_index + 1]
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

    ``on_unreadable``: what a crop whose image cannot be decoded becomes.

    - ``"replace"`` (the teacher): another crop of the same identity, in an order drawn from
      ``(seed, epoch, index)``, then if that identity has no readable crop left any other crop.
      The returned pid and box are the replacement's own, so labels stay true, and a P x K batch
      keeps its shape: the same identity keeps K crops (one repeated at worst), which the
      batch-hard triplet needs for its positives; in the fallback case that identity has K - 1
      and another one more, and the triplet loss leaves out anchors without a positive.
      Dropping the sample instead would change the batch size and could leave an identity alone.
    - ``"raise"`` (the knowledge bank): a ``DatasetError`` naming the file at once. The bank
      stores one row per labelled box under its ``box_index``; a replacement would store another
      box's output (a wrong or duplicate row), and a missing row would surface only as a lookup
      failure in the student, so the file must be fixed first.
    - ``"auto"`` (default): ``"replace"`` when the dataset augments (a training set), ``"raise"``
      for exact crops (``isa_strength``, ``flip_prob``, ``random_erasing`` and ``pad`` all 0:
      what the bank builds from).
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
        on_unreadable: str = "auto",
        max_unreadable_fraction: float = MAX_UNREADABLE_FRACTION,
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
        if on_unreadable == "auto":
            augments = isa_strength > 0 or flip_prob > 0 or random_erasing > 0 or pad > 0
            on_unreadable = "replace" if augments else "raise"
        if on_unreadable not in ("replace", "raise"):
            raise ValueError(f"on_unreadable must be replace, raise or auto, got {on_unreadable!r}")
        self.on_unreadable = on_unreadable
        self.unreadable = UnreadableImages(len(np.unique(self.box_image)), max_unreadable_fraction, annotations.root)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.box_rows)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, int, int]:
        for source in self._sources(item):
            path = str(self.ann.image_path(int(self.box_image[source])))
            if path in self.unreadable:
                continue
            try:
                image = self.images.get(path)
            except _UNREADABLE as err:
                if self.on_unreadable == "raise":
                    raise UnreadableImageError(path, f"cannot read the image of labelled box "
                                                     f"{int(self.box_rows[item])} ({type(err).__name__}: {err}); "
                                                     "exact crops (the knowledge bank) need every labelled box: "
                                                     "fix or restore the file") from err
                self.unreadable.add(path, err)  # raises past the allowance
                continue
            return self._crop(source, item, image)
        raise self.unreadable.error(f"no readable crop left for box {int(self.box_rows[item])}")

    def _sources(self, item: int):
        """``item``, then (only if its image is unreadable) its replacements in a seeded order:
        the identity's other crops first, then every other crop."""
        yield item
        rng = np.random.default_rng([self.seed, self.epoch, item, 1])  # apart from the crop's own stream
        same = self.pids == self.pids[item]
        same[item] = False
        yield from (int(i) for i in rng.permutation(np.flatnonzero(same)))
        yield from (int(i) for i in rng.permutation(np.flatnonzero(self.pids != self.pids[item])))

    def _crop(self, source: int, item: int, image: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
        """Box ``source``'s crop, augmented with sample ``item``'s draws (a sample stays a function
        of ``(seed, epoch, item)`` even when replaced)."""
        image_index = int(self.box_image[source])
        box = torch.from_numpy(self.ann.images.boxes[self.box_rows[source]].copy())[None]
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
        return crop, int(self.pids[source]), int(self.box_rows[source]), image_index


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
