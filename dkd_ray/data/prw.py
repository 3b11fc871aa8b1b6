"""PRW as it unpacks (docs/DATASETS.md): one ``annotations/<frame>.jpg.mat`` per frame, the frame lists
``frame_train.mat`` / ``frame_test.mat`` and ``query_info.txt``, into
:class:`~dkd_ray.data.annotations.Annotations`.

``box_rule`` says how the ``[x y w h]`` boxes become ``[x1 y1 x2 y2]``:
- ``exact`` (the default, the correct reading): sub-pixel, clipped to the frame after
  converting, zero-area boxes dropped (:func:`~dkd_ray.data.annotations.clean_boxes`);
- ``seqnet``: as SeqNet's ``datasets/prw.py`` (and COAT, which reuses it) reads them, to compare
  with their published tables. Annotated boxes: ``x y w h`` clamped at 0, then ``x2 = x + w``,
  ``y2 = y + h``, truncated to integers; queries: ``x + w``, ``y + h`` first, truncated, then
  clamped at 0. Never clipped to the frame's width/height; zero-area boxes are kept, except in
  the training split, where the student could not train on them (dropped, with a warning).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .annotations import (
    BOX_RULES,
    Annotations,
    ImageTable,
    QueryTable,
    clean_boxes,
    image_table,
    match_box,
)
from .matlab import DatasetError, as_matrix, cell_strings, get_variable, load_mat
from .image_sizes import read_image_sizes
from .report import SYNTHETIC_SIZES_FILE, ValidationReport, path_problem, reading

log = logging.getLogger(__name__)

FRAME_DIR = "frames"
ANNOTATION_DIR = "annotations"
FRAME_LISTS = (("train", "frame_train.mat", "img_index_train"),
               ("test", "frame_test.mat", "img_index_test"))
QUERY_FILE = "query_info.txt"
BOX_KEYS = ("box_new", "anno_file", "anno_previous")  # in order of preference
UNLABELLED_PID = -2  # PRW's own marker; -1 internally
CAMERA = re.compile(r"c(\d)")


def source_files(root: Path) -> list[str]:
    """The files the annotations are built from, relative to ``root`` (the cache key hashes
    the content of those present). Plain strings: PRW has ~12k of them, and pathlib objects
    would cost more than the whole cached load."""
    files = [name for _, name, _ in FRAME_LISTS] + [QUERY_FILE, SYNTHETIC_SIZES_FILE]
    try:
        names = os.listdir(os.path.join(root, ANNOTATION_DIR))
    except OSError:
        names = []
    return files + [f"{ANNOTATION_DIR}/{n}" for n in sorted(names) if n.endswith(".mat")]


def camera_of(name: str) -> int:
    """The camera number: the digit after 'c' in e.g. 'c1s1_000151.jpg'; -1 if none."""
    match = CAMERA.match(name) or CAMERA.search(name)
    return int(match.group(1)) if match else -1


def parse_prw(root: str | Path, *, report: ValidationReport | None = None,
              strict: bool = True, box_rule: str = "exact") -> Annotations:
    """Read a PRW folder. Problems go to ``report``; with ``strict`` a structural problem raises
    :class:`DatasetError` (otherwise the best possible annotations come back). ``box_rule``:
    ``exact`` | ``seqnet`` (module docstring)."""
    if box_rule not in BOX_RULES:
        raise ValueError(f"unknown box_rule {box_rule!r}; expected one of {BOX_RULES}")
    root = Path(root)
    own_report = report is None
    report = report if report is not None else ValidationReport("prw", root)

    names, splits = _read_frame_lists(root, report)
    paths = [f"{FRAME_DIR}/{name}" for name in names]
    log.info("reading %d frame headers under %s", len(paths), root / FRAME_DIR)
    widths, heights = read_image_sizes(root, paths, report)

    is_train_frame = np.asarray(splits, dtype=object) == "train"
    boxes = _read_boxes(root, report, names, widths, heights, is_train_frame, box_rule)
    is_train = is_train_frame[boxes.frame]
    pids, num_train_ids = _relabel_train_ids(boxes.pids, is_train)
    images = image_table(
        name=names,
        path=paths,
        split=splits,
        width=widths,
        height=heights,
        camera=_cameras(root, report, names),
        box_counts=np.bincount(boxes.frame, minlength=len(names)),
        boxes=boxes.xyxy,
        pids=pids,
    )
    queries = _read_queries(root, report, images, boxes.raw, box_rule)
    if strict:
        report.raise_if_fatal()
    if own_report:
        report.log_summary(log)
    return Annotations(dataset="prw", root=root, images=images, queries=queries,
                       num_train_ids=num_train_ids)


def _read_frame_lists(root: Path, report: ValidationReport) -> tuple[list[str], list[str]]:
    """Frame names (with '.jpg') and their split, train frames first, in file order."""
    names: list[str] = []
    splits: list[str] = []
    split_of: dict[str, str] = {}
    for split, file_name, variable in FRAME_LISTS:
        path = root / file_name
        with reading(path):
            mat = load_mat(path)
        for unexpected in sorted(set(mat) - {variable}):
            report.add("warning", path, "", f"unexpected variable {unexpected!r} (ignored)")
        for k, stem in enumerate(cell_strings(get_variable(mat, variable, path), path, variable)):
            name = stem.strip()
            name = name if name.lower().endswith(".jpg") else f"{name}.jpg"
            if name in split_of:
                report.add("error", path, f"{variable}{{{k + 1}}}",
                           f"duplicate frame {name!r} (already a {split_of[name]} frame; "
                           "this entry is ignored)")
                continue
            split_of[name] = split
            names.append(name)
            splits.append(split)
    if not names:
        report.add("error", root / FRAME_LISTS[0][1], FRAME_LISTS[0][2],
                   f"no frames listed (neither {FRAME_LISTS[0][1]} nor {FRAME_LISTS[1][1]} "
                   "lists one)", fatal=True)
    return names, splits


@dataclass
class _Boxes:
    """Every kept box of the dataset, frame by frame."""

    frame: np.ndarray  # int64 [B], the frame's row
    raw: np.ndarray  # float64 [B, 4] x y w h as annotated (to match the queries)
    xyxy: np.ndarray  # float32 [B, 4] converted (and clipped, box_rule exact)
    pids: np.ndarray  # int32 [B], -1 unlabelled, PRW's own ids otherwise


def _read_boxes(root: Path, report: ValidationReport, names: list[str], widths: np.ndarray,
                heights: np.ndarray, is_train_frame: np.ndarray, box_rule: str) -> _Boxes:
    """Read every frame's annotation file, then convert, clip and check all boxes at once."""
    log.info("reading %d annotation files under %s", len(names), root / ANNOTATION_DIR)
    folder = path_problem(root / ANNOTATION_DIR, folder=True) if names else None
    if folder is not None:  # one error, not one per frame
        report.add("error", folder[0], "", f"{folder[1]} (it should hold the {len(names)} "
                                           "frames' <frame>.jpg.mat files)", fatal=True)
        names_to_read: list[str] = []
    else:
        names_to_read = names
    matrices, keys = zip(*(_read_frame(root, report, name) for name in names_to_read)) \
        if names_to_read else ((np.zeros((0, 5)),) * len(names), ("",) * len(names))
    counts = np.array([len(m) for m in matrices], dtype=np.int64)
    rows = np.concatenate(matrices) if matrices else np.zeros((0, 5))
    frame_of_row = np.repeat(np.arange(len(names)), counts)
    row_in_frame = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)

    def where(b: int) -> tuple[Path, str]:
        frame = frame_of_row[b]
        return (root / ANNOTATION_DIR / f"{names[frame]}.mat",
                f"{keys[frame]} row {row_in_frame[b] + 1}")

    # Non-finite coordinates would reach roi_align (NaN boxes crash it): dropped here, before
    # either box rule sees them. ``where`` reads the filtered arrays from here on.
    finite = np.isfinite(rows[:, 1:5]).all(axis=1)
    for b in np.flatnonzero(~finite):
        report.add("error", *where(b), f"non-finite box value in {rows[b, 1:5].tolist()} "
                                       "(box dropped)")
    if not finite.all():
        rows, frame_of_row, row_in_frame = rows[finite], frame_of_row[finite], row_in_frame[finite]
    pids = _read_pids(rows[:, 0], report, where)
    raw = rows[:, 1:5]
    if box_rule == "seqnet":
        keep, xyxy = _seqnet_boxes(raw, report, where, widths[frame_of_row],
                                   heights[frame_of_row], is_train_frame[frame_of_row])
        return _Boxes(frame=frame_of_row[keep], raw=raw[keep], xyxy=xyxy[keep], pids=pids[keep])
    cleaned = clean_boxes(raw, widths[frame_of_row], heights[frame_of_row])
    for flags, what in [(cleaned.zero_area, "zero-area box {box} (dropped)"),
                        (cleaned.outside, "box {box} lies outside the {size} frame (dropped)"),
                        (cleaned.clipped, "box {box} extends outside the {size} frame "
                                          "(clipped)")]:
        for b in np.flatnonzero(flags):
            frame = frame_of_row[b]
            report.add("warning", *where(b), what.format(
                box=raw[b].tolist(), size=f"{widths[frame]}x{heights[frame]}"))
    keep = cleaned.keep
    return _Boxes(frame=frame_of_row[keep], raw=raw[keep], xyxy=cleaned.xyxy[keep],
                  pids=pids[keep])


def seqnet_xyxy(xywh: np.ndarray) -> np.ndarray:
    """SeqNet's reading of annotated ``[x y w h]`` boxes [n, 4]: each of x, y, w, h clamped at 0,
    then w, h added, then truncated to integer pixels (float32 [n, 4]; not clipped to the frame;
    zero-area boxes stay)."""
    xywh = np.clip(np.asarray(xywh, dtype=np.float64).reshape(-1, 4), 0.0, None)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return np.trunc(xyxy).astype(np.float32)


def seqnet_query_xyxy(xywh: np.ndarray) -> np.ndarray:
    """SeqNet's reading of a ``query_info.txt`` box ``[x y w h]``: ``[x, y, x + w, y + h]``
    truncated to integers (toward zero), then clamped at 0 (float32 [4])."""
    x, y, w, h = np.asarray(xywh, dtype=np.float64).reshape(4)
    return (np.clip(np.trunc([x, y, x + w, y + h]), 0.0, None) + 0.0).astype(np.float32)


def _seqnet_boxes(raw: np.ndarray, report: ValidationReport,
                  where: Callable[[int], tuple[Path, str]], widths: np.ndarray,
                  heights: np.ndarray, is_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``box_rule="seqnet"``: (which boxes to keep, their boxes). Zero-area boxes are kept in
    the test split (as SeqNet does) and dropped from the training split (the student refuses
    them); boxes past the frame are clamped at 0 only. All are reported."""
    xyxy = seqnet_xyxy(raw)
    no_area = ~((xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1]))
    known = (widths > 0) & (heights > 0)
    past_frame = known & ~no_area & ((xyxy[:, 2] > widths) | (xyxy[:, 3] > heights)
                                     | np.any(raw[:, :2] < 0, axis=1))
    for flags, what in [
        (no_area & is_train, "zero-area box {box} -> {xyxy} under box_rule=seqnet (dropped from "
                             "the training split)"),
        (no_area & ~is_train, "zero-area box {box} -> {xyxy} (kept: box_rule=seqnet)"),
        (past_frame, "box {box} -> {xyxy} extends outside the {size} frame (box_rule=seqnet: "
                     "clamped at 0, not clipped to the frame)"),
    ]:
        for b in np.flatnonzero(flags):
            report.add("warning", *where(b), what.format(
                box=raw[b].tolist(), xyxy=xyxy[b].astype(int).tolist(),
                size=f"{widths[b]}x{heights[b]}"))
    return ~(no_area & is_train), xyxy


def _cameras(root: Path, report: ValidationReport, names: list[str]) -> np.ndarray:
    cameras = np.array([camera_of(name) for name in names], dtype=np.int16)
    for i in np.flatnonzero(cameras < 0):
        report.add("warning", root / FRAME_DIR / names[i], "", "no camera id 'c<digit>' in the "
                                                              "frame name (camera -1)")
    return cameras


def _read_frame(root: Path, report: ValidationReport, name: str) -> tuple[np.ndarray, str]:
    """One frame's ``M×5`` ``[pid x y w h]`` matrix and the key it was under (empty on error)."""
    path = root / ANNOTATION_DIR / f"{name}.mat"
    empty = (np.zeros((0, 5)), "")
    try:
        with reading(path):
            mat = load_mat(path)
    except DatasetError as exc:
        report.add("error", exc.file, "", exc.message, fatal=True)
        return empty
    key = next((k for k in BOX_KEYS if k in mat), None)
    if key is None:
        found = ", ".join(sorted(mat)) or "none"
        report.add("error", path, "", f"no box matrix under {' / '.join(BOX_KEYS)} "
                                      f"(keys found: {found})", fatal=True)
        return empty
    for unknown in sorted(set(mat) - set(BOX_KEYS)):
        report.add("warning", path, "", f"unknown key {unknown!r} (ignored; boxes read from "
                                        f"{key!r})")
    try:
        return as_matrix(mat[key], 5, path, key), key
    except DatasetError as exc:
        report.add("error", path, "", exc.message, fatal=True)
        return empty


def _read_pids(raw_pids: np.ndarray, report: ValidationReport,
               where: Callable[[int], tuple[Path, str]]) -> np.ndarray:
    """PRW's ids as int32: -2 (unlabelled) -> -1; anything that is not an id is reported."""
    pids = np.where(raw_pids == UNLABELLED_PID, -1, raw_pids)
    with np.errstate(invalid="ignore"):
        bad = ((pids < 0) & (pids != -1)) | (pids != np.round(pids)) | ~np.isfinite(pids)
    for b in np.flatnonzero(bad):
        report.add("warning", *where(b), f"person id {raw_pids[b]:g} is not an id or -2 (read "
                                         "as unlabelled)")
    pids[bad] = -1
    return pids.astype(np.int32)


def _relabel_train_ids(pids: np.ndarray, is_train: np.ndarray) -> tuple[np.ndarray, int]:
    """Training ids (not contiguous in PRW) -> 0..K-1 in order of the original id; test boxes
    keep their own ids. Returns the new pids and K."""
    labelled_train = is_train & (pids >= 0)
    original = np.unique(pids[labelled_train])
    pids = pids.copy()
    pids[labelled_train] = np.searchsorted(original, pids[labelled_train])
    return pids, len(original)


def _read_queries(root: Path, report: ValidationReport, images: ImageTable,
                  raw_boxes: np.ndarray, box_rule: str = "exact") -> QueryTable:
    """``query_info.txt``: "pid x y w h frame" a line; each box is matched to its frame's boxes."""
    path = root / QUERY_FILE
    problem = path_problem(path)
    if problem is not None:
        raise DatasetError(*problem)
    row_of = {name: i for i, name in enumerate(images.name)}
    rows, boxes, query_pids = [], [], []
    with reading(path), open(path, encoding="utf-8", errors="replace") as lines:
        for line_number, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"line {line_number}"
            try:
                if len(fields) != 6:
                    raise ValueError(f"{len(fields)} fields")
                values = np.array([float(v) for v in fields[:5]])
            except ValueError as exc:
                report.add("error", path, where, f"expected 'pid x y w h frame', got "
                                                 f"{line.strip()!r} ({exc})", fatal=True)
                continue
            if not np.isfinite(values).all():  # a NaN query box crashes roi_align in training
                report.add("error", path, where, f"non-finite value in {line.strip()!r} "
                                                 "(query refused)", fatal=True)
                continue
            pid, xywh = int(values[0]), values[1:5]
            name = fields[5] if fields[5].lower().endswith(".jpg") else f"{fields[5]}.jpg"
            row = row_of.get(name)
            if row is None:
                report.add("error", path, where, f"query frame {name!r} is not in the frame "
                                                 "lists (query ignored)")
                continue
            if images.split[row] != "test":
                report.add("warning", path, where, f"query frame {name} is a training frame")
            j = match_box(raw_boxes[images.box_offsets[row]:images.box_offsets[row + 1]], xywh)
            if j < 0:
                report.add("warning", path, where, f"query box {xywh.tolist()} of person {pid} "
                                                   f"matches no annotated box of {name}")
            elif images.pids_of(row)[j] != pid and images.split[row] == "test":
                report.add("warning", path, where, f"query box of person {pid} matches a box "
                                                   f"of person {images.pids_of(row)[j]} in {name}")
            if box_rule == "seqnet":
                boxes.append(seqnet_query_xyxy(xywh))
            else:
                boxes.append(clean_boxes(xywh, int(images.width[row]),
                                         int(images.height[row])).xyxy[0])
            rows.append(row)
            query_pids.append(pid)
    return QueryTable(
        image_index=np.asarray(rows, dtype=np.int64),
        box=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        pid=np.asarray(query_pids, dtype=np.int32),
    )
