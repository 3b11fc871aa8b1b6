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

The readers refuse what cannot be evaluated with an ``ArraysError`` naming the file, the array
(or column) and the first bad row: an unreadable file, a missing array, a wrong shape or dtype,
lengths that disagree, an image index outside ``0..num_images-1``, non-finite numbers, boxes
with ``x2 < x1`` or ``y2 < y1``.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dkd_ray.errors import InputError

_SUFFIXES = (".npz", ".parquet")
# What the file calls each field: (npz array, Parquet column).
_FIELD_NAMES = {"index": ("image_index", "image_index"), "boxes": ("boxes", "box"),
                "scores": ("scores", "score"), "embeddings": ("embeddings", "embedding")}


class ArraysError(InputError, ValueError):
    """Evaluation arrays (a file, or arrays given to the evaluator) that cannot be evaluated; the
    message names the file, the array or column and, where it applies, the first bad row.
    A ``ValueError`` too, as the container's own checks are."""


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
        by name; a name the table lacks is an error naming the file and the image. A file that
        cannot be evaluated raises ``ArraysError`` (see the module docstring).
        """
        path = Path(path)
        _check_suffix(path)
        if not path.is_file():
            raise FileNotFoundError(f"detections file not found: {path}")
        if path.suffix == ".npz":
            fields = _read_npz(path, ("image_index", "boxes", "scores", "embeddings", "num_images"))
            num_images = _npz_count(path, fields["num_images"], "num_images")
            index, boxes, scores, emb = _checked_detections(
                path, "npz", fields["image_index"], fields["boxes"], fields["scores"], fields["embeddings"],
                num_images)
            file_names = fields.get("image_names")
            if file_names is not None:
                file_names = _strings(path, "array 'image_names'", file_names, num_images)
            det_names = None if file_names is None else file_names[index]
            stated_count = True
        else:
            index, det_names, boxes, scores, emb, num_images, stated_count = _read_parquet(path)
        if image_names is not None and det_names is not None:
            try:
                index = map_names(det_names, image_names, what=f"image of {path}")
            except ValueError as err:
                raise ArraysError(str(err)) from None
            num_images = len(image_names)
        elif image_names is not None:
            # Without names, rows are image rows: a file made for another image table would
            # silently pair detections with the wrong images.
            if stated_count and num_images != len(image_names):
                raise ArraysError(f"{path}: indexes {num_images} images (num_images) but the dataset has "
                                  f"{len(image_names)}; save the detections with image_names to map them by name")
            num_images = len(image_names)
        try:
            return cls.from_arrays(index, boxes, scores, emb, num_images=num_images)
        except ValueError as err:
            raise ArraysError(f"{path}: {err}") from None


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
    path: str | Path, expected_image_names: np.ndarray | None = None, *, expected_dim: int | None = None
) -> np.ndarray:
    """Read ``[Q, d]`` float32 query embeddings; check them against the queries' image names
    and, with ``expected_dim`` (the gallery embeddings' d), their dimension."""
    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"query embeddings file not found: {path}")
    if path.suffix == ".npz":
        fields = _read_npz(path, ("embeddings",))
        label, names_label = "array 'embeddings'", "array 'query_image_names'"
        emb, names = fields["embeddings"], fields.get("query_image_names")
        _numeric(path, label, emb)
        if emb.ndim != 2:
            raise ArraysError(f"{path}: {label} must be [Q, d], got shape {emb.shape}")
    else:
        table = _read_parquet_table(path, ("embedding",))
        label, names_label = "column 'embedding'", "column 'query_image_name'"
        emb = _fixed_list_to_numpy(table.column("embedding"), path, "embedding")
        names = (_parquet_strings(table.column("query_image_name"), path, "query_image_name")
                 if "query_image_name" in table.column_names else None)
    emb = _finite_float32(path, label, emb)
    if names is not None:
        names = _strings(path, names_label, names, len(emb))
    if expected_dim is not None and emb.shape[1] != expected_dim:
        raise ArraysError(f"{path}: {label} are {emb.shape[1]}-d but the gallery detections' embeddings "
                          f"are {expected_dim}-d")
    if expected_image_names is not None:
        if len(emb) != len(expected_image_names):
            raise ArraysError(f"{path}: {len(emb)} query embeddings but the dataset has "
                              f"{len(expected_image_names)} queries")
        if names is not None:
            bad = np.flatnonzero(names != np.asarray(expected_image_names, dtype=str))
            if bad.size:
                raise ArraysError(f"{path}: query {bad[0]} is from image {names[bad[0]]!r}, the dataset's "
                                  f"query {bad[0]} is in {expected_image_names[bad[0]]!r}")
    return emb


# ---- helpers -----------------------------------------------------------------------------------
def _concat(parts: Sequence[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    if not parts:
        return np.zeros((0,) + shape[1:], np.float32)
    return np.concatenate([np.asarray(p, np.float32).reshape(shape) for p in parts])


def _check_suffix(path: Path) -> None:
    if path.suffix not in _SUFFIXES:
        raise ArraysError(f"{path}: unsupported file type {path.suffix!r}; use one of {_SUFFIXES}")


# A truncated or corrupt archive fails in np.load or only when a member is read.
_NPZ_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


def _read_npz(path: Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
    except _NPZ_READ_ERRORS as err:
        raise ArraysError(f"{path}: not a readable .npz archive ({type(err).__name__}: {err})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):  # a lone .npy array under an .npz name
        raise ArraysError(f"{path}: not an .npz archive of named arrays (it holds a single .npy array)")
    with data:
        missing = [k for k in required if k not in data.files]
        if missing:
            raise ArraysError(f"{path}: missing array(s) {missing} (has {data.files})")
        fields = {}
        for key in data.files:
            try:
                fields[key] = data[key]
            except _NPZ_READ_ERRORS as err:
                raise ArraysError(f"{path}: array {key!r} cannot be read ({type(err).__name__}: {err})") from None
        return fields


def _npz_count(path: Path, value: np.ndarray, key: str) -> int:
    if value.size != 1 or value.dtype.kind not in "iu" or int(value.ravel()[0]) < 0:
        raise ArraysError(f"{path}: array {key!r} must be one non-negative integer, "
                          f"got {value.dtype} of shape {value.shape}")
    return int(value.ravel()[0])


def _numeric(path: Path, label: str, a: np.ndarray) -> None:
    if a.dtype.kind not in "iuf":  # strings, objects, bools, complex: not coordinates or features
        raise ArraysError(f"{path}: {label} must be numeric, got dtype {a.dtype}")


def _finite_float32(path: Path, label: str, a: np.ndarray) -> np.ndarray:
    """``a`` as float32, refusing non-finite values (also values float32 cannot hold)."""
    with np.errstate(over="ignore"):
        out = np.asarray(a, dtype=np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        row = int(np.flatnonzero(bad.reshape(len(out), -1).any(axis=1))[0])
        value = np.asarray(a).reshape(len(out), -1)[row][bad.reshape(len(out), -1)[row]][0]
        reason = "is not finite" if not np.isfinite(value) else "exceeds float32"
        raise ArraysError(f"{path}: {label} {reason} in row {row} ({value})")
    return out


def _strings(path: Path, label: str, names: np.ndarray, count: int) -> np.ndarray:
    if names.dtype.kind not in "US" or names.ndim != 1 or len(names) != count:
        raise ArraysError(f"{path}: {label} must be {count} strings, got {names.dtype} of shape {names.shape}")
    return names.astype(str)


def _checked_detections(path: Path, fmt: str, index, boxes, scores, emb, num_images: int):
    """The file's arrays as ``from_arrays`` takes them, after every check a file needs (in file
    rows, before any sorting or re-mapping)."""
    col = 0 if fmt == "npz" else 1
    label = {k: f"{'array' if fmt == 'npz' else 'column'} {names[col]!r}" for k, names in _FIELD_NAMES.items()}
    index, boxes, scores, emb = (np.asarray(a) for a in (index, boxes, scores, emb))
    if index.dtype.kind not in "iu":
        raise ArraysError(f"{path}: {label['index']} must be integers, got dtype {index.dtype}")
    for key, a in (("boxes", boxes), ("scores", scores), ("embeddings", emb)):
        _numeric(path, label[key], a)
    n = len(index) if index.ndim else 0
    if emb.ndim == 1 and emb.size == 0:  # no detection and no stated dimension
        emb = emb.reshape(0, 0)
    for key, a, ndim, shape in (("index", index, 1, "[N]"), ("boxes", boxes, 2, "[N, 4]"),
                                ("scores", scores, 1, "[N]"), ("embeddings", emb, 2, "[N, d]")):
        if a.ndim != ndim or (key == "boxes" and a.shape[1] != 4):
            raise ArraysError(f"{path}: {label[key]} must be {shape}, got shape {a.shape}")
        if len(a) != n:
            raise ArraysError(f"{path}: {label[key]} has {len(a)} rows but {label['index']} has {n}")
    outside = np.flatnonzero((index < 0) | (index >= num_images))
    if outside.size:
        row = int(outside[0])
        raise ArraysError(f"{path}: {label['index']} row {row} is {int(index[row])}, outside "
                          f"0..{num_images - 1} (num_images = {num_images})")
    boxes = _finite_float32(path, label["boxes"], boxes)
    scores = _finite_float32(path, label["scores"], scores)
    emb = _finite_float32(path, label["embeddings"], emb)
    inverted = np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
    if inverted.size:
        row = int(inverted[0])
        raise ArraysError(f"{path}: {label['boxes']} row {row} is {boxes[row].tolist()}: boxes are "
                          "x1 y1 x2 y2 with x2 >= x1 and y2 >= y1")
    return index.astype(np.int64), boxes, scores, emb


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


def _read_parquet_table(path: Path, required: tuple[str, ...]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise ArraysError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ArraysError(f"{path}: missing column(s) {missing} (has {table.column_names})")
    return table


def _read_parquet(path: Path):
    """The checked arrays of a detections Parquet file, and whether it states ``num_images``."""
    table = _read_parquet_table(path, ("image_index", "box", "score", "embedding"))
    meta = table.schema.metadata or {}
    index = _parquet_numbers(table.column("image_index"), path, "image_index")
    stated = b"num_images" in meta
    if stated:
        num_images = _metadata_count(meta, b"num_images", path)
    else:
        num_images = int(index.max()) + 1 if len(index) and index.dtype.kind in "iu" else 0
    names = None
    if "image_name" in table.column_names:
        names = _parquet_strings(table.column("image_name"), path, "image_name")
    boxes = _fixed_list_to_numpy(table.column("box"), path, "box")
    emb = _fixed_list_to_numpy(table.column("embedding"), path, "embedding")
    if emb.size == 0 and b"embedding_dim" in meta:
        emb = emb.reshape(0, _metadata_count(meta, b"embedding_dim", path))
    scores = _parquet_numbers(table.column("score"), path, "score")
    index, boxes, scores, emb = _checked_detections(path, "parquet", index, boxes, scores, emb, num_images)
    return index, names, boxes, scores, emb, num_images, stated


def _metadata_count(meta: dict, key: bytes, path: Path) -> int:
    try:
        value = int(meta[key])
    except ValueError:
        value = -1
    if value < 0:
        raise ArraysError(f"{path}: schema metadata {key.decode()!r} must be a non-negative integer, "
                          f"got {meta[key][:40]!r}")
    return value


def _first_null(array, path: Path, name: str) -> None:
    if array.null_count:
        row = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise ArraysError(f"{path}: column {name!r} is null in row {row}")


def _parquet_numbers(column, path: Path, name: str) -> np.ndarray:
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
        raise ArraysError(f"{path}: column {name!r} must be numeric, got {array.type}")
    _first_null(array, path, name)
    return array.to_numpy(zero_copy_only=False)


def _parquet_strings(column, path: Path, name: str) -> np.ndarray:
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    value_type = array.type.value_type if pa.types.is_dictionary(array.type) else array.type
    if not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type)):
        raise ArraysError(f"{path}: column {name!r} must be strings, got {array.type}")
    _first_null(array, path, name)
    return np.asarray(array.cast(value_type).to_pylist(), dtype=str)


def _fixed_list_to_numpy(column, path: Path, name: str) -> np.ndarray:
    """``[N, width]`` numbers of a fixed-size list column (numeric dtype, no nulls)."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_fixed_size_list(array.type):
        raise ArraysError(f"{path}: column {name!r} must be a fixed-size list, got {array.type}")
    value_type = array.type.value_type
    if not (pa.types.is_integer(value_type) or pa.types.is_floating(value_type)):
        raise ArraysError(f"{path}: column {name!r} must hold numbers, got {array.type}")
    _first_null(array, path, name)  # flatten() would silently drop a null list, shifting rows
    width = array.type.list_size
    values = array.flatten()
    if values.null_count:
        row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) // max(1, width)
        raise ArraysError(f"{path}: column {name!r} has a null value in row {row}")
    return values.to_numpy(zero_copy_only=False).reshape(-1, width)
