"""A synthetic CUHK-SYSU folder, file for file in the real layout.

```
CUHK-SYSU/Image/SSM/s<N>.jpg
CUHK-SYSU/annotation/Images.mat                     Img   1×N struct: imname, nAppear, box
                                                          (box: 1×nAppear struct: idlocate, ishard)
CUHK-SYSU/annotation/pool.mat                       pool  N×1 cell of gallery image names
CUHK-SYSU/annotation/test/train_test/Train.mat      Train N×1 cell of 1×1 struct: idname,
                                                          nAppear, scene (imname, idlocate, ishard)
CUHK-SYSU/annotation/test/train_test/TestG<S>.mat   TestG<S> 1×Q struct: Query (imname, idlocate,
                                                          ishard, idname), Gallery (1×S: imname,
                                                          idlocate, ishard)
```
Field order is the real files' order (some readers unpack by position). Gallery positives
come first, then negatives whose ``idlocate`` is empty (0×0, or 1×0 for a planted share).
Smaller galleries are prefixes of larger ones' negatives; the query image is in none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import matfile
from .output import Progress, save_jpeg, write_image_sizes
from .presets import CuhkSysuConfig
from .render import Appearances, render_image, sample_appearances
from .scene import (
    UNLABELLED,
    ImagePlan,
    choose_labelled_slots,
    deal,
    image_rng,
    place_people,
    split_total,
    spread,
)
from .summary import EdgeCases, SplitSummary

LAYOUT_CODE = 1
_PLACE, _RENDER = 1, 2  # image_rng streams
EMPTY_1x0_SHARE = 0.3  # of negative gallery entries, when edge cases are planted


@dataclass
class CuhkSysuPlan:
    config: CuhkSysuConfig
    images: list[ImagePlan]  # in Img order
    appearances: Appearances  # identity rows: training identities first, then test ones
    id_numbers: np.ndarray  # [identities] the number in 'p<number>'
    train_identities: np.ndarray  # identity indices, Train.mat order
    queries: np.ndarray  # test identity indices, TestG order
    occurrences: dict[int, list[tuple[int, int]]]  # identity -> [(image, box)] in image order
    query_occurrence: dict[int, tuple[int, int]]  # test identity -> its query (image, box)
    negatives: dict[int, np.ndarray]  # test identity -> pool image indices, gallery order
    empty_style: dict[int, np.ndarray]  # test identity -> bool per negative: True = 1×0


def plan(config: CuhkSysuConfig, seed: int, edge_cases: bool) -> CuhkSysuPlan:
    _check(config)
    rng = image_rng(seed, LAYOUT_CODE, 0, 0)
    n_images = config.train_images + config.test_images
    n_ids = config.train_identities + config.test_identities

    is_test = np.zeros(n_images, bool)
    is_test[rng.choice(n_images, config.test_images, replace=False)] = True
    train_rows, test_rows = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    widths = rng.integers(config.image_width[0], config.image_width[1] + 1, size=n_images)
    aspects = np.asarray(config.aspect_ratios)[rng.integers(len(config.aspect_ratios), size=n_images)]
    heights = np.round(widths / aspects).astype(int)

    id_numbers = rng.permutation(np.arange(1, n_ids + 1))
    train_ids = np.arange(config.train_identities)
    test_ids = np.arange(config.train_identities, n_ids)
    lo, hi = config.images_per_train_identity
    train_counts = split_total(config.train_labelled, len(train_ids), lo, hi, rng)
    lo, hi = config.images_per_test_identity
    test_counts = split_total(config.test_labelled, len(test_ids), lo, hi, rng)

    people: list[list[int]] = [[] for _ in range(n_images)]  # identities per image
    for ids, counts, rows in ((train_ids, train_counts, train_rows), (test_ids, test_counts, test_rows)):
        for ident, slots in zip(ids, deal(counts, len(rows), rng)):
            for row in rows[slots]:
                people[row].append(int(ident))
    n_labelled = np.array([len(p) for p in people])
    n_unlabelled = np.zeros(n_images, np.int64)
    for rows, total in ((train_rows, config.train_boxes), (test_rows, config.test_boxes)):
        needed = (n_labelled[rows] == 0).astype(np.int64)  # every image shows somebody
        n_unlabelled[rows] = spread(total - int(n_labelled[rows].sum()), len(rows), rng, needed)

    zero_area = np.zeros(n_images, np.int64)
    if edge_cases and config.zero_area_boxes:
        zero_area[rng.choice(n_images, config.zero_area_boxes, replace=True)] += 1

    images = []
    for row in range(n_images):
        images.append(
            _plan_image(
                config,
                seed,
                row,
                int(widths[row]),
                int(heights[row]),
                "test" if is_test[row] else "train",
                people[row],
                int(n_unlabelled[row]),
                int(zero_area[row]),
            )
        )

    occurrences: dict[int, list[tuple[int, int]]] = {int(i): [] for i in range(n_ids)}
    for row, image in enumerate(images):
        for k in np.flatnonzero(image.identity >= 0):
            occurrences[int(image.identity[k])].append((row, int(k)))

    queries = rng.permutation(test_ids)
    query_occurrence, negatives, empty_style = {}, {}, {}
    holds_identity = np.zeros(n_images, bool)
    for ident in queries.tolist():
        occ = occurrences[ident]
        query_occurrence[ident] = occ[rng.integers(len(occ))]
        own = [row for row, _ in occ]
        holds_identity[own] = True
        others = test_rows[~holds_identity[test_rows]]
        holds_identity[own] = False
        negatives[ident] = rng.permutation(others)
        style = rng.random(len(others)) < EMPTY_1x0_SHARE if edge_cases else np.zeros(len(others), bool)
        empty_style[ident] = style

    return CuhkSysuPlan(
        config=config,
        images=images,
        appearances=sample_appearances(rng, n_ids),
        id_numbers=id_numbers,
        train_identities=train_ids,
        queries=queries,
        occurrences=occurrences,
        query_occurrence=query_occurrence,
        negatives=negatives,
        empty_style=empty_style,
    )


def _check(config: CuhkSysuConfig) -> None:
    pool = config.test_images
    max_pos = config.images_per_test_identity[1] - 1
    for size in config.gallery_sizes:
        if not max_pos <= size <= pool - 1:
            raise ValueError(
                f"gallery size {size} must lie in {max_pos}..{pool - 1} "
                f"(the most positives per query .. pool size - 1 = {pool} - 1)"
            )
    if config.images_per_test_identity[0] < 2 or config.images_per_train_identity[0] < 2:
        raise ValueError("every identity needs at least 2 images (a query and a gallery match)")


def _plan_image(
    config: CuhkSysuConfig,
    seed: int,
    row: int,
    width: int,
    height: int,
    split: str,
    identities: list[int],
    n_unlabelled: int,
    n_zero_area: int,
) -> ImagePlan:
    rng = image_rng(seed, LAYOUT_CODE, _PLACE, row)
    horizon = rng.uniform(0.3, 0.5) * height
    n_people = len(identities) + n_unlabelled
    boxes = place_people(rng, width, height, n_people, horizon, integer=True)
    identity = np.full(n_people, UNLABELLED, np.int64)
    identity[choose_labelled_slots(rng, boxes, len(identities))] = rng.permutation(identities)
    drawn = np.ones(n_people, bool)
    if n_zero_area:  # annotation slips of the real data: a box of zero width or height
        planted = np.zeros((n_zero_area, 4))
        planted[:, 0] = rng.integers(0, width // 2, n_zero_area)
        planted[:, 1] = rng.integers(0, height // 2, n_zero_area)
        planted[:, 2] = np.where(rng.random(n_zero_area) < 0.5, 0, rng.integers(5, 30, n_zero_area))
        planted[:, 3] = np.where(planted[:, 2] == 0, rng.integers(10, 60, n_zero_area), 0)
        boxes = np.concatenate([boxes, planted])
        identity = np.concatenate([identity, np.full(n_zero_area, UNLABELLED)])
        drawn = np.concatenate([drawn, np.zeros(n_zero_area, bool)])
    order = rng.permutation(len(boxes))
    ishard = rng.random(len(boxes)) < config.hard_fraction
    return ImagePlan(
        name=f"s{row + 1}.jpg",
        split=split,
        width=width,
        height=height,
        horizon=horizon,
        boxes=boxes[order],
        identity=identity[order],
        ishard=ishard[order],
        drawn=drawn[order],
    )


# Shared leaf objects: each is encoded once however many struct elements hold it (matfile).
_HARD = {False: 0.0, True: 1.0}
_HARD_OBJECTS = matfile.object_array([_HARD[False], _HARD[True]])
_EMPTIES = matfile.object_array([matfile.EMPTY_0x0, matfile.EMPTY_1x0])


@dataclass
class _Leaves:
    """The MATLAB values of a plan, one object per image name and per box."""

    names: np.ndarray  # object [N] image names
    locs: list[list[np.ndarray]]  # per image, per box: the 1×4 idlocate

    @classmethod
    def of(cls, p: CuhkSysuPlan) -> "_Leaves":
        names = matfile.object_array([im.name for im in p.images])
        locs = [[np.array([box], dtype=np.float64) for box in im.boxes] for im in p.images]
        return cls(names, locs)

    def hard(self, p: CuhkSysuPlan, occurrence: tuple[int, int]) -> float:
        r, k = occurrence
        return _HARD[bool(p.images[r].ishard[k])]


def write(root: Path, p: CuhkSysuPlan, seed: int, annotations_only: bool, progress: Progress) -> int:
    """Write the folder; returns the number of files written."""
    protocol = root / "annotation" / "test" / "train_test"
    protocol.mkdir(parents=True, exist_ok=True)
    leaves = _Leaves.of(p)
    progress.say("CUHK-SYSU: writing annotation/Images.mat, pool.mat, Train.mat")
    _write_images_and_pool(root / "annotation", p, leaves)
    matfile.save_mat(protocol / "Train.mat", {"Train": _train_cells(p, leaves)})
    for size in p.config.gallery_sizes:
        progress.say(f"CUHK-SYSU: writing TestG{size}.mat ({len(p.queries)} queries x {size})")
        # level 1: the full-size TestG files are GBs before compression; twice as fast as default
        matfile.save_mat(
            protocol / f"TestG{size}.mat", {f"TestG{size}": _test_protocol(p, leaves, size)}, level=1
        )
    files = 3 + len(p.config.gallery_sizes)

    image_dir = root / "Image" / "SSM"
    image_dir.mkdir(parents=True, exist_ok=True)
    if annotations_only:
        write_image_sizes(root, {f"Image/SSM/{im.name}": (im.width, im.height) for im in p.images})
        return files + 1
    progress.say(f"CUHK-SYSU: rendering {len(p.images)} images")
    for r, im in enumerate(p.images):
        image = render_image(im, p.appearances, image_rng(seed, LAYOUT_CODE, _RENDER, r))
        save_jpeg(image, image_dir / im.name)
        progress.tick("CUHK-SYSU images", r + 1, len(p.images))
    return files + len(p.images)


def _write_images_and_pool(annotation: Path, p: CuhkSysuPlan, leaves: _Leaves) -> None:
    counts: dict[int, float] = {}  # one nAppear object per value
    boxes = [
        matfile.struct_array(
            (1, len(im.boxes)),
            {
                "idlocate": leaves.locs[r],
                "ishard": [_HARD[bool(h)] for h in im.ishard],
            },
        )
        for r, im in enumerate(p.images)
    ]
    img = matfile.struct_array(
        (1, len(p.images)),
        {
            "imname": leaves.names,
            "nAppear": [counts.setdefault(len(im.boxes), float(len(im.boxes))) for im in p.images],
            "box": boxes,
        },
    )
    matfile.save_mat(annotation / "Images.mat", {"Img": img})
    pool_rows = [r for r, im in enumerate(p.images) if im.split == "test"]
    matfile.save_mat(annotation / "pool.mat", {"pool": matfile.cell_column(leaves.names[pool_rows])})


def _train_cells(p: CuhkSysuPlan, leaves: _Leaves) -> np.ndarray:
    """``Train``: one cell per training identity holding a 1×1 struct (idname, nAppear, scene)."""
    cells = []
    for ident in p.train_identities.tolist():
        occ = p.occurrences[ident]
        scene = matfile.struct_array(
            (1, len(occ)),
            {
                "imname": [leaves.names[r] for r, _ in occ],
                "idlocate": [leaves.locs[r][k] for r, k in occ],
                "ishard": [leaves.hard(p, o) for o in occ],
            },
        )
        cells.append(
            matfile.struct_array(
                (1, 1),
                {
                    "idname": f"p{p.id_numbers[ident]}",
                    "nAppear": float(len(occ)),
                    "scene": scene,
                },
            )
        )
    return matfile.cell_column(cells)


def _test_protocol(p: CuhkSysuPlan, leaves: _Leaves, size: int) -> np.ndarray:
    """``TestG<size>``: per query its Query struct and a Gallery of ``size`` pool images,
    positives first (idlocate = the person's box), then negatives (empty idlocate)."""
    queries, galleries = [], []
    for ident in p.queries.tolist():
        r, k = p.query_occurrence[ident]
        queries.append(
            matfile.struct_array(
                (1, 1),
                {
                    "imname": leaves.names[r],
                    "idlocate": leaves.locs[r][k],
                    "ishard": leaves.hard(p, (r, k)),
                    "idname": f"p{p.id_numbers[ident]}",
                },
            )
        )
        positives = [o for o in p.occurrences[ident] if o != p.query_occurrence[ident]]
        negatives = p.negatives[ident][: size - len(positives)]
        rows = np.concatenate([[r for r, _ in positives], negatives]).astype(np.int64)
        idlocate = np.concatenate(
            [
                matfile.object_array([leaves.locs[r][k] for r, k in positives]),
                _EMPTIES[p.empty_style[ident][: len(negatives)].astype(np.int64)],
            ]
        )
        ishard = np.zeros(size, np.int64)
        ishard[: len(positives)] = [bool(p.images[r].ishard[k]) for r, k in positives]
        galleries.append(
            matfile.struct_array(
                (1, size),
                {
                    "imname": leaves.names[rows],
                    "idlocate": idlocate,
                    "ishard": _HARD_OBJECTS[ishard],
                },
            )
        )
    return matfile.struct_array((1, len(p.queries)), {"Query": queries, "Gallery": galleries})


def summarise(p: CuhkSysuPlan) -> dict:
    """The layout-specific parts of the SyntheticSummary."""
    train = [im for im in p.images if im.split == "train"]
    test = [im for im in p.images if im.split == "test"]
    empty = {"0x0": 0, "1x0": 0}
    for size in p.config.gallery_sizes:
        for ident in p.queries.tolist():
            n_pos = len(p.occurrences[ident]) - 1
            style = p.empty_style[ident][: size - n_pos]
            empty["1x0"] += int(style.sum())
            empty["0x0"] += int(len(style) - style.sum())
    zero_area = sum(int((~im.valid).sum()) for im in p.images)
    return dict(
        train=SplitSummary.of(train, p.id_numbers),
        test=SplitSummary.of(test, p.id_numbers),
        queries=len(p.queries),
        query_identities=len(p.queries),
        gallery_sizes=tuple(p.config.gallery_sizes),
        train_ids=tuple(int(p.id_numbers[i]) for i in p.train_identities),
        test_ids=tuple(int(p.id_numbers[i]) for i in p.queries),
        edge_cases=EdgeCases(
            zero_area_boxes=zero_area,
            empty_idlocate=empty,
            unlabelled_only_images=tuple(im.name for im in p.images if not (im.identity >= 0).any()),
        ),
    )
