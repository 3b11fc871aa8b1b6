"""Writing a dataset folder: the root, JPEGs, progress, and the annotation-only size sidecar.

Annotation-only folders have no pixels, yet the internal form needs each image's width and
height, which for the real benchmarks come from the JPEG headers. Such folders get one extra
file, ``synthetic_image_sizes.json`` (``{"sizes": {"<path relative to root>": [w, h]}}``);
readers should use it only for an image whose file is absent (:func:`load_image_sizes`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from PIL import Image

SIZES_SIDECAR = "synthetic_image_sizes.json"
_SIDECAR_FORMAT = "dkd-ray synthetic image sizes v1"
JPEG_QUALITY = 90

ProgressFn = Callable[[str], None]


def check_root(root: Path, overwrite: bool) -> None:
    """Refuse a ``root`` that is a file, or a non-empty folder unless ``overwrite``."""
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"dataset root {root} exists and is not a folder")
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(
            f"dataset root {root} is not empty; pass overwrite=True (--overwrite) to write into it"
        )


def prepare_root(root: Path, overwrite: bool) -> None:
    """Create ``root`` (checked as above). With ``overwrite`` files are replaced in place; a
    stale size sidecar is removed so that it cannot shadow the real JPEGs."""
    check_root(root, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    (root / SIZES_SIDECAR).unlink(missing_ok=True)


def save_jpeg(image: Image.Image, path: Path) -> None:
    image.save(path, format="JPEG", quality=JPEG_QUALITY)


def write_image_sizes(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    path = root / SIZES_SIDECAR
    payload = {"format": _SIDECAR_FORMAT, "sizes": {k: [int(w), int(h)] for k, (w, h) in sizes.items()}}
    path.write_text(json.dumps(payload, separators=(",", ":"), sort_keys=True))
    return path


def load_image_sizes(root: str | Path) -> dict[str, tuple[int, int]] | None:
    """``{relative image path: (width, height)}`` of an annotation-only synthetic folder, or
    None when ``root`` has no sidecar (every real folder)."""
    path = Path(root) / SIZES_SIDECAR
    if not path.exists():
        return None
    payload = json.loads(path.read_text())
    if payload.get("format") != _SIDECAR_FORMAT:
        raise ValueError(f"{path}: unknown format {payload.get('format')!r}")
    return {k: (int(w), int(h)) for k, (w, h) in payload["sizes"].items()}


class Progress:
    """Throttled progress lines for long loops (at most one every ``interval`` seconds)."""

    def __init__(self, report: ProgressFn | None, interval: float = 5.0) -> None:
        self.report = report
        self.interval = interval
        self._last = time.monotonic()

    def say(self, message: str) -> None:
        if self.report is not None:
            self.report(message)
            self._last = time.monotonic()

    def tick(self, what: str, done: int, total: int) -> None:
        if self.report is not None and (done == total or time.monotonic() - self._last >= self.interval):
            self.say(f"{what}: {done}/{total}")
