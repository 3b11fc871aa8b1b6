"""CUHK-SYSU as it unpacks (docs/DATASETS.md): ``Images.mat``, ``pool.mat``, ``Train.mat`` and every
``TestG<size>.mat``, read by field name, into :class:`~dkd_ray.data.annotations.Annotations`.

Identities are not stored with the boxes: a training identity's sightings (``Train.mat``) and a
test query's sightings (``TestG*.mat``) are matched back to the boxes of ``Img`` by coordinates.
Matching happens on the raw ``[x y w h]`` values, before conversion and clipping.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .annotations import (
    Annotations,
    GalleryProtocol,
    QueryTable,
    clean_boxes,
    image_table,
    match_box,
)
from .matlab import (
    DatasetError,
    as_str,
    as_vector,
    cell_items,
    cell_strings,
    get_variable,
    iter_struct_array,
    load_mat,
    mat_variable_names,
    record_field,
    struct_field,
    struct_records,
)
from .image_sizes import read_image_sizes
from .report import SYNTHETIC_SIZES_FILE, ValidationReport, reading

log = logging.getLogger(__name__)

IMAGE_DIR = "Image/SSM"
IMAGES_MAT = "annotation/Images.mat"
POOL_MAT = "annotation/pool.mat"
PROTOCOL_DIR = "annotation/test/train_test"
TRAIN_MAT = f"{PROTOCOL_DIR}/Train.mat"
PROTOCOL_VARIABLE = re.compile(r"^TestG(\d+)$")
TEST_PID = re.compile(r"^p?(\d+)$")  # 'p1234' -> 1234


def protocol_files(root: Path) -> list[Path]:
    """Every ``TestG<size>.mat`` present, smallest size first."""
    files = (Path(root) / PROTOCOL_DIR).glob("TestG*.mat")
    numbered = [(int(m.group(1)), f) for f in files
                if (m := PROTOCOL_VARIABLE.match(f.stem))]
    return [f for _, f in sorted(numbered)]


def source_files(root: Path) -> list[str]:
    """The files the annotations are built from, relative to ``root`` (the cache key hashes
    the content of those present)."""
    protocols = [f"{PROTOCOL_DIR}/{f.name}" for f in protocol_files(root)]
    return [IMAGES_MAT, POOL_MAT, TRAIN_MAT, *protocols, SYNTHETIC_SIZES_FILE]


def query_list_file(root: Path) -> Path | None:
    """The protocol file whose query list the annotations hold (as :func:`_read_protocols`
    picks it): ``TestG50.mat`` when present, else the smallest protocol."""
    files = _query_list_first(protocol_files(root))
    return files[0] if files else None


def _query_list_first(files: list[Path]) -> list[Path]:
    """TestG50 defines the query list when present, else the smallest protocol."""
    return sorted(files, key=lambda f: (f.stem != "TestG50", int(f.stem[5:])))


@dataclass
class _Scenes:
    """All images' boxes (flat, image by image) while the identities are matched in."""

    names: list[str]
    row_of: dict[str, int]
    is_test: np.ndarray  # bool [N]
    widths: np.ndarray  # int32 [N], 0 = unknown
    heights: np.ndarray
    offsets: np.ndarray  # int64 [N + 1]: image i's boxes are offsets[i]:offsets[i + 1]
    raw: np.ndarray  # float64 [B, 4] x y w h, as annotated
    keep: np.ndarray  # bool [B]
    xyxy: np.ndarray  # float32 [B, 4] converted, clipped
    pids: np.ndarray  # int32 [B], -1 until matched

    def find_box(self, row: int, box_xywh: np.ndarray) -> int:
        """Flat index of the kept box of image ``row`` that is ``box_xywh``, or -1."""
        start, end = self.offsets[row], self.offsets[row + 1]
        kept = np.flatnonzero(self.keep[start:end])
        j = match_box(self.raw[start:end][kept], box_xywh)
        return int(start + kept[j]) if j >= 0 else -1


def parse_cuhk_sysu(root: str | Path, *, report: ValidationReport | None = None,
                    strict: bool = True) -> Annotations:
    """Read a CUHK-SYSU folder. Problems go to ``report``; with ``strict`` a structural problem
    raises :class:`DatasetError` (otherwise the best possible annotations come back)."""
    root = Path(root)
    own_report = report is None
    report = report if report is not None else ValidationReport("cuhk_sysu", root)

    names, raw_boxes = _read_images(root, report)
    is_test = _read_pool(root, report, names)
    paths = [f"{IMAGE_DIR}/{name}" for name in names]
    log.info("reading %d image headers under %s", len(paths), root / IMAGE_DIR)
    widths, heights = read_image_sizes(root, paths, report)
    scenes = _clean_scenes(root, report, names, raw_boxes, is_test, widths, heights)

    num_train_ids = _assign_train_ids(root, report, scenes)
    queries, galleries = _read_protocols(root, report, scenes)

    keep = scenes.keep
    images = image_table(
        name=names,
        path=paths,
        split=np.where(is_test, "test", "train").astype(object),
        width=widths,
        height=heights,
        camera=np.full(len(names), -1),
        box_counts=np.bincount(np.repeat(np.arange(len(names)), np.diff(scenes.offsets))[keep],
                               minlength=len(names)),
        boxes=scenes.xyxy[keep],
        pids=scenes.pids[keep],
    )
    if strict:
        report.raise_if_fatal()
    if own_report:
        report.log_summary(log)
    return Annotations(dataset="cuhk_sysu", root=root, images=images, queries=queries,
                       galleries=galleries, num_train_ids=num_train_ids)


def _warn_unexpected_variables(report: ValidationReport, path: Path, mat: dict[str, Any],
                               expected: set[str]) -> None:
    for name in sorted(set(mat) - expected):
        report.add("warning", path, "", f"unexpected variable {name!r} (ignored)")


def _read_images(root: Path, report: ValidationReport) -> tuple[list[str], list[np.ndarray]]:
    """``Img``: every image's name and its raw ``[x y w h]`` boxes (duplicates: first kept)."""
    path = root / IMAGES_MAT
    log.info("reading %s", path)
    with reading(path):
        mat = load_mat(path)
    _warn_unexpected_variables(report, path, mat, {"Img"})
    records = struct_records(get_variable(mat, "Img", path), path, "Img")
    if len(records) == 0:
        report.add("error", path, "Img", "no images listed (an empty Img struct array)",
                   fatal=True)
    imnames = struct_field(records, "imname", path, "Img")
    box_structs = struct_field(records, "box", path, "Img")
    n_appear = records["nAppear"] if "nAppear" in (records.dtype.names or ()) else None

    names: list[str] = []
    raw_boxes: list[np.ndarray] = []
    seen: set[str] = set()
    for i in range(len(records)):
        where = f"Img({i + 1})"
        name = as_str(imnames[i], path, f"{where}.imname")
        if name in seen:
            report.add("error", path, where, f"duplicate image name {name!r}: only the first "
                                             "entry is used")
            continue
        seen.add(name)
        boxes = struct_records(box_structs[i], path, f"{where}.box")
        locations = struct_field(boxes, "idlocate", path, f"{where}.box")
        raw = np.zeros((len(locations), 4), dtype=np.float64)
        valid = np.ones(len(locations), dtype=bool)
        for j, location in enumerate(locations):
            vector = as_vector(location, path, f"{where}.box({j + 1}).idlocate")
            if vector.size != 4:
                report.add("error", path, f"{where}.box({j + 1}).idlocate",
                           f"box should be [x y w h], got {vector.size} numbers (box dropped)")
                valid[j] = False
            elif not np.isfinite(vector).all():  # NaN/inf would reach roi_align
                report.add("error", path, f"{where}.box({j + 1}).idlocate",
                           f"non-finite box value in {vector.tolist()} (box dropped)")
                valid[j] = False
            else:
                raw[j] = vector
        if n_appear is not None and np.size(n_appear[i]) == 1 and int(n_appear[i]) != len(raw):
            report.add("warning", path, where, f"nAppear is {int(n_appear[i])} but "
                                               f"{len(raw)} boxes are listed")
        names.append(name)
        raw_boxes.append(raw[valid])
    return names, raw_boxes


def _read_pool(root: Path, report: ValidationReport, names: list[str]) -> np.ndarray:
    """Whether each image is a test (gallery pool) image; training = all images − pool."""
    path = root / POOL_MAT
    with reading(path):
        mat = load_mat(path)
    _warn_unexpected_variables(report, path, mat, {"pool"})
    pool = cell_strings(get_variable(mat, "pool", path), path, "pool")
    row_of = {name: i for i, name in enumerate(names)}
    is_test = np.zeros(len(names), dtype=bool)
    for k, name in enumerate(pool):
        row = row_of.get(name)
        if row is None:
            report.add("error", path, f"pool{{{k + 1}}}", f"test image {name!r} is not in "
                                                         f"{IMAGES_MAT} (ignored)")
            continue
        if is_test[row]:
            report.add("warning", path, f"pool{{{k + 1}}}", f"duplicate image name {name!r}")
        is_test[row] = True
    return is_test


def _clean_scenes(root: Path, report: ValidationReport, names: list[str],
                  raw_boxes: list[np.ndarray], is_test: np.ndarray, widths: np.ndarray,
                  heights: np.ndarray) -> _Scenes:
    """Convert and clip every box at once; report the dropped and clipped ones."""
    path = root / IMAGES_MAT
    counts = np.array([len(b) for b in raw_boxes], dtype=np.int64)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    raw = np.concatenate(raw_boxes) if raw_boxes else np.zeros((0, 4))
    image_of_box = np.repeat(np.arange(len(counts)), counts)
    cleaned = clean_boxes(raw, widths[image_of_box], heights[image_of_box])
    for flags, what in [(cleaned.zero_area, "zero-area box {box} in {name} (dropped)"),
                        (cleaned.outside, "box {box} lies outside the {size} image {name} "
                                          "(dropped)"),
                        (cleaned.clipped, "box {box} extends outside the {size} image {name} "
                                          "(clipped)")]:
        for b in np.flatnonzero(flags):
            i = image_of_box[b]
            report.add("warning", path, f"Img({i + 1}).box({b - offsets[i] + 1})",
                       what.format(box=raw[b].tolist(), name=names[i],
                                   size=f"{widths[i]}x{heights[i]}"))
    return _Scenes(names=names, row_of={n: i for i, n in enumerate(names)}, is_test=is_test,
                   widths=widths, heights=heights, offsets=offsets, raw=raw, keep=cleaned.keep,
                   xyxy=cleaned.xyxy, pids=np.full(len(raw), -1, dtype=np.int32))


def _identity_items(value: Any, path: Path) -> list[Any]:
    """``Train`` is an N×1 cell of 1×1 structs; accept a plain struct array too."""
    if isinstance(value, np.ndarray) and value.dtype.names is not None:
        return list(struct_records(value, path, "Train"))
    return cell_items(value, path, "Train")


def _assign_train_ids(root: Path, report: ValidationReport, scenes: _Scenes) -> int:
    """Label each ``Train`` identity's boxes 0..K-1 in file order; returns K."""
    path = root / TRAIN_MAT
    log.info("reading %s", path)
    with reading(path):
        mat = load_mat(path)
    _warn_unexpected_variables(report, path, mat, {"Train"})
    identities = _identity_items(get_variable(mat, "Train", path), path)
    next_id = 0
    for k, identity in enumerate(identities):
        where = f"Train{{{k + 1}}}"
        idname = as_str(record_field(identity, "idname", path, where), path, f"{where}.idname")
        scene = struct_records(record_field(identity, "scene", path, where), path,
                               f"{where}.scene")
        imnames = struct_field(scene, "imname", path, f"{where}.scene")
        locations = struct_field(scene, "idlocate", path, f"{where}.scene")
        matched: list[int] = []
        for s in range(len(scene)):
            at = f"{where}.scene({s + 1})"
            name = as_str(imnames[s], path, f"{at}.imname")
            box = as_vector(locations[s], path, f"{at}.idlocate")
            row = scenes.row_of.get(name)
            if row is None:
                report.add("warning", path, at, f"{idname}: image {name!r} is not in "
                                                f"{IMAGES_MAT} (sighting ignored)")
                continue
            if scenes.is_test[row]:
                report.add("warning", path, at, f"{idname}: image {name!r} is a test (pool) "
                                                "image (sighting ignored)")
                continue
            if box.size != 4:
                report.add("warning", path, at, f"{idname}: idlocate should be [x y w h], got "
                                                f"{box.size} numbers (sighting ignored)")
                continue
            if not np.isfinite(box).all():
                report.add("warning", path, at, f"{idname}: non-finite idlocate {box.tolist()} "
                                                "(sighting ignored)")
                continue
            b = scenes.find_box(row, box)
            if b < 0:
                report.add("warning", path, at, f"{idname}: box {box.tolist()} matches no "
                                                f"annotated box of {name} (sighting ignored)")
                continue
            matched.append(b)
        if not matched:
            report.add("warning", path, where, f"training identity {idname} has no usable box "
                                               "(identity skipped)")
            continue
        for b in matched:
            current = scenes.pids[b]
            if current >= 0 and current != next_id:
                report.add("warning", path, where, f"{idname}: a box already belongs to "
                                                   f"training identity {current} (kept there)")
            else:
                scenes.pids[b] = next_id
        next_id += 1
    return next_id


@dataclass
class _Protocol:
    size: int
    file: Path
    query_rows: np.ndarray  # int64 [Q]
    query_raw: np.ndarray  # float64 [Q, 4] x y w h as annotated
    query_pids: np.ndarray  # int32 [Q]
    gallery: GalleryProtocol


def _read_protocols(root: Path, report: ValidationReport,
                    scenes: _Scenes) -> tuple[QueryTable, dict[int, GalleryProtocol]]:
    files = protocol_files(root)
    if not files:
        raise DatasetError(root / PROTOCOL_DIR, "no TestG<size>.mat protocol file found")
    galleries: dict[int, GalleryProtocol] = {}
    reference: _Protocol | None = None
    for file in _query_list_first(files):
        log.info("reading %s", file)
        with reading(file):  # a folder or a symlink loop named TestG<size>.mat, ...
            protocol = _read_protocol(file, report, scenes)
        if reference is None:
            reference = protocol
        else:
            _check_same_queries(reference, protocol)
        if protocol.size in galleries:
            raise DatasetError(file, f"a second TestG{protocol.size} protocol")
        galleries[protocol.size] = protocol.gallery

    queries = QueryTable(
        image_index=reference.query_rows,
        box=np.stack([_clean_box(scenes, r, b) for r, b in
                      zip(reference.query_rows, reference.query_raw)]).astype(np.float32)
        if len(reference.query_rows) else np.zeros((0, 4), np.float32),
        pid=reference.query_pids,
    )
    return queries, dict(sorted(galleries.items()))


def _clean_box(scenes: _Scenes, row: int, box_xywh: np.ndarray) -> np.ndarray:
    """One ``[x y w h]`` box of image ``row`` as a clipped ``[x1 y1 x2 y2]``."""
    return clean_boxes(box_xywh, int(scenes.widths[row]), int(scenes.heights[row])).xyxy[0]


def _protocol_variable(file: Path, report: ValidationReport) -> tuple[str, int]:
    """The file's ``TestG<size>`` variable and its size (from the variable's name)."""
    variables = mat_variable_names(file)
    matching = [name for name in variables if PROTOCOL_VARIABLE.match(name)]
    if len(matching) != 1:
        found = ", ".join(sorted(variables)) or "none"
        raise DatasetError(file, f"expected one variable TestG<size> (variables found: {found})")
    name = matching[0]
    for unexpected in sorted(set(variables) - {name}):
        report.add("warning", file, "", f"unexpected variable {unexpected!r} (ignored)")
    if name != file.stem:
        report.add("warning", file, "", f"file holds variable {name!r}; its size is used")
    return name, int(PROTOCOL_VARIABLE.match(name).group(1))


def _read_protocol(file: Path, report: ValidationReport, scenes: _Scenes) -> _Protocol:
    variable, size = _protocol_variable(file, report)
    num_queries, elements = iter_struct_array(file, variable)

    query_rows = np.zeros(num_queries, dtype=np.int64)
    query_raw = np.zeros((num_queries, 4), dtype=np.float64)
    query_pids = np.zeros(num_queries, dtype=np.int32)
    image_index = np.zeros((num_queries, size), dtype=np.int64)
    pos_query: list[int] = []
    pos_image: list[int] = []
    pos_box: list[np.ndarray] = []
    row_of = scenes.row_of

    for q, element in enumerate(elements):
        where = f"{variable}({q + 1})"
        if (q + 1) % 500 == 0:
            log.info("%s: %d/%d queries", file.name, q + 1, num_queries)
        for field_name in ("Query", "Gallery"):
            if field_name not in element:
                raise DatasetError(file, f"{where} has no field {field_name!r} (fields found: "
                                         f"{', '.join(element)})")
        row, box, pid = _read_query(file, where, element["Query"], row_of)
        query_rows[q], query_raw[q], query_pids[q] = row, box, pid
        _label_test_box(report, file, f"{where}.Query", scenes, row, box, pid, "query")

        image_index[q], positives = _read_gallery(file, where, element["Gallery"], size,
                                                  row_of, report)
        for g, gallery_box in positives:
            gallery_row = int(image_index[q, g])
            pos_query.append(q)
            pos_image.append(gallery_row)
            pos_box.append(_clean_box(scenes, gallery_row, gallery_box))
            _label_test_box(report, file, f"{where}.Gallery({g + 1})", scenes, gallery_row,
                            gallery_box, pid, "gallery positive")

    gallery_protocol = GalleryProtocol(
        size=size,
        image_index=image_index,
        positive_query=np.asarray(pos_query, dtype=np.int64),
        positive_image=np.asarray(pos_image, dtype=np.int64),
        positive_box=(np.stack(pos_box).astype(np.float32) if pos_box
                      else np.zeros((0, 4), np.float32)),
    )
    return _Protocol(size=size, file=file, query_rows=query_rows, query_raw=query_raw,
                     query_pids=query_pids, gallery=gallery_protocol)


def _read_query(file: Path, where: str, query: Any,
                row_of: dict[str, int]) -> tuple[int, np.ndarray, int]:
    """A protocol's ``Query``: its image row, raw ``[x y w h]`` box and test pid."""
    where = f"{where}.Query"
    name = as_str(record_field(query, "imname", file, where), file, f"{where}.imname")
    box = as_vector(record_field(query, "idlocate", file, where), file, f"{where}.idlocate")
    idname = as_str(record_field(query, "idname", file, where), file, f"{where}.idname")
    pid_match = TEST_PID.match(idname.strip())
    if pid_match is None:
        raise DatasetError(file, f"{where}.idname: expected 'p<number>', got {idname!r}")
    if box.size != 4:
        raise DatasetError(file, f"{where}.idlocate: expected [x y w h], got {box.size} "
                                 "numbers")
    if not np.isfinite(box).all():  # a query cannot be dropped: the protocols share the list
        raise DatasetError(file, f"{where}.idlocate: non-finite box value in {box.tolist()}")
    row = row_of.get(name)
    if row is None:
        raise DatasetError(file, f"{where}.imname: image {name!r} is not in {IMAGES_MAT}")
    return row, box, int(pid_match.group(1))


def _read_gallery(file: Path, where: str, gallery: Any, size: int, row_of: dict[str, int],
                  report: ValidationReport) -> tuple[list[int], list[tuple[int, np.ndarray]]]:
    """A protocol's ``Gallery``: the image rows of its ``size`` entries, and the entries that
    show the query person (index, raw ``[x y w h]`` box)."""
    where = f"{where}.Gallery"
    records = struct_records(gallery, file, where)
    if len(records) != size:
        raise DatasetError(file, f"{where} has {len(records)} entries, expected {size}")
    names = struct_field(records, "imname", file, where)
    rows = [row_of.get(n, -1) if type(n) is str else  # the fast path: squeeze_me gives str
            row_of.get(as_str(n, file, f"{where}.imname"), -1) for n in names]
    if min(rows, default=0) < 0:
        missing = names[rows.index(-1)]
        raise DatasetError(file, f"{where}: image {missing!r} is not in {IMAGES_MAT}")
    locations = struct_field(records, "idlocate", file, where)
    positives = []
    # An empty idlocate (1x0 or 0x0 in the file) marks a negative gallery image.
    for g in [g for g, loc in enumerate(locations) if not isinstance(loc, np.ndarray)
              or loc.size]:
        box = as_vector(locations[g], file, f"{where}({g + 1}).idlocate")
        if box.size != 4:
            report.add("error", file, f"{where}({g + 1})", f"idlocate should be [x y w h] or "
                                                           f"empty, got {box.size} numbers "
                                                           "(positive ignored)")
            continue
        if not np.isfinite(box).all():
            report.add("error", file, f"{where}({g + 1})", f"non-finite idlocate value in "
                                                           f"{box.tolist()} (positive ignored)")
            continue
        positives.append((g, box))
    return rows, positives


def _label_test_box(report: ValidationReport, file: Path, where: str, scenes: _Scenes, row: int,
                    box_xywh: np.ndarray, pid: int, what: str) -> None:
    """Give the ``Img`` box that is ``box_xywh`` the test identity ``pid``."""
    name = scenes.names[row]
    if not scenes.is_test[row]:
        report.add("warning", file, where, f"{what} image {name} is not a test (pool) image")
        return
    b = scenes.find_box(row, box_xywh)
    if b < 0:
        report.add("warning", file, where, f"{what} box {box_xywh.tolist()} matches no "
                                           f"annotated box of {name}")
        return
    current = scenes.pids[b]
    if current >= 0 and current != pid:
        report.add("warning", file, where, f"{what} box in {name} is already identity "
                                           f"{current}, not {pid} (kept {current})")
        return
    scenes.pids[b] = pid


def _check_same_queries(reference: _Protocol, other: _Protocol) -> None:
    """All protocols share one query list (same order, images and boxes)."""
    if len(other.query_rows) != len(reference.query_rows):
        raise DatasetError(other.file, f"{len(other.query_rows)} queries, but "
                                       f"{reference.file.name} has {len(reference.query_rows)}")
    differs = ((other.query_rows != reference.query_rows)
               | np.any(other.query_raw != reference.query_raw, axis=1)
               | (other.query_pids != reference.query_pids))
    if differs.any():
        q = int(np.flatnonzero(differs)[0])
        raise DatasetError(other.file, f"query {q + 1} differs from query {q + 1} of "
                                       f"{reference.file.name} (the protocols must share one "
                                       "query list)")
