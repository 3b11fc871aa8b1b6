"""A validation split that is never the test set: an identity-disjoint hold-out of the training
identities, with queries and galleries built the way the dataset's test protocol builds them.

``validation_split(annotations, fraction, seed)`` returns two views of the same tables:
- ``training``: the images holding any held-out identity get split ``"val"``, so
  ``indices("train")`` no longer yields them and no held-out person is ever trained on.
  Box rows, identity numbers and image rows are unchanged, so the knowledge bank (keyed by box
  row) and the identity classifier still fit.
- ``validation``: those images are the ``"test"`` split; one query per held-out identity that
  appears in at least two of them; CUHK-SYSU gets a ``TestG``-style gallery per query (all
  images with the person, filled with other validation images up to ``gallery_size``), PRW is
  searched over every other validation frame (all and cross-camera), exactly as at test time.
Deterministic per seed.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from dkd_ray.data.annotations import VALIDATION, Annotations, GalleryProtocol, QueryTable


def validation_split(annotations: Annotations, fraction: float, seed: int = 0,
                     gallery_size: int = 100) -> tuple[Annotations, Annotations]:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    images = annotations.images
    box_image = images.box_image_index()
    in_train = images.split[box_image] == "train"
    labelled = in_train & (images.pids >= 0)
    identities = np.unique(images.pids[labelled])
    if len(identities) < 2:
        raise ValueError("validation split needs at least 2 training identities")
    rng = np.random.default_rng([seed, 7919])
    count = min(len(identities) - 1, max(1, round(fraction * len(identities))))
    held_out = np.sort(rng.choice(identities, size=count, replace=False))

    is_held = labelled & np.isin(images.pids, held_out)
    val_images = np.unique(box_image[is_held])
    training_split = images.split.copy()
    training_split[val_images] = VALIDATION
    training = replace(annotations, images=replace(images, split=training_split))

    queries = _queries(annotations, held_out, val_images, box_image, is_held)
    validation_split_col = np.where(np.isin(np.arange(len(images)), val_images), "test", "train").astype(object)
    val_table = replace(images, split=validation_split_col)
    galleries = {}
    if annotations.dataset == "cuhk_sysu":
        size = min(gallery_size, len(val_images) - 1)
        galleries = {size: _gallery(annotations, queries, val_images, box_image, size, rng)}
    validation = replace(annotations, images=val_table, queries=queries, galleries=galleries)
    return training, validation


def _queries(annotations: Annotations, held_out: np.ndarray, val_images: np.ndarray, box_image: np.ndarray,
             is_held: np.ndarray) -> QueryTable:
    """One query per held-out identity seen in at least two images: its first box."""
    images = annotations.images
    rows, boxes, pids = [], [], []
    for pid in held_out:
        where = np.flatnonzero(is_held & (images.pids == pid))
        if len(np.unique(box_image[where])) < 2:
            continue  # nothing to find: held out from training, but not a query
        rows.append(box_image[where[0]])
        boxes.append(images.boxes[where[0]])
        pids.append(pid)
    return QueryTable(image_index=np.asarray(rows, np.int64), box=np.asarray(boxes, np.float32).reshape(-1, 4),
                      pid=np.asarray(pids, np.int32))


def _gallery(annotations: Annotations, queries: QueryTable, val_images: np.ndarray, box_image: np.ndarray,
             size: int, rng: np.random.Generator) -> GalleryProtocol:
    """CUHK-SYSU-style: the images holding the query person first, then other validation images."""
    images = annotations.images
    gallery = np.empty((len(queries), size), np.int64)
    pos_q, pos_img, pos_box = [], [], []
    for q, (query_image, pid) in enumerate(zip(queries.image_index, queries.pid)):
        person = np.flatnonzero((images.pids == pid) & np.isin(box_image, val_images))
        with_person = [int(i) for i in dict.fromkeys(box_image[person]) if i != query_image][:size]
        others = np.setdiff1d(val_images, [*with_person, query_image])
        fill = rng.choice(others, size=size - len(with_person), replace=False)
        gallery[q] = np.concatenate([np.asarray(with_person, np.int64), np.sort(fill)])
        for image in with_person:
            box = person[box_image[person] == image][0]
            pos_q.append(q), pos_img.append(image), pos_box.append(images.boxes[box])
    return GalleryProtocol(size=size, image_index=gallery, positive_query=np.asarray(pos_q, np.int64),
                           positive_image=np.asarray(pos_img, np.int64),
                           positive_box=np.asarray(pos_box, np.float32).reshape(-1, 4))
