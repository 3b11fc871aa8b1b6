"""``Detections``: what a model produced on a set of images, as flat arrays (the evaluation input).

Rows are sorted by image and indexed CSR-style like ``ImageTable``: the detections of image ``i``
are rows ``offsets[i]:offsets[i + 1]``, where ``i`` is a row of the dataset's ``ImageTable`` (or,
for CBGM's query context, a row of the ``QueryTable``). ``num_images = len(offsets) - 1``.

Embeddings are used exactly as given (similarity = dot product); models hand over L2-normalised
ones, so the dot product is the cosine similarity.

Files (for ``jobs/evaluate.py``): ``.npz`` (arrays ``image_index``, ``boxes``, ``scores``,
``embeddings``, ``num_images``, optionally ``image_names`` for every image row) or ``.parquet``
(columns ``image_index``, ``image_name``?, ``box`` fixed_size_list<float32>[4], ``score``,
``embedding`` fixed_size_list<float32>[d]; ``num_images`` in the schema metadata). When a file
carries image names and the reader is given the dataset's names, detections are re-indexed by
name, so a file stays valid even if the image table's row order changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

_SUFFIXES = (".npz", ".parquet")


@dataclass(frozen=True)
class Detections:
    image_index: np.ndarray  # int64 [N], non-decreasing
    boxes: np.ndarray  # float32 [N, 4], x1 y1 x2 y2
    scores: np.ndarray  # float32 [N]
    embeddings: np.ndarray  # float32 [N, d]
    offsets: np.ndarray  # int64 [num_images + 1]

    def __post_init__(self) -> None:
        n = len(self.image_index)
        if self.boxes.shape != (n, 4):
            raise ValueError(f"boxes must be [{n}, 4], got {self.boxes.shape}")
        if self.scores.shape != (n,):
            raise ValueError(f"scores must be [{n}], got {self.scores.shape}")
        if self.embeddings.ndim != 2 or len(self.embeddings) != n:
            raise ValueError(f"embeddings must be [{n}, d], got {self.embeddings.shape}")
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[-1] != n:
            raise ValueError("offsets must be [num_images + 1] and end at the number of detections")
        if n and np.any(np.diff(self.image_index) < 0):
            raise ValueError("detections must be sorted by image_index (use Detections.from_arrays)")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        image_index: np.ndarray,
        boxes: np.ndarray,
        scores: np.ndarray,
        embeddings: np.ndarray,
        *,
        num_images: int,
    ) -> "Detections":
        """From flat arrays in any order (sorted by image here, stably)."""
        image_index = np.asarray(image_index, dtype=np.int64).ravel()
        if image_index.size and (image_index.min() < 0 or image_index.max() >= num_images):
            bad = image_index[(image_index < 0) | (image_index >= num_images)][0]
            raise ValueError(f"image_index {bad} is outside 0..{num_images - 1}")
        order = np.argsort(image_index, kind="stable")
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim == 1 and embeddings.size == 0:
            embeddings = embeddings.reshape(0, 0)
        counts = np.bincount(image_index, minlength=num_images)
        return cls(
            image_index=image_index[order],
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4)[order],
            scores=np.asarray(scores, dtype=np.float32).ravel()[order],
            embeddings=embeddings[order],
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        )

    @classmethod
    def from_lists(
        cls,
        image_indices: Sequence[int],
        boxes: Sequence[np.ndarray],
        scores: Sequence[np.ndarray],
        embeddings: Sequence[np.ndarray],
        *,
        num_images: int,
        dim: int | None = None,
    ) -> "Detections":
        """From per-image lists (e.g. a model's outputs): image ``image_indices[k]`` got
        ``boxes[k]`` [n_k, 4], ``scores[k]`` [n_k], ``embeddings[k]`` [n_k, d].

        ``dim`` is only needed when there is no detection at all.
        """
        if not (len(image_indices) == len(boxes) == len(scores) == len(embeddings)):
            raise ValueError("image_indices, boxes, scores and embeddings must have equal lengths")
        sizes = [len(np.asarray(s).ravel()) for s in scores]
        dims = {np.asarray(e).shape[-1] for e, n in zip(embeddings, sizes) if n}
        if len(dims) > 1:
            raise ValueError(f"embeddings have different dimensions across images: {sorted(dims)}")
        d = dims.pop() if dims else dim
        if d is None:
            raise ValueError("no detections at all: pass dim= for the embedding size")
        flat_index = np.repeat(np.asarray(image_indices, dtype=np.int64), sizes)
        return cls.from_arrays(
            flat_index, _concat(boxes, (-1, 4)), _concat(scores, (-1,)), _concat(embeddings, (-1, d)),
            num_images=num_images,
        )

    # ---- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_index)

    @property
    def num_images(self) -> int:
        return len(self.offsets) - 1

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def rows_of(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def select(self, keep: np.ndarray) -> "Detections":
        """The detections at a boolean mask or sorted index array (order and images kept)."""
        keep = np.asarray(keep)
        if keep.dtype == bool:
            keep = np.flatnonzero(keep)
        counts = np.bincount(self.image_index[keep], minlength=self.num_images)
        return Detections(
            image_index=self.image_index[keep],
            boxes=self.boxes[keep],
            scores=self.scores[keep],
            embeddings=self.embeddings[keep],
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        )

    def above(self, score_threshold: float) -> "Detections":
        """The detections with ``score >= score_threshold`` (the protocols' filter)."""
        return self.select(self.scores >= score_threshold)

    def with_embeddings(self, embeddings: np.ndarray) -> "Detections":
        """The same boxes with other embeddings, one per row: the two-step evaluation passes a
        separate Re-ID model's embeddings of these very boxes through the same protocol."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(self):
            raise ValueError(f"need [{len(self)}, d] embeddings, got {embeddings.shape}")
        return Detections(self.image_index, self.boxes, self.scores, embeddings, self.offsets)

    # ---- files --------------------------------------------------------------------------------
    def save(self, path: str | Path, image_names: np.ndarray | None = None) -> Path:
        """Write ``.npz`` or ``.parquet``; pass the ImageTable's ``name`` to make it row-order proof."""
        path = Path(path)
        _check_suffix(path)
        if image_names is not None and len(image_names) != self.num_images:
            raise ValueError(
                f"image_names has {len(image_names)} names but detections index {self.num_images} images"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npz":
            arrays = dict(image_index=self.image_index, boxes=self.boxes, scores=self.scores,
                          embeddings=self.embeddings, num_images=np.int64(self.num_images))
            if image_names is not None:
                arrays["image_names"] = np.asarray(image_names, dtype=str)
            with path.open("wb") as f:  # a file object stops numpy from appending ".npz"
                np.savez(f, **arrays)
        else:
            _write_parquet(self, path, image_names)
        return path

    @classmethod
    def load(cls, path: str | Path, image_names: np.ndarray | None = None) -> "Detections":
        """Read a file written by ``save`` (or by anything writing the same arrays/columns).

        With ``image_names`` (the ImageTable's ``name``) and names in the file, rows are mapped
        by name; a name the table lacks is an error naming the file and the image.
        """
        path = Path(path)
        _check_suffix(path)
        if not path.is_file():
            raise FileNotFoundError(f"detections file not found: {path}")
        if path.suffix == ".npz":
            fields = _read_npz(path, ("image_index", "boxes", "scores", "embeddings", "num_images"))
            index, boxes, scores, emb = (fields[k] for k in ("image_index", "boxes", "scores", "embeddings"))
            num_images = int(fields["num_images"])
            file_names = fields.get("image_names")
            det_names = None if file_names is None else file_names[index]
        else:
            index, det_names, boxes, scores, emb, num_images = _read_parquet(path)
        if image_names is not None and det_names is not None:
            index = map_names(det_names, image_names, what=f"image of {path}")
            num_images = len(image_names)
        elif image_names is not None:
            num_images = len(image_names)
        try:
            return cls.from_arrays(index, boxes, scores, emb, num_images=num_images)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def map_names(names: np.ndarray, table_names: np.ndarray, *, what: str) -> np.ndarray:
    """Row of each of ``names`` in ``table_names`` (vectorised); a missing name is an error."""
    table = np.asarray(table_names, dtype=str)
    names = np.asarray(names, dtype=str)
    order = np.argsort(table, kind="stable")
    pos = np.searchsorted(table[order], names)
    pos = np.minimum(pos, len(table) - 1) if len(table) else pos
    found = (pos < len(table)) & (table[order][pos] == names) if len(table) else np.zeros(len(names), bool)
    if not np.all(found):
        missing = names[~found]
        raise ValueError(f"{what}: {len(missing)} name(s) not in the dataset, e.g. {missing[0]!r}")
    return order[pos].astype(np.int64)


def save_query_embeddings(
    path: str | Path, embeddings: np.ndarray, query_image_names: np.ndarray | None = None
) -> Path:
    """Write the queries' embeddings ``[Q, d]`` (row q = query q of the QueryTable) to .npz/.parquet.

    ``query_image_names`` (each query's image name) lets the reader check the query order.
    """
    path = Path(path)
    _check_suffix(path)
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"query embeddings must be [Q, d], got {emb.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        arrays = {"embeddings": emb}
        if query_image_names is not None:
            arrays["query_image_names"] = np.asarray(query_image_names, dtype=str)
        with path.open("wb") as f:
            np.savez(f, **arrays)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {"embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])}
        if query_image_names is not None:
            columns["query_image_name"] = pa.array(np.asarray(query_image_names, dtype=str))
        pq.write_table(pa.table(columns), path)
    return path


def load_query_embeddings(
    path: str | Path, expected_image_names: np.ndarray | None = None
) -> np.ndarray:
    """Read ``[Q, d]`` float32 query embeddings; check them against the queries' image names."""
    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"query embeddings file not found: {path}")
    if path.suffix == ".npz":
        fields = _read_npz(path, ("embeddings",))
        emb, names = fields["embeddings"], fields.get("query_image_names")
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "embedding" not in table.column_names:
            raise ValueError(f"{path}: no column 'embedding' (has {table.column_names})")
        emb = _fixed_list_to_numpy(table.column("embedding"), path, "embedding")
        names = (np.asarray(table.column("query_image_name").to_pylist(), dtype=str)
                 if "query_image_name" in table.column_names else None)
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"{path}: query embeddings must be [Q, d], got {emb.shape}")
    if expected_image_names is not None:
        if len(emb) != len(expected_image_names):
            raise ValueError(f"{path}: {len(emb)} query embeddings but the dataset has "
                             f"{len(expected_image_names)} queries")
        if names is not None:
            bad = np.flatnonzero(names != np.asarray(expected_image_names, dtype=str))
            if bad.size:
                raise ValueError(f"{path}: query {bad[0]} is from image {names[bad[0]]!r}, the dataset's "
                                 f"query {bad[0]} is in {expected_image_names[bad[0]]!r}")
    return emb


# ---- helpers -----------------------------------------------------------------------------------
def _concat(parts: Sequence[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    if not parts:
        return np.zeros((0,) + shape[1:], np.float32)
    return np.concatenate([np.asarray(p, np.float32).reshape(shape) for p in parts])


def _check_suffix(path: Path) -> None:
    if path.suffix not in _SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {_SUFFIXES}")


def _read_npz(path: Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in required if k not in data.files]
        if missing:
            raise ValueError(f"{path}: missing array(s) {missing} (has {data.files})")
        return {k: data[k] for k in data.files}


def _write_parquet(dets: Detections, path: Path, image_names: np.ndarray | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"image_index": pa.array(dets.image_index)}
    if image_names is not None:
        columns["image_name"] = pa.array(np.asarray(image_names, dtype=str)[dets.image_index]).dictionary_encode()
    columns["box"] = pa.FixedSizeListArray.from_arrays(pa.array(dets.boxes.ravel()), 4)
    columns["score"] = pa.array(dets.scores)
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(dets.embeddings.ravel()), dets.dim)
    table = pa.table(columns).replace_schema_metadata(
        {"num_images": str(dets.num_images), "embedding_dim": str(dets.dim)}
    )
    pq.write_table(table, path)


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in ("image_index", "box", "score", "embedding") if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (has {table.column_names})")
    meta = table.schema.metadata or {}
    index = table.column("image_index").to_numpy().astype(np.int64)
    if b"num_images" in meta:
        num_images = int(meta[b"num_images"])
    else:
        num_images = int(index.max()) + 1 if len(index) else 0
    names = None
    if "image_name" in table.column_names:
        names = np.asarray(table.column("image_name").cast("string").to_pylist(), dtype=str)
    boxes = _fixed_list_to_numpy(table.column("box"), path, "box")
    emb = _fixed_list_to_numpy(table.column("embedding"), path, "embedding")
    if emb.size == 0 and b"embedding_dim" in meta:
        emb = emb.reshape(0, int(meta[b"embedding_dim"]))
    scores = table.column("score").to_numpy().astype(np.float32)
    return index, names, boxes, scores, emb, num_images


def _fixed_list_to_numpy(column, path: Path, name: str) -> np.ndarray:
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_fixed_size_list(array.type):
        raise ValueError(f"{path}: column {name!r} must be a fixed-size list, got {array.type}")
    width = array.type.list_size
    return array.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
