"""The search protocols as arrays: who is searched where, and which detections may count.

A protocol fixes, for every query,
- its candidate detections: either the detections of a listed set of gallery images (CUHK-SYSU
  ``TestG<size>``), or every gallery detection but one contiguous block (the query's own image;
  PRW cross-camera: the query camera's whole block — the gallery is stored camera by camera);
- its positive entries: ``(gallery image, the query person's box there)``, and ``count_gt``;
- for each entry, the detections of that image whose IoU with the box reaches
  ``min(0.5, w*h / ((w+10)*(h+10)))`` ("pairs"). Which of those becomes the single positive
  depends on the similarities, so that choice is made at search time.
Everything here depends on boxes only, never on embeddings, and is computed once per evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dkd_ray.data.annotations import Annotations, GalleryProtocol
from dkd_ray.eval.arrays import ArraysError, Detections
from dkd_ray.eval.boxes import expand_ranges, paired_iou, search_iou_threshold


@dataclass
class GalleryIndex:
    """The gallery detections kept for search, grouped by camera then image.

    Only images of the test split (the CUHK-SYSU pool / PRW test frames) and detections with
    ``score >= score_threshold`` are kept. ``source`` maps back to rows of the input Detections.
    """

    source: np.ndarray  # int64 [M], row in the input Detections
    image: np.ndarray  # int64 [M], ImageTable row
    boxes: np.ndarray  # float32 [M, 4]
    embeddings: np.ndarray  # float32 [M, d]
    image_start: np.ndarray  # int64 [num_images]; detections of image i: image_start[i]:image_end[i]
    image_end: np.ndarray  # int64 [num_images]
    camera_start: dict[int, int]  # camera -> first row of its block
    camera_end: dict[int, int]

    def __len__(self) -> int:
        return len(self.source)

    @classmethod
    def build(cls, annotations: Annotations, gallery: Detections, score_threshold: float) -> "GalleryIndex":
        images = annotations.images
        if gallery.num_images != len(images):
            raise ArraysError(
                f"gallery detections index {gallery.num_images} images but the {annotations.dataset} "
                f"image table has {len(images)}"
            )
        is_test = images.split == "test"
        keep = np.flatnonzero((gallery.scores >= score_threshold) & is_test[gallery.image_index])
        image = gallery.image_index[keep]
        camera = images.camera[image].astype(np.int64)
        order = np.lexsort((keep, image, camera))  # camera, then image, then original order
        keep, image, camera = keep[order], image[order], camera[order]
        start = np.zeros(len(images), np.int64)
        end = np.zeros(len(images), np.int64)
        present, first, count = np.unique(image, return_index=True, return_counts=True)
        start[present] = first
        end[present] = first + count
        cams, cam_first, cam_count = np.unique(camera, return_index=True, return_counts=True)
        return cls(
            source=keep,
            image=image,
            boxes=gallery.boxes[keep],
            embeddings=np.ascontiguousarray(gallery.embeddings[keep]),
            image_start=start,
            image_end=end,
            camera_start={int(c): int(f) for c, f in zip(cams, cam_first)},
            camera_end={int(c): int(f + n) for c, f, n in zip(cams, cam_first, cam_count)},
        )

    def rows_of_images(self, image_ids: np.ndarray) -> np.ndarray:
        """Gallery rows of the detections of ``image_ids``, image after image (-1: no image)."""
        image_ids = image_ids[image_ids >= 0]
        starts = self.image_start[image_ids]
        rows, _ = expand_ranges(starts, self.image_end[image_ids] - starts)
        return rows


@dataclass
class SearchProtocol:
    """One protocol, e.g. ``cuhk_sysu/g100`` or ``prw/cross_cam`` (see module docstring)."""

    name: str
    num_queries: int
    # Candidates: exactly one of the two is set.
    listed_images: np.ndarray | None  # int64 [Q, size]: gather these images' detections
    excluded_rows: np.ndarray | None  # int64 [Q, 2]: all gallery rows except [lo, hi)
    # Positive entries, sorted by query (CSR: entries of q are entry_offsets[q]:entry_offsets[q+1]).
    entry_offsets: np.ndarray  # int64 [Q + 1]
    entry_image: np.ndarray  # int64 [E]
    entry_box: np.ndarray  # float32 [E, 4]
    count_gt: np.ndarray  # int64 [Q]
    # Detections that may be an entry's positive (IoU with its box at or above its threshold),
    # sorted by entry (CSR over entries).
    pair_offsets: np.ndarray  # int64 [E + 1]
    pair_row: np.ndarray  # int64 [R], gallery row


def cuhk_sysu_protocol(
    annotations: Annotations, index: GalleryIndex, gallery: GalleryProtocol, *, full_set: bool = False
) -> SearchProtocol:
    """``TestG<size>``: each query searches its listed images; or, with ``full_set``, the listed
    images plus every other pool image (as negatives) except the query's own image."""
    queries = annotations.queries
    q = len(queries)
    if gallery.image_index.shape[0] != q:
        raise ValueError(f"TestG{gallery.size} lists galleries for {gallery.image_index.shape[0]} "
                         f"queries but the query table has {q}")
    is_test = annotations.images.split == "test"
    if not np.all(is_test[gallery.image_index]):
        bad = gallery.image_index[~is_test[gallery.image_index]][0]
        raise ValueError(f"TestG{gallery.size} lists image {annotations.images.name[bad]!r}, "
                         "which is not in the test pool")
    entry_query, entry_image, entry_box, count_gt = _entries(
        gallery.positive_query, gallery.positive_image, gallery.positive_box, q
    )
    listed = _check_listed(f"TestG{gallery.size}", gallery.image_index, entry_query, entry_image,
                           len(annotations.images))
    if full_set:
        name = "cuhk_sysu/full"
        own = queries.image_index
        excluded = np.stack([index.image_start[own], index.image_end[own]], axis=1)
        listed = None
    else:
        name = f"cuhk_sysu/g{gallery.size}"
        excluded = None
    return _finish(name, q, listed, excluded, entry_query, entry_image, entry_box, count_gt, index)


def prw_protocol(annotations: Annotations, index: GalleryIndex, *, cross_camera: bool) -> SearchProtocol:
    """Every test frame except the query's own (``prw/all``), or only frames of the other
    cameras (``prw/cross_cam``). Positives: the frames where the query's pid is annotated."""
    images, queries = annotations.images, annotations.queries
    q = len(queries)
    box_image = images.box_image_index()
    labelled = np.flatnonzero((images.pids >= 0) & (images.split[box_image] == "test"))
    by_pid = labelled[np.argsort(images.pids[labelled], kind="stable")]
    pid_sorted = images.pids[by_pid]
    lo = np.searchsorted(pid_sorted, queries.pid, side="left")
    hi = np.searchsorted(pid_sorted, queries.pid, side="right")
    boxes_of_query, query_of = expand_ranges(lo, hi - lo)
    box_rows = by_pid[boxes_of_query]
    entry_image = box_image[box_rows]
    keep = entry_image != queries.image_index[query_of]
    query_camera = images.camera[queries.image_index].astype(np.int64)
    if cross_camera:
        if np.any(query_camera < 0):
            raise ValueError("PRW cross-camera search needs every query image's camera (found -1)")
        keep &= images.camera[entry_image] != query_camera[query_of]
    entry_query, entry_image, entry_box = query_of[keep], entry_image[keep], images.boxes[box_rows[keep]]
    # One entry per (query, frame), as the reference's per-frame lookup; count_gt counts frames.
    entry_query, entry_image, entry_box, count_gt = _entries(entry_query, entry_image, entry_box, q, dedupe_counts=True)
    own = queries.image_index
    if cross_camera:
        cam_lo = np.array([index.camera_start.get(int(c), 0) for c in query_camera], np.int64)
        cam_hi = np.array([index.camera_end.get(int(c), 0) for c in query_camera], np.int64)
        excluded = np.stack([cam_lo, cam_hi], axis=1)
        name = "prw/cross_cam"
    else:
        excluded = np.stack([index.image_start[own], index.image_end[own]], axis=1)
        name = "prw/all"
    return _finish(name, q, None, excluded, entry_query, entry_image, entry_box, count_gt, index)


# ---- helpers -----------------------------------------------------------------------------------
def _check_listed(name, listed, entry_query, entry_image, num_images):
    """Per query: every positive must be among its listed images (else precision could exceed
    1), and an image listed twice is searched once, as the reference does (the row keeps the
    first listing, padded with -1, which selects nothing). One bincount per chunk of queries."""
    listed = np.asarray(listed, dtype=np.int64)
    q = len(listed)
    chunk = max(1, (1 << 22) // max(1, num_images))
    duplicated = []
    for q0 in range(0, q, chunk):
        q1 = min(q, q0 + chunk)
        flat = (np.arange(q1 - q0)[:, None] * num_images + listed[q0:q1]).ravel()
        counts = np.bincount(flat, minlength=(q1 - q0) * num_images)
        duplicated.append(q0 + np.flatnonzero((counts.reshape(q1 - q0, num_images) > 1).any(axis=1)))
        e0, e1 = np.searchsorted(entry_query, [q0, q1])
        inside = counts[(entry_query[e0:e1] - q0) * num_images + entry_image[e0:e1]] > 0
        if not np.all(inside):
            e = e0 + int(np.flatnonzero(~inside)[0])
            raise ValueError(f"{name}: query {int(entry_query[e])} has a positive in image row "
                             f"{int(entry_image[e])}, which its gallery does not list")
    duplicated = np.concatenate(duplicated) if duplicated else np.zeros(0, np.int64)
    if duplicated.size == 0:
        return listed
    out = listed.copy()
    for r in duplicated:  # rare: only rows that actually repeat an image
        _, first = np.unique(listed[r], return_index=True)
        out[r] = -1
        out[r, : len(first)] = listed[r][np.sort(first)]
    return out


def _entries(query, image, box, num_queries, *, dedupe_counts: bool = False):
    """Sort positive entries by query and keep one per (query, image), the first listed.

    ``count_gt`` counts every listed positive (CUHK-SYSU: every ``Gallery`` item with an
    ``idlocate``, as the reference counts them), or with ``dedupe_counts`` the distinct images.
    """
    query = np.asarray(query, np.int64)
    image = np.asarray(image, np.int64)
    box = np.asarray(box, np.float32).reshape(-1, 4)
    if query.size and (query.min() < 0 or query.max() >= num_queries):
        raise ValueError(f"positive entry refers to query {query.max()} of {num_queries}")
    order = np.lexsort((np.arange(len(query)), image, query))
    query, image, box = query[order], image[order], box[order]
    first = np.ones(len(query), bool)
    first[1:] = (query[1:] != query[:-1]) | (image[1:] != image[:-1])
    counted = query[first] if dedupe_counts else query
    count_gt = np.bincount(counted, minlength=num_queries).astype(np.int64)
    return query[first], image[first], box[first], count_gt


def _check_not_excluded(name, excluded, entry_query, entry_image, index: GalleryIndex) -> None:
    """A positive inside the query's excluded block would make precision exceed 1."""
    start = index.image_start[entry_image]
    has_dets = index.image_end[entry_image] > start
    lo, hi = excluded[entry_query, 0], excluded[entry_query, 1]
    inside = has_dets & (start >= lo) & (start < hi)
    if np.any(inside):
        e = int(np.flatnonzero(inside)[0])
        raise ValueError(f"{name}: query {int(entry_query[e])} has a positive in image row "
                         f"{int(entry_image[e])}, which its search excludes")


def _finish(name, q, listed, excluded, entry_query, entry_image, entry_box, count_gt, index: GalleryIndex):
    if excluded is not None:
        _check_not_excluded(name, excluded, entry_query, entry_image, index)
    entry_offsets = np.concatenate([[0], np.cumsum(np.bincount(entry_query, minlength=q))]).astype(np.int64)
    starts = index.image_start[entry_image]
    rows, entry_of = expand_ranges(starts, index.image_end[entry_image] - starts)
    ok = paired_iou(index.boxes[rows], entry_box[entry_of]) >= search_iou_threshold(entry_box)[entry_of]
    rows, entry_of = rows[ok], entry_of[ok]
    pair_offsets = np.concatenate([[0], np.cumsum(np.bincount(entry_of, minlength=len(entry_image)))])
    return SearchProtocol(
        name=name,
        num_queries=q,
        listed_images=listed,
        excluded_rows=excluded,
        entry_offsets=entry_offsets,
        entry_image=entry_image,
        entry_box=entry_box,
        count_gt=count_gt,
        pair_offsets=pair_offsets.astype(np.int64),
        pair_row=rows,
    )
