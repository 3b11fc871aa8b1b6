"""The gallery index: Parquet parts of detections plus ``index.json``, on any pyarrow filesystem.

Layout under the index URI (a folder or ``s3://...``)::

    index.json                    # written last: the index is what it lists
    parts/part-<stamp>.parquet    # one per indexing run: source, content_hash, frame, timestamp,
                                  # box (x1 y1 x2 y2, original pixels), score, image size, embedding

``index.json`` holds the model's identity (``model_digest`` of its weights, the reference it was
loaded from, its embedding size and scene sizes), the parts, and every indexed file by content
hash with its frame and box counts. Indexing again with a grown folder decodes only files whose
hash is not there yet; an index of another model is refused, for indexing and for search.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dkd_ray.storage import filesystem

from .embed import FRAME_MARKER, GalleryEmbedder, empty_table, model_digest, scene_sizes
from .errors import IndexMismatchError
from .sources import Source, frames

log = logging.getLogger(__name__)
INDEX_FILE = "index.json"
FORMAT_VERSION = 1


@dataclass
class IndexInfo:
    model_digest: str
    model_ref: str
    embedding_dim: int
    scene_sizes: tuple[int, int]
    parts: list[str] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # content hash -> source, frames, boxes
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "scene_sizes": list(self.scene_sizes)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> IndexInfo:
        data = json.loads(text)
        data["scene_sizes"] = tuple(data["scene_sizes"])
        return cls(**data)


def read_info(uri: str) -> IndexInfo | None:
    fs, root = filesystem(uri)
    path = f"{root}/{INDEX_FILE}"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return IndexInfo.from_json(f.read().decode())


def _write_info(uri: str, info: IndexInfo) -> None:
    fs, root = filesystem(uri)
    tmp = f"{root}/{INDEX_FILE}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(info.to_json().encode())
    fs.move(tmp, f"{root}/{INDEX_FILE}")  # a rename on local disks; a copy on object stores, done last


def check_same_model(info: IndexInfo, digest: str, ref: str, index_uri: str) -> None:
    if info.model_digest != digest:
        raise IndexMismatchError(
            f"index {index_uri} was built by model {info.model_ref!r} (weights {info.model_digest}), not by "
            f"{ref!r} (weights {digest}): embeddings of two models cannot be compared; search it with "
            f"{info.model_ref!r}, or build a new index with this model")


@dataclass
class IndexSummary:
    index_uri: str
    files_indexed: int
    files_skipped: int  # already in the index (same content hash)
    frames: int
    boxes: int
    seconds: float
    part: str | None

    def line(self) -> str:
        rate = self.frames / self.seconds if self.seconds else 0.0
        return (f"indexed {self.files_indexed} new file(s) ({self.files_skipped} already indexed): {self.frames} "
                f"frame(s), {self.boxes} box(es) in {self.seconds:.1f} s ({rate:.2f} frames/s) -> {self.index_uri}")


def build_index(model_ref: str, sources: list[Source], index_uri: str, *, tracking_uri: str | None = None,
                score_threshold: float | None = None, actors: int = 1, use_gpu: bool = False, batch_size: int = 4,
                progress_every_s: float = 5.0) -> IndexSummary:
    """Index the ``sources`` not yet in ``index_uri`` with the student ``model_ref`` on Ray Data
    (decoding in parallel tasks, the student on ``actors`` actors, one GPU each with ``use_gpu``)."""
    import ray

    from dkd_ray.models.loading import load_model

    model = load_model(model_ref, role="student", uri=tracking_uri)
    digest, dim = model_digest(model), int(model.roi_heads.reid_head.embedding_dim)
    info = read_info(index_uri)
    if info is None:
        info = IndexInfo(digest, str(model_ref), dim, scene_sizes(model))
    else:
        check_same_model(info, digest, str(model_ref), index_uri)
    new = [s for s in sources if s.content_hash not in info.files]
    new = list({s.content_hash: s for s in new}.values())  # a file copied twice is indexed once
    started = time.perf_counter()
    if not new:
        return IndexSummary(index_uri, 0, len(sources), 0, 0, 0.0, None)

    if not ray.is_initialized():
        ray.init(configure_logging=False, log_to_driver=False)
    ds = ray.data.from_items([s.to_dict() for s in new], override_num_blocks=len(new)).flat_map(frames)
    ds = ds.map_batches(GalleryEmbedder, batch_size=batch_size, batch_format="numpy", concurrency=actors,
                        num_gpus=1 if use_gpu else 0,
                        fn_constructor_kwargs={"model_ref": str(model_ref), "tracking_uri": tracking_uri,
                                               "score_threshold": score_threshold, "use_gpu": use_gpu})
    fs, root = filesystem(index_uri)
    fs.create_dir(f"{root}/parts", recursive=True)
    part = f"parts/part-{time.strftime('%Y%m%d-%H%M%S')}-{digest[:6]}-{len(info.parts):04d}.parquet"
    per_file: dict[str, list[int]] = {s.content_hash: [0, 0] for s in new}
    frame_count = box_count = 0
    last_print = time.perf_counter()
    with fs.open_output_stream(f"{root}/{part}") as stream, pq.ParquetWriter(stream, empty_table(dim).schema) as writer:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            scores = batch.column("score").to_numpy()
            marker = scores == FRAME_MARKER
            for key in batch.column("content_hash").filter(pa.array(marker)).to_pylist():
                per_file[key][0] += 1
            detections = batch.filter(pa.array(~marker))
            for key in detections.column("content_hash").to_pylist():
                per_file[key][1] += 1
            frame_count += int(marker.sum())
            box_count += detections.num_rows
            if detections.num_rows:
                writer.write_table(detections.select(empty_table(dim).schema.names).cast(empty_table(dim).schema))
            if time.perf_counter() - last_print >= progress_every_s:
                elapsed = time.perf_counter() - started
                print(f"  {frame_count} frames, {box_count} boxes, {frame_count / elapsed:.2f} frames/s, "
                      f"{box_count / elapsed:.1f} boxes/s", flush=True)
                last_print = time.perf_counter()
    for source in new:
        count_frames, count_boxes = per_file[source.content_hash]
        info.files[source.content_hash] = {"source": source.path, "kind": source.kind, "frames": count_frames,
                                           "boxes": count_boxes, "part": part}
    info.parts.append(part)
    _write_info(index_uri, info)
    return IndexSummary(index_uri, len(new), len(sources) - len(new), frame_count, box_count,
                        time.perf_counter() - started, part)


def read_index(index_uri: str) -> tuple[IndexInfo, pa.Table]:
    """The index's info and all its rows (the parts ``index.json`` lists, nothing else)."""
    from .errors import GalleryInputError

    info = read_info(index_uri)
    if info is None:
        raise GalleryInputError(f"{index_uri}: no gallery index there ({INDEX_FILE} missing); build one with "
                                "jobs/index_gallery.py")
    fs, root = filesystem(index_uri)
    tables = [pq.read_table(f"{root}/{part}", filesystem=fs) for part in info.parts]
    table = pa.concat_tables(tables) if tables else empty_table(info.embedding_dim)
    return info, table


def embeddings_of(table: pa.Table) -> np.ndarray:
    """``[n, d]`` float32 embeddings of index rows."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def boxes_of(table: pa.Table) -> np.ndarray:
    column = table.column("box").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, 4).astype(np.float32, copy=False)


def evaluation_detections(table: pa.Table, annotations) -> Any:
    """The index's rows over a dataset split as the evaluator's ``Detections`` (image rows found
    by path), so an index built with ``--dataset`` is scored exactly as ``jobs/evaluate.py`` would."""
    from dkd_ray.eval.arrays import Detections

    row_of = {str(annotations.image_path(i).resolve()): i for i in range(len(annotations.images))}
    sources = table.column("source").to_pylist()
    missing = sorted({s for s in sources if str(Path(s).resolve()) not in row_of})
    if missing:
        raise ValueError(f"{len(missing)} indexed file(s) are not images of this dataset, e.g. {missing[0]}")
    image_index = np.array([row_of[str(Path(s).resolve())] for s in sources], np.int64)
    return Detections.from_arrays(image_index, boxes_of(table), table.column("score").to_numpy(),
                                  embeddings_of(table), num_images=len(annotations.images))
