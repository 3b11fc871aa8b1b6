"""What a search returns: JSON for scripts, a self-contained HTML page and a picture sheet
(the query, then each hit's crop over its scene thumbnail with the box drawn, its similarity,
source and time)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CROP_SIZE = (64, 128)  # width, height of a person tile
SCENE_WIDTH = 160


def frame_image(source: str, frame: int) -> np.ndarray:
    """The RGB frame ``frame`` of ``source`` (an image file: frame 0)."""
    suffix = Path(source).suffix.lower()
    from .sources import VIDEO_SUFFIXES

    if suffix not in VIDEO_SUFFIXES:
        with Image.open(source) as img:
            return np.asarray(img.convert("RGB"))
    import av

    with av.open(source) as container:
        for index, decoded in enumerate(container.decode(container.streams.video[0])):
            if index == frame:
                return decoded.to_ndarray(format="rgb24")
    raise ValueError(f"{source} has no frame {frame}")


def _tiles(rgb: np.ndarray, box: list[float]) -> tuple[Image.Image, Image.Image]:
    image = Image.fromarray(rgb)
    x1, y1, x2, y2 = box
    crop = image.crop((int(x1), int(y1), max(int(x2), int(x1) + 1), max(int(y2), int(y1) + 1))).resize(CROP_SIZE)
    scene = image.copy()
    ImageDraw.Draw(scene).rectangle((x1, y1, x2, y2), outline=(255, 0, 0), width=max(2, scene.width // 200))
    scene.thumbnail((SCENE_WIDTH, SCENE_WIDTH * 4))
    return crop, scene


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def render(query_images: list[tuple[np.ndarray, list[float]]], hits: list[dict[str, Any]], out_dir: Path,
           title: str) -> dict[str, Path]:
    """Write ``results.json``, ``results.html`` and ``results.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"title": title, "hits": hits}, indent=1))
    query_tiles = [_tiles(rgb, box)[0] for rgb, box in query_images]
    hit_tiles = [_tiles(frame_image(h["source"], h["frame"]), h["box"]) for h in hits]

    # picture sheet: queries in the first row, then one row per hit (crop | scene | caption)
    row_h = max([CROP_SIZE[1]] + [scene.height for _, scene in hit_tiles])
    width = max(CROP_SIZE[0] * max(1, len(query_tiles)), CROP_SIZE[0] + SCENE_WIDTH + 360)
    sheet = Image.new("RGB", (width, CROP_SIZE[1] + 20 + row_h * len(hit_tiles)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, tile in enumerate(query_tiles):
        sheet.paste(tile, (i * CROP_SIZE[0], 0))
    draw.text((len(query_tiles) * CROP_SIZE[0] + 8, 4), "query", fill=(0, 0, 0))
    for i, (hit, (crop, scene)) in enumerate(zip(hits, hit_tiles)):
        top = CROP_SIZE[1] + 20 + i * row_h
        sheet.paste(crop, (0, top))
        sheet.paste(scene, (CROP_SIZE[0] + 4, top))
        draw.text((CROP_SIZE[0] + SCENE_WIDTH + 12, top + 4), _caption(hit), fill=(0, 0, 0))
    sheet.save(out_dir / "results.png")

    rows = "\n".join(
        f"<tr><td>{h['rank']}</td><td><img src='{_data_uri(crop)}'></td><td><img src='{_data_uri(scene)}'></td>"
        f"<td>{html.escape(_caption(h))}</td></tr>" for h, (crop, scene) in zip(hits, hit_tiles))
    queries = "".join(f"<img src='{_data_uri(t)}'>" for t in query_tiles)
    (out_dir / "results.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>body{{font-family:sans-serif}}td{{padding:4px;vertical-align:top}}</style>"
        f"<h1>{html.escape(title)}</h1><h2>Query</h2>{queries}<h2>Top {len(hits)}</h2>"
        f"<table><tr><th>rank</th><th>person</th><th>scene</th><th>where</th></tr>{rows}</table>")
    return {name: out_dir / f"results.{name}" for name in ("json", "html", "png")}


def _caption(hit: dict[str, Any]) -> str:
    from .sources import VIDEO_SUFFIXES

    video = Path(hit["source"]).suffix.lower() in VIDEO_SUFFIXES
    where = Path(hit["source"]).name + (f" frame {hit['frame']} at {hit['timestamp']:.2f} s" if video else "")
    return f"#{hit['rank']}  similarity {hit['similarity']:.3f}  detection {hit['score']:.2f}\n{where}"
