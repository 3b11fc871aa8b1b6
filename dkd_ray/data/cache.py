"""Parse a benchmark's MATLAB files once, then load its annotations from Parquet.

A cache entry is a folder ``<cache_dir>/<dataset>-<key>/`` whose key hashes the *content* of
every source file (and :data:`FORMAT_VERSION`), so a changed source gives a new entry and an
untouched one is shared by every worker of a cluster. Hashing hundreds of MB of ``TestG`` files
on every load would cost seconds, so, like git's index, ``source_hashes.json`` remembers each
file's ``(size, mtime_ns) -> sha256`` and only files whose stat changed are hashed again.
The key also covers the images, whose header sizes the readers clip boxes to: the name, byte
size and mtime of every file in the image folder (:func:`image_folder_digest`).
Entries are written to a temporary folder and renamed into place, so a concurrent reader sees
either nothing or a complete entry; on a cold cache one worker parses under a file lock while
the others wait for its entry.

Layout of an entry (all arrays columnar, read straight into numpy):
  ``images_train.parquet`` / ``images_test.parquet``: one row per image with its row ``index``
  in the :class:`ImageTable`, ``name``, ``path``, ``width``, ``height``, ``camera``, ``boxes``
  (list of fixed_size_list<float32, 4>) and ``pids`` (list<int32>);
  ``queries.parquet``; ``gallery_<size>.parquet`` (the dense ``[Q, size]`` image indices,
  row-major, one flat column) and ``gallery_<size>_positives.parquet``; ``meta.json``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat as stat_module
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .annotations import (
    BOX_RULES,
    DATASETS,
    SPLITS,
    Annotations,
    GalleryProtocol,
    ImageTable,
    QueryTable,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the readers' rules or this layout change (2: non-finite boxes)
HASH_INDEX_FILE = "source_hashes.json"
META_FILE = "meta.json"
# A file modified this close to the moment it was hashed may change again within the same
# mtime tick without its stat changing (git's "racy clean" case): such a hash is not trusted.
RACY_WINDOW_NS = 2_000_000_000


# --- Where -------------------------------------------------------------------------------------

FALLBACK_DIR_NAME = "dkd-ray-cache"  # under tempfile.gettempdir()
_warned_fallbacks: set[str] = set()  # one warning per fallback folder and process


def default_cache_dir(root: str | Path) -> Path:
    """``<root>/.dkd_cache`` when the dataset folder is writable, else a per-user folder keyed
    by the dataset's absolute path, else (read-only home too) one under the temp folder."""
    root = Path(root).resolve()
    local = root / ".dkd_cache"
    if _writable_dir(local):
        return local
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    try:
        per_user = Path.home() / ".cache" / "dkd_ray" / digest
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        per_user = None
    if per_user is not None and _writable_dir(per_user):
        return per_user
    return _fallback_dir(root, f"neither {local} nor {per_user} is writable")


def _fallback_dir(root: Path, why: str) -> Path:
    """``<tempdir>/dkd-ray-cache/<digest of root>``, with one warning per process. Temp folders
    are usually cleaned at reboot: a parse now and then, never a failed run."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    fallback = Path(tempfile.gettempdir()) / FALLBACK_DIR_NAME / digest
    if str(fallback) not in _warned_fallbacks:
        _warned_fallbacks.add(str(fallback))
        log.warning("annotation cache for %s: %s; using %s instead", root, why, fallback)
    return fallback


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


# --- Which: content hashes of the sources --------------------------------------------------------

class SourceHashIndex:
    """``path -> (size, mtime_ns, sha256)``, persisted so unchanged files are never re-read."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, list] = {}
        self.changed = False
        self.hashed_bytes = 0  # how much had to be read this time (for tests and logs)
        try:
            self.entries = json.loads(path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def sha256(self, file: str) -> str | None:
        """The content hash of ``file`` (an absolute path), None if it does not exist. A path
        that is no readable file (a folder, a file where its folder should be, a symlink loop,
        no permission) gets a marker instead: the key is still made, and the readers then name
        the problem (a DatasetError) rather than a traceback from here."""
        try:
            stat = os.stat(file)
        except FileNotFoundError:
            return None
        except OSError as exc:  # ENOTDIR, ELOOP, EACCES on a parent folder
            return f"unreadable: errno {exc.errno}"
        if not stat_module.S_ISREG(stat.st_mode):  # a folder; a pipe would block the read
            return f"not a regular file: mode {stat.st_mode:o}"
        entry = self.entries.get(file)
        if (entry is not None and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns
                and entry[3] - stat.st_mtime_ns > RACY_WINDOW_NS):
            return entry[2]
        hashed_at = time.time_ns()
        try:
            digest = _file_sha256(file)
        except OSError as exc:  # permission denied, I/O error
            return f"unreadable: errno {exc.errno}"
        self.hashed_bytes += stat.st_size
        self.entries[file] = [stat.st_size, stat.st_mtime_ns, digest, hashed_at]
        self.changed = True
        return digest

    def save(self) -> None:
        if self.changed:
            try:
                _atomic_write_text(self.path, json.dumps(self.entries))
            except OSError as exc:  # a read-only cache: files are hashed again next time
                log.warning("cannot save %s (%s); source files will be hashed again",
                            self.path, exc)
            self.changed = False


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def source_files(dataset: str, root: Path) -> list[str]:
    """The dataset's source files, relative to ``root`` (present or not)."""
    from . import cuhk_sysu, prw

    return {"cuhk_sysu": cuhk_sysu.source_files, "prw": prw.source_files}[dataset](root)


def image_folder(dataset: str) -> str:
    """The folder holding the dataset's images, relative to its root."""
    from . import cuhk_sysu, prw

    return {"cuhk_sysu": cuhk_sysu.IMAGE_DIR, "prw": prw.FRAME_DIR}[dataset]


def image_folder_digest(folder: str | Path, *, workers: int = 8) -> str:
    """SHA-256 of the name, byte size and mtime of every file in the image ``folder``: what the
    tables depend on in the images (their header sizes, to which boxes are clipped).

    One stat per file, not a header read: a stat is a single metadata round trip that network
    file systems answer from their attribute cache, a header read is an open plus a data read
    (several times slower on 20k files). Threads hide the latency as for the headers. A
    replaced image changes its mtime, so it is caught even at the same byte size; a copy of the
    dataset that does not keep mtimes gets one fresh parse. Listing the folder, not the
    annotated paths (unknown before the parse), also covers images that appear."""
    folder = os.fspath(folder)
    try:
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries if not e.name.startswith("."))
    except FileNotFoundError:
        return "absent"
    except OSError as exc:  # a file where the folder should be, a loop: the readers report it
        return f"unlistable: errno {exc.errno}"

    def stats(chunk: list[str]) -> list[str]:
        lines = []
        for name in chunk:
            try:
                s = os.stat(os.path.join(folder, name))
                lines.append(f"{name}\0{s.st_size}\0{s.st_mtime_ns}\0{s.st_mode:o}")
            except OSError as exc:  # a symlink loop, a dangling link
                lines.append(f"{name}\0errno {exc.errno}")
        return lines

    step = max(1, -(-len(names) // max(1, workers)))  # one chunk per thread: little overhead
    chunks = [names[i:i + step] for i in range(0, len(names), step)]
    digest = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(chunks)))) as pool:
        for lines in pool.map(stats, chunks):
            digest.update("\n".join(lines).encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def cache_key(dataset: str, root: Path, index: SourceHashIndex, box_rule: str = "exact") -> str:
    """Hash of the format version, every existing source file's relative path and content,
    the image folder's stats (:func:`image_folder_digest`) and, for PRW read with a non-default
    ``box_rule``, the rule (so a ``seqnet`` entry is never served for ``exact`` or the other
    way round)."""
    base = os.path.abspath(root)
    sources = []
    for rel in source_files(dataset, root):
        digest = index.sha256(os.path.join(base, rel))
        if digest is not None:
            sources.append([rel, digest])
    key: dict[str, Any] = {"format": FORMAT_VERSION, "dataset": dataset, "sources": sources,
                           "images": image_folder_digest(os.path.join(base,
                                                                      image_folder(dataset)))}
    if dataset == "prw" and box_rule != "exact":
        key["box_rule"] = box_rule
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]


# --- Load ---------------------------------------------------------------------------------------

def load_annotations(dataset: str, root: str | Path, *, cache_dir: str | Path | None = None,
                     use_cache: bool = True, box_rule: str = "exact") -> Annotations:
    """The annotations of ``dataset`` ('cuhk_sysu' | 'prw') at ``root``: from the Parquet cache
    when the sources are unchanged, else parsed (and cached). ``box_rule`` ('exact' |
    'seqnet', ``data.box_rule``) is how PRW boxes are read; CUHK-SYSU ignores it."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if box_rule not in BOX_RULES:
        raise ValueError(f"unknown box_rule {box_rule!r}; expected one of {BOX_RULES}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    if not use_cache:
        return _parse(dataset, root, box_rule)

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
    if not _writable_dir(cache_dir):
        cache_dir = _fallback_dir(root, f"{cache_dir} is not a writable folder")
        if not _writable_dir(cache_dir):
            log.warning("no writable annotation cache (%s): parsing %s without one", cache_dir,
                        root)
            return _parse(dataset, root, box_rule)
    index = SourceHashIndex(cache_dir / HASH_INDEX_FILE)
    key = cache_key(dataset, root, index, box_rule)
    index.save()
    entry = cache_dir / f"{dataset}-{key}"
    annotations = _read_if_valid(entry, root)
    if annotations is not None:
        return annotations
    # One worker parses while the others of the cluster wait for its entry.
    with _exclusive(cache_dir / f".{entry.name}.lock"):
        annotations = _read_if_valid(entry, root)
        if annotations is not None:
            return annotations
        log.info("parsing %s annotations under %s (cached afterwards in %s)", dataset, root,
                 entry)
        annotations = _parse(dataset, root, box_rule)
        try:
            write_entry(annotations, entry, key, box_rule if dataset == "prw" else "exact")
        except OSError as exc:  # disk full, a cache made read-only meanwhile: not worth a run
            log.warning("could not cache the annotations in %s (%s); parsed again next time",
                        entry, exc)
    return annotations


def _read_if_valid(entry: Path, root: Path) -> Annotations | None:
    if not entry.is_dir():
        return None
    try:
        return read_entry(entry, root)
    except (_StaleEntry, OSError, KeyError, ValueError, pa.ArrowException) as exc:
        log.info("cache entry %s is stale or damaged (%s): parsing again", entry, exc)
        _discard(entry)
        return None


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory file lock (flock); without lock support, no exclusion (each worker may
    parse, and the atomic rename still keeps the entry whole)."""
    try:
        lock_file = open(lock_path, "a")
    except OSError:
        yield
        return
    with lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        except OSError:
            pass
        yield  # closing the file releases the lock


def _parser(dataset: str) -> Callable[[Path], Annotations]:
    from . import cuhk_sysu, prw

    return {"cuhk_sysu": cuhk_sysu.parse_cuhk_sysu, "prw": prw.parse_prw}[dataset]


def _parse(dataset: str, root: Path, box_rule: str) -> Annotations:
    """Parse ``root``; ``box_rule`` is PRW's only (CUHK-SYSU has one reading)."""
    if dataset == "prw":
        return _parser(dataset)(root, box_rule=box_rule)
    return _parser(dataset)(root)


class _StaleEntry(Exception):
    pass


def _discard(entry: Path) -> None:
    """Move a bad entry out of the way atomically (readers of it keep their open files)."""
    trash = entry.parent / f".stale-{entry.name}-{os.getpid()}-{time.time_ns()}"
    try:
        os.rename(entry, trash)
    except OSError:
        return  # another worker discarded it first
    shutil.rmtree(trash, ignore_errors=True)


# --- Write --------------------------------------------------------------------------------------

def write_entry(annotations: Annotations, entry: Path, key: str, box_rule: str = "exact") -> None:
    """Write ``annotations`` as the cache entry folder ``entry``, atomically."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        images = annotations.images
        for split in SPLITS:
            pq.write_table(_images_table(images, images.indices(split)),
                           tmp / f"images_{split}.parquet")
        queries = annotations.queries
        pq.write_table(pa.table({
            "image_index": pa.array(queries.image_index, pa.int64()),
            "box": _boxes_array(queries.box),
            "pid": pa.array(queries.pid, pa.int32()),
        }), tmp / "queries.parquet")
        for size, protocol in annotations.galleries.items():
            # lz4 + dictionary: the ~22M indices of all six CUHK-SYSU protocols decode in ~0.2 s
            pq.write_table(pa.table({"image_index": pa.array(
                protocol.image_index.reshape(-1), pa.int64())}),
                tmp / f"gallery_{size}.parquet", compression="lz4")
            pq.write_table(pa.table({
                "query": pa.array(protocol.positive_query, pa.int64()),
                "image": pa.array(protocol.positive_image, pa.int64()),
                "box": _boxes_array(protocol.positive_box),
            }), tmp / f"gallery_{size}_positives.parquet")
        meta = {
            "format_version": FORMAT_VERSION,
            "dataset": annotations.dataset,
            "key": key,
            "box_rule": box_rule,  # for people reading the folder: the key already holds it
            "num_images": len(images),
            "num_queries": len(queries),
            "num_train_ids": annotations.num_train_ids,
            "gallery_sizes": sorted(annotations.galleries),
            # Images whose size was unknown (absent); if one appears, the entry is stale.
            "unsized_images": [str(p) for p in images.path[(images.width <= 0)
                                                             | (images.height <= 0)]],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, entry)  # atomic; fails if another worker got there first
        except OSError:
            if not (entry / META_FILE).is_file():  # a broken leftover, not a finished entry
                _discard(entry)
                os.rename(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _boxes_array(boxes: np.ndarray) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, 4)


def _images_table(images: ImageTable, rows: np.ndarray) -> pa.Table:
    counts = np.diff(images.box_offsets)[rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    box_rows = _concat_ranges(images.box_offsets[rows], counts)
    offsets_array = pa.array(offsets, pa.int32())
    return pa.table({
        "index": pa.array(rows, pa.int64()),
        "name": pa.array(images.name[rows].tolist(), pa.string()),
        "path": pa.array(images.path[rows].tolist(), pa.string()),
        "width": pa.array(images.width[rows], pa.int32()),
        "height": pa.array(images.height[rows], pa.int32()),
        "camera": pa.array(images.camera[rows], pa.int16()),
        "boxes": pa.ListArray.from_arrays(offsets_array, _boxes_array(images.boxes[box_rows])),
        "pids": pa.ListArray.from_arrays(offsets_array,
                                         pa.array(images.pids[box_rows], pa.int32())),
    })


def _concat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])``, vectorised."""
    total = int(counts.sum())
    ends = np.cumsum(counts)
    return np.arange(total, dtype=np.int64) - np.repeat(ends - counts - starts, counts)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- Read ---------------------------------------------------------------------------------------

def read_entry(entry: Path, root: Path) -> Annotations:
    """Read a cache entry back into :class:`Annotations` (columns straight to numpy)."""
    try:
        meta: dict[str, Any] = json.loads((entry / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise _StaleEntry(f"unreadable {META_FILE}: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise _StaleEntry(f"format {meta.get('format_version')} != {FORMAT_VERSION}")
    appeared = [p for p in meta["unsized_images"] if (root / p).is_file()]
    if appeared:
        raise _StaleEntry(f"{len(appeared)} missing images have appeared, e.g. {appeared[0]}")

    images = _read_images(entry, meta["num_images"])
    queries_table = _read_parquet(entry / "queries.parquet")
    queries = QueryTable(
        image_index=_column(queries_table, "image_index", np.int64),
        box=_boxes_column(queries_table, "box"),
        pid=_column(queries_table, "pid", np.int32),
    )
    galleries = {}
    for size in meta["gallery_sizes"]:
        flat = _column(_read_parquet(entry / f"gallery_{size}.parquet"), "image_index", np.int64)
        positives = _read_parquet(entry / f"gallery_{size}_positives.parquet")
        galleries[size] = GalleryProtocol(
            size=size,
            image_index=flat.reshape(-1, size),
            positive_query=_column(positives, "query", np.int64),
            positive_image=_column(positives, "image", np.int64),
            positive_box=_boxes_column(positives, "box"),
        )
    return Annotations(dataset=meta["dataset"], root=root, images=images, queries=queries,
                       galleries=galleries, num_train_ids=meta["num_train_ids"])


def _read_parquet(path: Path) -> pa.Table:
    # ParquetFile, not pq.read_table: the latter imports pyarrow.dataset and with it pandas
    # (~0.5 s), more than reading all of CUHK-SYSU's tables.
    with pq.ParquetFile(path, memory_map=True) as file:
        return file.read(use_threads=True)


def _view(array: pa.Array, dtype: np.dtype) -> np.ndarray:
    """A null-free primitive Arrow array as a numpy view of its buffer (no copy). Arrow's own
    ``to_numpy`` does the same but imports pandas on first use (~0.5 s)."""
    if array.null_count:
        raise _StaleEntry(f"unexpected nulls in a {array.type} column")
    dtype = np.dtype(dtype)
    if array.type != pa.from_numpy_dtype(dtype):
        raise _StaleEntry(f"column type {array.type}, expected {dtype}")
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array),
                         offset=array.offset * dtype.itemsize)


def _joined(views: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    if len(views) == 1:
        return views[0]
    return np.concatenate(views) if views else np.zeros(0, dtype)


def _column(table: pa.Table, name: str, dtype: np.dtype) -> np.ndarray:
    return _joined([_view(chunk, dtype) for chunk in table.column(name).chunks], dtype)


def _fixed_boxes(array: pa.FixedSizeListArray) -> np.ndarray:
    """fixed_size_list<float32, 4> -> float32 [n, 4]. ``.values`` ignores the array's slice
    offset, so it is applied here (``flatten()`` would, but loads pyarrow.compute: ~0.2 s)."""
    floats = _view(array.values, np.float32)
    return floats[array.offset * 4:(array.offset + len(array)) * 4].reshape(-1, 4)


def _boxes_column(table: pa.Table, name: str) -> np.ndarray:
    """A fixed_size_list<float32, 4> column as float32 [n, 4]."""
    return _joined([_fixed_boxes(chunk) for chunk in table.column(name).chunks],
                   np.float32).reshape(-1, 4)


def _list_column(table: pa.Table, name: str, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (length of each row, flat values); list<fixed_size_list<float32, 4>>
    gives float32 [n, 4] values."""
    lengths, values = [], []
    for chunk in table.column(name).chunks:
        offsets = _view(chunk.offsets, np.int32)  # already sliced to this chunk's rows
        lengths.append(np.diff(offsets))
        child = chunk.values  # not sliced
        flat = (_fixed_boxes(child) if isinstance(child, pa.FixedSizeListArray)
                else _view(child, dtype))
        values.append(flat[offsets[0]:offsets[-1]] if len(offsets) else flat[:0])
    return _joined(lengths, np.int32), _joined(values, dtype)


def _strings(table: pa.Table, name: str) -> np.ndarray:
    return np.array(table.column(name).to_pylist(), dtype=object)


def _read_images(entry: Path, num_images: int) -> ImageTable:
    """Put both splits' rows back in :class:`ImageTable` order, boxes included (CSR)."""
    name = np.empty(num_images, dtype=object)
    path = np.empty(num_images, dtype=object)
    split_column = np.empty(num_images, dtype=object)
    width = np.zeros(num_images, dtype=np.int32)
    height = np.zeros(num_images, dtype=np.int32)
    camera = np.zeros(num_images, dtype=np.int16)
    counts = np.zeros(num_images, dtype=np.int64)
    parts = []
    for split in SPLITS:
        table = _read_parquet(entry / f"images_{split}.parquet")
        rows = _column(table, "index", np.int64)
        split_counts, split_boxes = _list_column(table, "boxes", np.float32)
        _, split_pids = _list_column(table, "pids", np.int32)
        name[rows] = _strings(table, "name")
        path[rows] = _strings(table, "path")
        split_column[rows] = split
        width[rows] = _column(table, "width", np.int32)
        height[rows] = _column(table, "height", np.int32)
        camera[rows] = _column(table, "camera", np.int16)
        counts[rows] = split_counts
        parts.append((rows, split_counts, split_boxes.reshape(-1, 4), split_pids))
    if np.equal(split_column, None).any():
        raise _StaleEntry("image rows missing from the split tables")

    offsets = np.zeros(num_images + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    boxes = np.zeros((int(offsets[-1]), 4), dtype=np.float32)
    pids = np.zeros(int(offsets[-1]), dtype=np.int32)
    for rows, split_counts, split_boxes, split_pids in parts:
        destination = _concat_ranges(offsets[rows], split_counts)
        boxes[destination] = split_boxes
        pids[destination] = split_pids
    return ImageTable(name=name, path=path, split=split_column, width=width, height=height,
                      camera=camera, box_offsets=offsets, boxes=boxes, pids=pids)
