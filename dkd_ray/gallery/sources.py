"""What an index covers: image files, frames of video files, or a dataset split.

Every input file is a ``Source`` with its content hash (sha256 of the bytes: a renamed or copied
file is not indexed twice, an edited one is indexed again). Files are probed on the driver
before any Ray work (an image's header, a video's first stream), so a bad file is named at once
instead of failing a Ray task. Frames are decoded where they are used, in Ray Data tasks.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import GalleryInputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}


@dataclass(frozen=True)
class Source:
    path: str
    kind: str  # image | video
    content_hash: str
    every_nth: int = 1  # video: keep every n-th frame ...
    fps: float = 0.0  # ... or this many frames per second (0: use every_nth)

    def to_dict(self) -> dict:
        return asdict(self)


def content_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Folders (recursively), globs and files, sorted and deduplicated; refuses what matches nothing."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            matches = [p for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
        elif path.is_file():
            matches = [path]
        else:
            matches = [Path(p) for p in sorted(glob.glob(os.path.expanduser(item), recursive=True)) if Path(p).is_file()]
        if not matches:
            raise GalleryInputError(f"{item}: no image or video file there (images: {sorted(IMAGE_SUFFIXES)}, "
                                    f"videos: {sorted(VIDEO_SUFFIXES)})")
        found.extend(matches)
    return sorted({p.resolve() for p in found})


def kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    raise GalleryInputError(f"{path}: not an image or video file (suffix {suffix!r})")


def probe(path: Path, kind: str) -> str | None:
    """Why ``path`` cannot be indexed, or None. Cheap: an image's header, a video's stream."""
    try:
        if kind == "image":
            from PIL import Image

            with Image.open(path) as img:
                img.verify()
            return None
        import av

        with av.open(str(path)) as container:
            if not container.streams.video:
                return "no video stream"
        return None
    except ImportError as error:
        return f"{error} (install PyAV: pip install av)"
    except Exception as error:  # noqa: BLE001 - any decoder error means: unreadable
        return f"unreadable {kind} ({type(error).__name__}: {error})"


def list_sources(inputs: list[str], *, every_nth: int = 1, fps: float = 0.0,
                 skip_unreadable: bool = False) -> tuple[list[Source], list[str]]:
    """The sources of ``inputs`` and the unreadable files skipped (``skip_unreadable``; else the
    first unreadable file is refused, with the count of the others)."""
    if every_nth < 1 or fps < 0:
        raise GalleryInputError(f"--every-nth must be >= 1 and --fps >= 0, got {every_nth}, {fps}")
    sources, bad = [], []
    for path in expand_inputs(inputs):
        kind = kind_of(path)
        reason = probe(path, kind)
        if reason:
            bad.append(f"{path}: {reason}")
            continue
        sources.append(Source(str(path), kind, content_hash(path), every_nth, fps))
    if bad and not skip_unreadable:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise GalleryInputError(f"{bad[0]}{more}; fix or remove it, or pass --skip-unreadable")
    if not sources:
        raise GalleryInputError(f"nothing readable to index in {inputs}")
    return sources, bad


def dataset_sources(annotations, split: str) -> list[Source]:
    """The images of a dataset split (``Annotations``), as image sources."""
    rows = annotations.images.indices(split)
    if not len(rows):
        raise GalleryInputError(f"the dataset has no images in split {split!r}")
    return [Source(str(annotations.image_path(int(r))), "image", content_hash(annotations.image_path(int(r))))
            for r in rows]


def frames(source: dict) -> Iterator[dict]:
    """Decoded RGB frames of one source as rows: ``source``, ``content_hash``, ``frame``,
    ``timestamp`` (seconds; 0 for images) and ``image`` (uint8 [H, W, 3])."""
    base = {"source": source["path"], "content_hash": source["content_hash"]}
    if source["kind"] == "image":
        from PIL import Image

        with Image.open(source["path"]) as img:
            rgb = np.asarray(img.convert("RGB"))
        yield {**base, "frame": 0, "timestamp": 0.0, "image": rgb}
        return
    import av

    with av.open(source["path"]) as container:
        stream = container.streams.video[0]
        next_time = 0.0
        for index, frame in enumerate(container.decode(stream)):
            timestamp = float(frame.time) if frame.time is not None else index / float(stream.average_rate or 1)
            if source["fps"] > 0:
                if timestamp + 1e-6 < next_time:
                    continue
                next_time = timestamp + 1.0 / source["fps"]
            elif index % source["every_nth"]:
                continue
            yield {**base, "frame": index, "timestamp": timestamp, "image": frame.to_ndarray(format="rgb24")}
