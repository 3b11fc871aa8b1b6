"""Image sizes from file headers (no decode), for clipping boxes while the annotations are read."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from .report import SYNTHETIC_SIZES_FILE, ValidationReport, describe_os_error, path_problem

# Message prefixes the validator's full decode relies on to skip what is already reported.
UNREADABLE_IMAGE = "image unreadable"
UNREADABLE_FOLDER = "image folder unreadable"


def read_image_sizes(root: Path, rel_paths: Sequence[str], report: ValidationReport,
                     *, workers: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Width and height of every image from its header (no decode); 0 where unknown.

    An absent image takes its size from ``synthetic_image_sizes.json`` when the folder has one
    (annotation-only synthetic data); otherwise it is an error and its boxes are only clipped at 0.
    Threads hide file-system latency (network storage on clusters); PIL releases the GIL on I/O.
    """
    from PIL import Image  # here: a cached load imports this module but never reads images

    root = Path(root)
    bad_folders = unreadable_folders(root, rel_paths)
    for folder, (blame, reason) in bad_folders.items():
        count = sum(1 for rel in rel_paths if _parent(rel) == folder)
        # fatal: a run could not read a single one of these images
        report.add("error", blame, "", f"{UNREADABLE_FOLDER}: {reason} (none of its {count} "
                                       "images can be read)", fatal=True)

    def header_size(rel: str) -> tuple[int, int] | str | None:
        if _parent(rel) in bad_folders:
            return ""  # reported once for the folder
        try:
            with Image.open(root / rel) as image:
                return image.size
        except FileNotFoundError:
            return None
        except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            return f"{UNREADABLE_IMAGE}: {describe_os_error(exc)}"
        except OSError as exc:
            if exc.errno is not None:  # a file-system error (ELOOP, EIO, ...), not the content
                return f"{UNREADABLE_IMAGE}: {describe_os_error(exc)}"
            return f"image does not decode (unreadable header): {type(exc).__name__}: {exc}"
        except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
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
            if result:
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


def _parent(rel: str) -> str:
    return rel.rpartition("/")[0]


def unreadable_folders(root: Path, rel_paths: Sequence[str]) -> dict[str, tuple[Path, str]]:
    """The image folders (relative, as in ``rel_paths``) that exist but cannot hold readable
    images: a file where the folder should be, a symlink loop, no permission to list. A missing
    folder is not one of them (its images are absent; annotation-only folders have none).
    One stat per distinct folder: a handful for both benchmarks."""
    bad = {}
    for folder in sorted({_parent(rel) for rel in rel_paths}):
        problem = path_problem(root / folder, folder=True)
        if problem is not None and problem[1] != "folder not found":
            bad[folder] = problem
    return bad


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
    except OSError as exc:
        report.add("error", path, "", f"unreadable image-size list: {describe_os_error(exc)}")
        return {}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        report.add("error", path, "", f"unreadable image-size list: {exc}")
        return {}
