"""Image sizes from file headers (no decode), for clipping boxes while the annotations are read."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from .report import SYNTHETIC_SIZES_FILE, ValidationReport


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
