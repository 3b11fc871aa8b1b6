"""The one internal form of a person-search benchmark, shared by readers, training and evaluation.

Both readers (CUHK-SYSU, PRW) and the synthetic generator's output end up here. Everything is
columnar numpy so evaluation and samplers can vectorise, with the boxes of all images stored
flat and indexed by ``box_offsets`` (CSR layout): the boxes of image ``i`` are
``boxes[box_offsets[i]:box_offsets[i + 1]]``.

Conventions (docs/DATASETS.md):
- boxes are ``[x1, y1, x2, y2]`` float32 pixels, clipped to the image, zero-area boxes dropped
  (except PRW read with ``box_rule="seqnet"``: SeqNet's integer boxes, see dkd_ray.data.prw);
- ``pids``: -1 unlabelled; training identities contiguous 0..K-1 (``split == "train"``);
  test identities keep their dataset's own integer id (CUHK-SYSU 'p1234' -> 1234, PRW pid);
- ``camera``: PRW camera 1..6, -1 where the dataset has none (CUHK-SYSU).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("train", "test")  # the benchmarks' own splits (what the readers and the cache hold)
VALIDATION = "val"  # training images held out for model selection (dkd_ray.data.splits)
DATASETS = ("cuhk_sysu", "prw")
BOX_RULES = ("exact", "seqnet")  # how PRW boxes are read (data.box_rule; dkd_ray.data.prw)


@dataclass
class ImageTable:
    """One row per image of one dataset (both splits)."""

    name: np.ndarray  # object[str] [N], e.g. 's15535.jpg', 'c1s1_000151.jpg'
    path: np.ndarray  # object[str] [N], relative to the dataset root, e.g. 'Image/SSM/s15535.jpg'
    split: np.ndarray  # object[str] [N], 'train' | 'test'
    width: np.ndarray  # int32 [N]
    height: np.ndarray  # int32 [N]
    camera: np.ndarray  # int16 [N], -1 when unknown
    box_offsets: np.ndarray  # int64 [N + 1]
    boxes: np.ndarray  # float32 [B, 4], x1 y1 x2 y2
    pids: np.ndarray  # int32 [B]

    def __len__(self) -> int:
        return len(self.name)

    def boxes_of(self, i: int) -> np.ndarray:
        return self.boxes[self.box_offsets[i] : self.box_offsets[i + 1]]

    def pids_of(self, i: int) -> np.ndarray:
        return self.pids[self.box_offsets[i] : self.box_offsets[i + 1]]

    def box_image_index(self) -> np.ndarray:
        """int64 [B]: the image index of every box."""
        return np.repeat(np.arange(len(self.name)), np.diff(self.box_offsets))

    def indices(self, split: str) -> np.ndarray:
        if split not in (*SPLITS, VALIDATION):
            raise ValueError(f"unknown split {split!r}; expected one of {(*SPLITS, VALIDATION)}")
        return np.flatnonzero(self.split == split)

    def fingerprint(self) -> str:
        """SHA-256 (hex) of what a global box row means: the image names in row order, each
        image's box count (``box_offsets``), the boxes (float32 bytes) and the pids. A re-parsed
        dataset whose box order or boxes differ gets another fingerprint; the split column is
        left out, so a validation view (``dkd_ray.data.splits``) keeps its full table's."""
        digest = hashlib.sha256(b"dkd_ray.ImageTable.v1\0")
        digest.update("\0".join(str(n) for n in self.name).encode("utf-8") + b"\0")
        digest.update(np.ascontiguousarray(self.box_offsets, dtype="<i8").tobytes())
        digest.update(np.ascontiguousarray(self.boxes, dtype="<f4").tobytes())
        digest.update(np.ascontiguousarray(self.pids, dtype="<i4").tobytes())
        return digest.hexdigest()


@dataclass
class QueryTable:
    """One row per query person (the test protocol's probes)."""

    image_index: np.ndarray  # int64 [Q], row in ImageTable of the query's own image
    box: np.ndarray  # float32 [Q, 4], the query's ground-truth box, x1 y1 x2 y2
    pid: np.ndarray  # int32 [Q], the test identity's own id

    def __len__(self) -> int:
        return len(self.pid)


@dataclass
class GalleryProtocol:
    """A CUHK-SYSU ``TestG<size>`` protocol: a fixed gallery of ``size`` images per query.

    The positives are the ``idlocate`` boxes of the file itself (the official evaluation uses
    them, not a pid lookup); gallery entries with an empty ``idlocate`` are negatives.
    """

    size: int
    image_index: np.ndarray  # int64 [Q, size], ImageTable rows of each query's gallery
    positive_query: np.ndarray  # int64 [P], query row of each positive
    positive_image: np.ndarray  # int64 [P], ImageTable row of each positive's image
    positive_box: np.ndarray  # float32 [P, 4], the query person's box in that image


@dataclass
class Annotations:
    """A whole benchmark in the internal form."""

    dataset: str  # 'cuhk_sysu' | 'prw'
    root: Path  # the dataset folder as the user unpacked it
    images: ImageTable
    queries: QueryTable
    galleries: dict[int, GalleryProtocol] = field(default_factory=dict)  # CUHK-SYSU only
    num_train_ids: int = 0  # K: training identities are 0..K-1

    def image_path(self, i: int) -> Path:
        return self.root / self.images.path[i]


# --- Helpers the readers share (pure numpy, no I/O) -------------------------------------------

MATCH_MIN_IOU = 0.9  # "the same box" when coordinates differ only by rounding


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """``[x y w h]`` -> ``[x1 y1 x2 y2]`` (float64, any leading shape)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    return np.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:4]], axis=-1)


def clip_boxes(xyxy: np.ndarray, width, height) -> np.ndarray:
    """Clip ``[x1 y1 x2 y2]`` boxes [n, 4] to their image's ``width`` and ``height`` (scalars or
    one per box); an unknown size (0) clips only at 0."""
    width = np.broadcast_to(np.asarray(width, dtype=np.float64), xyxy.shape[:1])
    height = np.broadcast_to(np.asarray(height, dtype=np.float64), xyxy.shape[:1])
    known = (width > 0) & (height > 0)
    upper = np.where(known[:, None], np.stack([width, height, width, height], axis=1), np.inf)
    return np.clip(xyxy, 0.0, upper)


@dataclass
class CleanedBoxes:
    """The outcome of :func:`clean_boxes` for annotated ``[x y w h]`` boxes."""

    xyxy: np.ndarray  # float32 [n, 4], converted and clipped
    keep: np.ndarray  # bool [n]: positive area (before and after clipping)
    zero_area: np.ndarray  # bool [n]: zero width or height as annotated
    clipped: np.ndarray  # bool [n]: partly outside the image, clipped
    outside: np.ndarray  # bool [n]: nothing left after clipping


def clean_boxes(xywh: np.ndarray, width, height) -> CleanedBoxes:
    """Convert annotated ``[x y w h]`` boxes, clip them to their image (``width``/``height``:
    scalars or one per box) and flag what to drop. Vectorised over all boxes of a dataset."""
    xywh = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    zero_area = ~((xywh[:, 2] > 0) & (xywh[:, 3] > 0))
    xyxy = xywh_to_xyxy(xywh)
    clipped_xyxy = clip_boxes(xyxy, width, height)
    clipped = np.any(clipped_xyxy != xyxy, axis=1) & ~zero_area
    outside = ~zero_area & ~(
        (clipped_xyxy[:, 2] > clipped_xyxy[:, 0]) & (clipped_xyxy[:, 3] > clipped_xyxy[:, 1])
    )
    return CleanedBoxes(
        xyxy=clipped_xyxy.astype(np.float32),
        keep=~zero_area & ~outside,
        zero_area=zero_area,
        clipped=clipped & ~outside,
        outside=outside,
    )


def box_iou_one(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of each ``[x1 y1 x2 y2]`` box in ``boxes`` [n, 4] with one ``box`` [4]."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    box = np.asarray(box, dtype=np.float64)
    iw = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    ih = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    inter = iw * ih
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_box(candidates_xywh: np.ndarray, box_xywh: np.ndarray,
              min_iou: float = MATCH_MIN_IOU) -> int:
    """Index of the candidate that is ``box`` (exact coordinates, else the best IoU >= min_iou).

    Both are ``[x y w h]`` as annotated; -1 when nothing matches.
    """
    candidates_xywh = np.asarray(candidates_xywh, dtype=np.float64).reshape(-1, 4)
    if len(candidates_xywh) == 0:
        return -1
    box_xywh = np.asarray(box_xywh, dtype=np.float64).reshape(4)
    exact = np.flatnonzero(np.all(candidates_xywh == box_xywh, axis=1))
    if len(exact):
        return int(exact[0])
    iou = box_iou_one(xywh_to_xyxy(candidates_xywh), xywh_to_xyxy(box_xywh))
    best = int(np.argmax(iou))
    return best if iou[best] >= min_iou else -1


def image_table(
    name: list[str],
    path: list[str],
    split: list[str],
    width: np.ndarray,
    height: np.ndarray,
    camera: np.ndarray,
    box_counts: np.ndarray,
    boxes: np.ndarray,
    pids: np.ndarray,
) -> ImageTable:
    """Build the columnar :class:`ImageTable` from per-image columns and the flat boxes (in
    image order, ``box_counts[i]`` of them for image ``i``)."""
    offsets = np.zeros(len(name) + 1, dtype=np.int64)
    np.cumsum(box_counts, out=offsets[1:])
    if offsets[-1] != len(boxes) or len(boxes) != len(pids):
        raise ValueError(f"{offsets[-1]} boxes counted, {len(boxes)} boxes, {len(pids)} pids")
    return ImageTable(
        name=np.array(name, dtype=object).reshape(-1),
        path=np.array(path, dtype=object).reshape(-1),
        split=np.array(split, dtype=object).reshape(-1),
        width=np.asarray(width, dtype=np.int32),
        height=np.asarray(height, dtype=np.int32),
        camera=np.asarray(camera, dtype=np.int16),
        box_offsets=offsets,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        pids=np.asarray(pids, dtype=np.int32).reshape(-1),
    )
