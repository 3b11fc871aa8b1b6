"""The layout-independent plan of a synthetic benchmark: who stands where in which image.

Both layouts build a list of :class:`ImagePlan` (boxes and identities per image), then write it
in their own file format and, unless annotation-only, render it (``render.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

UNLABELLED = -1  # identity index of a bystander


@dataclass
class ImagePlan:
    name: str  # file name, e.g. 's12.jpg', 'c1s1_000151.jpg'
    split: str  # 'train' | 'test'
    width: int
    height: int
    camera: int = -1  # PRW camera 1..6
    horizon: float = 0.0  # y of the horizon, shared by placement and the background
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # [n, 4] x y w h
    identity: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # -1 bystander
    ishard: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    drawn: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # False: planted box

    @property
    def valid(self) -> np.ndarray:
        """Boxes the readers keep (zero width or height is dropped)."""
        return (self.boxes[:, 2] > 0) & (self.boxes[:, 3] > 0)


def image_rng(seed: int, layout_code: int, stream: int, index: int) -> np.random.Generator:
    """An independent generator per (seed, layout, purpose, image): order-free and reproducible."""
    return np.random.default_rng([seed, layout_code, stream, index])


def split_total(total: int, n: int, low: int, high: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` integers in ``[low, high]`` summing to ``total`` (spread at random)."""
    if n == 0:
        if total:
            raise ValueError(f"cannot split {total} over 0 parts")
        return np.zeros(0, np.int64)
    if not n * low <= total <= n * high:
        raise ValueError(
            f"cannot split {total} into {n} parts of {low}..{high} "
            f"(possible totals {n * low}..{n * high})"
        )
    counts = np.full(n, low, np.int64)
    remaining = total - n * low
    while remaining:
        room = np.flatnonzero(counts < high)
        picks = rng.choice(room, size=min(remaining, len(room)), replace=False)
        counts[picks] += 1
        remaining -= len(picks)
    return counts


def spread(
    total: int, n: int, rng: np.random.Generator, minimum: np.ndarray | None = None
) -> np.ndarray:
    """Random non-negative counts over ``n`` bins, at least ``minimum`` each, summing to
    ``max(total, minimum.sum())``."""
    minimum = np.zeros(n, np.int64) if minimum is None else minimum.astype(np.int64)
    extra = max(total - int(minimum.sum()), 0)
    return minimum + rng.multinomial(extra, np.full(n, 1.0 / n)) if n else minimum


def deal(counts: np.ndarray, n_images: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Give identity ``i`` ``counts[i]`` distinct images out of ``n_images``, load-balanced.

    Appearances are laid out identity after identity and dealt round-robin over a random
    image order, so one identity's appearances land on consecutive, hence distinct, images.
    """
    if counts.size and counts.max() > n_images:
        raise ValueError(f"an identity needs {counts.max()} images but only {n_images} exist")
    order = rng.permutation(n_images)
    offset = int(rng.integers(n_images)) if n_images else 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) + offset
    return [order[(s + np.arange(c)) % n_images] for s, c in zip(starts, counts)]


def place_people(
    rng: np.random.Generator,
    width: int,
    height: int,
    count: int,
    horizon: float,
    *,
    integer: bool,
    near_height: tuple[float, float] = (0.6, 0.85),
    min_height: float = 0.12,
    max_iou: float = 0.35,
    tries: int = 12,
) -> np.ndarray:
    """``count`` person boxes ``[x y w h]`` standing on a ground plane seen in perspective.

    A person's height grows linearly with how far below the horizon their feet are, so boxes
    run from small (far, near the horizon) to large (near, bottom of the image): ``near_height``
    is the range of the nearest person's height, ``min_height`` the smallest, both as fractions
    of the image height. Boxes overlap
    a little at most (IoU <= ``max_iou`` when a place can be found in ``tries``).
    """
    near = rng.uniform(*near_height) * height  # height of a person whose feet touch the bottom
    span = height - horizon
    foot = horizon + span * rng.uniform(0.3, 1.0, size=(count, tries)) ** 0.7
    h = np.maximum(near * (foot - horizon) / span, min_height * height)
    w = h * rng.uniform(0.36, 0.46, size=(count, tries))
    x = rng.uniform(0, 1, size=(count, tries)) * np.maximum(width - w, 1.0)
    candidates = np.stack([x, np.minimum(foot, height) - h, w, h], axis=-1).reshape(-1, 4)
    iou = _pairwise_iou(candidates, candidates)
    chosen: list[int] = []
    for k in range(count):  # greedy: the first of a person's candidates that fits
        block = slice(k * tries, (k + 1) * tries)
        worst = iou[block][:, chosen].max(axis=1) if chosen else np.zeros(tries)
        fits = np.flatnonzero(worst <= max_iou)
        chosen.append(k * tries + int(fits[0] if len(fits) else np.argmin(worst)))
    boxes = candidates[chosen]
    if integer:
        boxes = np.round(boxes)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], 2)
        boxes[:, 0] = np.clip(boxes[:, 0], 0, width - boxes[:, 2])
        boxes[:, 1] = np.clip(boxes[:, 1], 0, height - boxes[:, 3])
        # readers label a box by exact match, so no two boxes of an image may be equal
        for k in range(1, count):
            while (boxes[:k] == boxes[k]).all(axis=1).any():
                boxes[k, 3] -= 1
    else:
        boxes = np.round(boxes, 4)  # PRW-style decimals, exactly representable in the text file
    return boxes


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] IoU of boxes given as ``[x y w h]``."""
    a, b = a[:, None, :], b[None, :, :]
    iw = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    ih = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    return inter / (a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter)


def choose_labelled_slots(rng: np.random.Generator, boxes: np.ndarray, n_labelled: int) -> np.ndarray:
    """Indices of the boxes that get the image's identities: larger (nearer) boxes are
    likelier, like the annotated people of the real benchmarks."""
    # Gumbel top-k: weighted sampling without replacement, weight = height squared
    keys = 2 * np.log(boxes[:, 3]) - np.log(-np.log(rng.random(len(boxes))))
    return np.argsort(-keys, kind="stable")[:n_labelled]
