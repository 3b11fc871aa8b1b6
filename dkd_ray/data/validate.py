"""Find every problem in a dataset folder before training starts.

The readers record what they see while parsing (zero-area and out-of-image boxes, queries that
match no box, unknown keys, duplicate names, missing images) into a :class:`ValidationReport`;
:func:`validate_dataset` adds a full decode of every image. Severity ``error`` means training
or evaluation would fail or silently lose data; ``warning`` means the readers repaired it (a box
dropped or clipped, a grayscale JPEG converted to RGB).
"""


from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .annotations import DATASETS, Annotations
from .matlab import DatasetError
from .report import SYNTHETIC_SIZES_FILE, Problem, Progress, ValidationReport  # noqa: F401 (re-exported)


def check_image_decoding(root: Path, rel_paths: Sequence[str], report: ValidationReport, *,
                         workers: int | None = None, progress: Progress | None = None) -> None:
    """Decode every image: missing, undecodable or truncated is an error, a mode other than RGB
    a warning (the training loader converts to RGB)."""
    from PIL import Image

    root = Path(root)
    workers = workers or os.cpu_count() or 1
    # the readers already reported missing images and unreadable headers
    already_reported = {p.file for p in report.problems if p.message.startswith(
        ("missing image", "image does not decode"))}

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
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
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
                     box_rule: str = "exact") -> ValidationReport:
    """Parse ``root`` as ``dataset`` and decode its images, collecting every problem.
    ``box_rule`` (``data.box_rule``): how PRW boxes are read; CUHK-SYSU ignores it."""
    from . import cuhk_sysu, prw  # the readers import ValidationReport from here

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
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
    if progress:
        progress("reading annotations", 1, 1)
    report.summary = summarize(annotations)
    if check_images:
        check_image_decoding(root, list(annotations.images.path), report, workers=workers,
                             progress=progress)
    return report


def print_progress(stage: str, done: int, total: int) -> None:
    print(f"[{stage}] {done}/{total}", file=sys.stderr, flush=True)
