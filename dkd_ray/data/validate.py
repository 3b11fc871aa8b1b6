"""Find every problem in a dataset folder before training starts.

The readers record what they see while parsing (zero-area and out-of-image boxes, queries that
match no box, unknown keys, duplicate names, missing images) into a :class:`ValidationReport`;
:func:`validate_dataset` adds a full decode of every image. Severity ``error`` means training
or evaluation would fail or silently lose data; ``warning`` means the readers repaired it (a box
dropped or clipped, a grayscale JPEG converted to RGB). On top of the readers' checks, a
dataset that parses but cannot train or be evaluated is an error too (:func:`check_usable`): no
images, no training identity (K = 0), too few identities for the teacher's P×K batch, no
queries, no query with a gallery match.
"""


from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .annotations import DATASETS, Annotations
from .image_sizes import UNREADABLE_FOLDER, UNREADABLE_IMAGE, unreadable_folders
from .matlab import DatasetError
from .report import SYNTHETIC_SIZES_FILE, Problem, Progress, ValidationReport  # noqa: F401 (re-exported)
from .report import describe_os_error

# The least for which a batch-hard triplet exists: an anchor, another box of its person, and a
# box of another person (who needs a second box to be an anchor too).
MIN_IDENTITIES = 2
MIN_BOXES_PER_IDENTITY = 2


def check_image_decoding(root: Path, rel_paths: Sequence[str], report: ValidationReport, *,
                         workers: int | None = None, progress: Progress | None = None) -> None:
    """Decode every image: missing, undecodable or truncated is an error, a mode other than RGB
    a warning (the training loader converts to RGB)."""
    from PIL import Image

    root = Path(root)
    workers = workers or os.cpu_count() or 1
    # the readers already reported missing images, unreadable headers and image folders
    already_reported = {p.file for p in report.problems if p.message.startswith(
        ("missing image", "image does not decode", UNREADABLE_IMAGE))}
    bad_folders = unreadable_folders(root, rel_paths)
    if bad_folders:
        rel_paths = [rel for rel in rel_paths if rel.rpartition("/")[0] not in bad_folders]
        if not any(p.message.startswith(UNREADABLE_FOLDER) for p in report.problems):
            for blame, reason in bad_folders.values():
                report.add("error", blame, "", f"{UNREADABLE_FOLDER}: {reason}")

    def decode(rel: str) -> tuple[str, str] | None:
        try:
            with Image.open(root / rel) as image:
                mode, (w, h) = image.mode, image.size
                # A reduced-scale (DCT) decode still reads every byte of the entropy-coded
                # data, so truncation and corruption are found at a fraction of the cost.
                image.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                image.load()
        except FileNotFoundError:
            return "error", "missing image file"
        except OSError as exc:
            if exc.errno is not None:  # the file system's (a loop, a folder, no permission)
                return "error", f"{UNREADABLE_IMAGE}: {describe_os_error(exc)}"
            return "error", f"image does not decode: {type(exc).__name__}: {exc}"
        except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return "error", f"image does not decode: {type(exc).__name__}: {exc}"
        if mode != "RGB":
            return "warning", f"image mode is {mode}, not RGB (the loader converts it to RGB)"
        return None

    total = len(rel_paths)
    step = max(1, total // 20)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, result in enumerate(pool.map(decode, rel_paths)):
            if result is not None and rel_paths[i] not in already_reported:
                report.add(result[0], root / rel_paths[i], "", result[1])
            if progress and ((i + 1) % step == 0 or i + 1 == total):
                progress("decoding images", i + 1, total)


# --- The whole dataset --------------------------------------------------------------------------

def summarize(annotations: Annotations) -> dict[str, Any]:
    """Counts per split: images, boxes, labelled boxes, identities; queries; protocols."""
    images = annotations.images
    box_split = np.repeat(images.split, np.diff(images.box_offsets))
    summary: dict[str, Any] = {}
    for split in ("train", "test"):
        in_split = box_split == split
        pids = images.pids[in_split]
        summary[f"{split} images"] = int(np.sum(images.split == split))
        summary[f"{split} boxes"] = int(in_split.sum())
        summary[f"{split} labelled boxes"] = int(np.sum(pids >= 0))
        summary[f"{split} identities"] = int(len(np.unique(pids[pids >= 0])))
    summary["training identities (K)"] = annotations.num_train_ids
    summary["queries"] = len(annotations.queries)
    if annotations.galleries:
        summary["gallery protocols"] = ", ".join(
            f"TestG{size}" for size in sorted(annotations.galleries))
    cameras = np.unique(images.camera[images.camera >= 0])
    if len(cameras):
        summary["cameras"] = ", ".join(str(c) for c in cameras)
    return summary


def validate_dataset(dataset: str, root: str | Path, *, check_images: bool = True,
                     workers: int | None = None, progress: Progress | None = None,
                     box_rule: str = "exact", min_identities: int = MIN_IDENTITIES,
                     min_boxes_per_identity: int = MIN_BOXES_PER_IDENTITY) -> ValidationReport:
    """Parse ``root`` as ``dataset`` and decode its images, collecting every problem.
    ``box_rule`` (``data.box_rule``): how PRW boxes are read; CUHK-SYSU ignores it.
    ``min_identities``: the teacher's P×K batch needs this many training identities with at
    least ``min_boxes_per_identity`` boxes each (training passes ``teacher.p_identities``; the
    default, 2 with 2 boxes, is the least for which a batch-hard triplet exists; 0 skips it)."""
    from . import cuhk_sysu, prw  # the readers import ValidationReport from here

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if min_identities < 0 or min_boxes_per_identity < 1:
        raise ValueError(f"min_identities must be >= 0 and min_boxes_per_identity >= 1, got "
                         f"{min_identities} and {min_boxes_per_identity}")
    root = Path(root)
    report = ValidationReport(dataset=dataset, root=root)
    parse = {"cuhk_sysu": cuhk_sysu.parse_cuhk_sysu, "prw": prw.parse_prw}[dataset]
    if progress:
        progress("reading annotations", 0, 1)
    try:
        if dataset == "prw":
            annotations = parse(root, report=report, strict=False, box_rule=box_rule)
        else:
            annotations = parse(root, report=report, strict=False)
    except DatasetError as exc:
        report.add_dataset_error(exc)
        return report
    except OSError as exc:  # a folder shape the readers did not foresee: still no traceback
        report.add("error", exc.filename or root, "", describe_os_error(exc), fatal=True)
        return report
    if progress:
        progress("reading annotations", 1, 1)
    report.summary = summarize(annotations)
    if not any(p.fatal for p in report.problems):  # else mostly consequences of the fatal ones
        check_usable(annotations, report, min_identities=min_identities,
                     min_boxes_per_identity=min_boxes_per_identity)
    if check_images:
        check_image_decoding(root, list(annotations.images.path), report, workers=workers,
                             progress=progress)
    return report


def check_usable(annotations: Annotations, report: ValidationReport, *,
                 min_identities: int = MIN_IDENTITIES,
                 min_boxes_per_identity: int = MIN_BOXES_PER_IDENTITY) -> None:
    """Errors for annotations that parse but cannot train or be evaluated, each naming the file
    (and variable) that should have held what is missing. Annotations without any image are
    already refused by the readers (a fatal error), so they are not reported again."""
    from . import cuhk_sysu, prw

    root, images = annotations.root, annotations.images
    if len(images) == 0:
        return
    cuhk = annotations.dataset == "cuhk_sysu"
    if cuhk:
        identity_file, identity_where = root / cuhk_sysu.TRAIN_MAT, "Train"
    else:
        identity_file, identity_where = root / prw.FRAME_LISTS[0][1], prw.FRAME_LISTS[0][2]
    box_split = np.repeat(images.split, np.diff(images.box_offsets))
    train_pids = images.pids[(box_split == "train") & (images.pids >= 0)]
    train_images = int(np.sum(images.split == "train"))
    if annotations.num_train_ids == 0 or len(train_pids) == 0:
        source = ("no identity of Train matches a kept box of a training image" if cuhk else
                  f"no annotation file of the {train_images} training frames has a labelled "
                  "box (person id >= 0)")
        report.add("error", identity_file, identity_where,
                   f"K = 0 training identities: {source}; the teacher cannot train")
    elif min_identities > 0:
        boxes_per_identity = np.bincount(train_pids)
        enough = int(np.sum(boxes_per_identity >= min_boxes_per_identity))
        if enough < min_identities:
            report.add("error", identity_file, identity_where,
                       f"only {enough} of the K = {annotations.num_train_ids} training identities "
                       f"have >= {min_boxes_per_identity} boxes; the teacher's P×K batch "
                       f"(batch-hard triplets) needs {min_identities} such identities")

    if cuhk:
        query_file = cuhk_sysu.query_list_file(root)
        query_where = query_file.stem if query_file is not None else ""
        query_file = query_file or root / cuhk_sysu.PROTOCOL_DIR
    else:
        query_file, query_where = root / prw.QUERY_FILE, ""
    num_queries = len(annotations.queries)
    if num_queries == 0:
        report.add("error", query_file, query_where, "no queries: search cannot be evaluated")
        return
    if cuhk:
        for size, protocol in annotations.galleries.items():
            if len(protocol.positive_query) == 0:
                file = root / cuhk_sysu.PROTOCOL_DIR / f"TestG{size}.mat"
                report.add("error", file, f"TestG{size}",
                           f"none of the {num_queries} queries has a gallery positive (every "
                           "Gallery idlocate is empty): search cannot be evaluated")
    elif not _any_prw_query_has_a_match(annotations):
        report.add("error", query_file, query_where,
                   f"none of the {num_queries} queries' persons is annotated in another test "
                   "frame (no gallery match): search cannot be evaluated")


def _any_prw_query_has_a_match(annotations: Annotations) -> bool:
    """Whether some query's person is labelled in a test frame other than the query's own (the
    ``prw/all`` gallery, dkd_ray.eval.protocols.prw_protocol)."""
    images, queries = annotations.images, annotations.queries
    box_image = images.box_image_index()
    labelled = (images.pids >= 0) & (images.split[box_image] == "test")
    frames_of = {}
    for pid, image in zip(images.pids[labelled].tolist(), box_image[labelled].tolist()):
        frames_of.setdefault(pid, set()).add(image)
    return any(frames_of.get(pid, set()) - {image} for pid, image in
               zip(queries.pid.tolist(), queries.image_index.tolist()))


def print_progress(stage: str, done: int, total: int) -> None:
    print(f"[{stage}] {done}/{total}", file=sys.stderr, flush=True)
