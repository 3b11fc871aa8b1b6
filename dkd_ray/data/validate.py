"""Find every problem in a dataset folder before training starts.

The readers record what they see while parsing (zero-area and out-of-image boxes, queries that
match no box, unknown keys, duplicate names, missing images) into a :class:`ValidationReport`;
:func:`validate_dataset` adds a full decode of every image. Severity ``error`` means training
or evaluation would fail or silently lose data; ``warning`` means the readers repaired it (a box
dropped or clipped, a grayscale JPEG converted to RGB).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .annotations import DATASETS, Annotations
from .matlab import DatasetError

SEVERITIES = ("error", "warning")
SYNTHETIC_SIZES_FILE = "synthetic_image_sizes.json"  # written by the annotation-only generator

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class Problem:
    severity: str  # 'error' | 'warning'
    file: str  # relative to the dataset root when inside it
    where: str  # row or index: 'line 12', 'Img(5).box(2)', 'TestG50(7).Gallery(3)', '' = file
    message: str
    fatal: bool = False  # structural: the readers refuse to build annotations

    def __str__(self) -> str:
        location = f"{self.file}:{self.where}" if self.where else self.file
        return f"{self.severity.upper()} {location}: {self.message}"


@dataclass
class ValidationReport:
    dataset: str
    root: Path
    problems: list[Problem] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def add(self, severity: str, file: str | Path, where: str, message: str, *,
            fatal: bool = False) -> None:
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
        self.problems.append(Problem(severity, self._relative(file), where, message, fatal))

    def add_dataset_error(self, exc: DatasetError) -> None:
        self.add("error", exc.file, "", exc.message, fatal=True)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when training can start (warnings only)."""
        return not self.errors

    def raise_if_fatal(self) -> None:
        fatal = [p for p in self.problems if p.fatal]
        if fatal:
            first = fatal[0]
            more = f" (and {len(fatal) - 1} more structural problems; run "\
                   f"jobs/validate_dataset.py for the full list)" if len(fatal) > 1 else ""
            raise DatasetError(first.file, f"{first.where + ': ' if first.where else ''}"
                                           f"{first.message}{more}")

    def log_summary(self, logger: logging.Logger) -> None:
        """One warning line for a reader's own report (validation prints every problem)."""
        if self.problems:
            logger.warning(
                "%s: %d errors, %d warnings in the annotations (first: %s); run "
                "`python jobs/validate_dataset.py --dataset %s --data-root %s` for the full list",
                self.root, len(self.errors), len(self.warnings), self.problems[0], self.dataset,
                self.root)

    def format_summary(self) -> str:
        lines = [f"{self.dataset} at {self.root}:"]
        for key, value in self.summary.items():
            lines.append(f"  {key}: {value}")
        lines.append(f"  problems: {len(self.errors)} errors, {len(self.warnings)} warnings")
        return "\n".join(lines)

    def _relative(self, file: str | Path) -> str:
        try:
            return str(Path(file).resolve().relative_to(Path(self.root).resolve()))
        except (ValueError, OSError):
            return str(file)


# --- Image files --------------------------------------------------------------------------------

def read_image_sizes(root: Path, rel_paths: Sequence[str], report: ValidationReport,
                     *, workers: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Width and height of every image from its header (no decode); 0 where unknown.

    An absent image takes its size from ``synthetic_image_sizes.json`` when the folder has one
    (annotation-only synthetic data); otherwise it is an error and its boxes are only clipped at 0.
    Threads hide file-system latency (network storage on clusters); PIL releases the GIL on I/O.
    """
    from PIL import Image  # here: a cached load imports this module but never reads images

    root = Path(root)

    def header_size(rel: str) -> tuple[int, int] | str | None:
        try:
            with Image.open(root / rel) as image:
                return image.size
        except FileNotFoundError:
            return None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return f"image does not decode (unreadable header): {type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(header_size, rel_paths))
    widths = np.zeros(len(rel_paths), dtype=np.int32)
    heights = np.zeros(len(rel_paths), dtype=np.int32)
    absent = []
    for i, result in enumerate(results):
        if result is None:
            absent.append(i)
        elif isinstance(result, str):
            report.add("error", root / rel_paths[i], "", result)
        else:
            widths[i], heights[i] = result
    if absent:
        known = _synthetic_sizes(root, report)
        for i in absent:
            rel = rel_paths[i]
            size = known.get(Path(rel).as_posix()) or known.get(Path(rel).name)
            if size is not None:
                widths[i], heights[i] = size
            else:
                report.add("error", root / rel, "",
                           "missing image file (its size is unknown, boxes not clipped to it)")
    return widths, heights


def _synthetic_sizes(root: Path, report: ValidationReport) -> dict[str, tuple[int, int]]:
    """The sizes of an annotation-only synthetic folder: ``{"sizes": {relative path: [w, h]}}``
    as the generator writes it, or a flat ``{name: [w, h]}``."""
    path = root / SYNTHETIC_SIZES_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        raw = raw["sizes"] if isinstance(raw.get("sizes"), dict) else raw
        return {str(name): (int(size[0]), int(size[1])) for name, size in raw.items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        report.add("error", path, "", f"unreadable image-size list: {exc}")
        return {}


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
