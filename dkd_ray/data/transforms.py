"""Scene transforms that move boxes with the pixels: resize (short side / max side) and flip.

Images are float tensors ``[3, H, W]``; boxes are ``[n, 4]`` ``x1 y1 x2 y2`` in continuous pixel
coordinates (pixel ``i`` covers ``[i, i + 1)``), so a flip maps ``x`` to ``W - x`` and a resize
scales each axis by exactly ``new_size / old_size``: a box keeps covering the same content.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_scale(height: int, width: int, short_side: int, max_side: int) -> float:
    """Scale that brings the short side to ``short_side`` without the long side passing ``max_side``."""
    return min(short_side / min(height, width), max_side / max(height, width))


def resize_scene(
    image: torch.Tensor, boxes: torch.Tensor, short_side: int, max_side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``image`` (and its boxes) as detection training does in this field."""
    height, width = image.shape[-2:]
    scale = resize_scale(height, width, short_side, max_side)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) == (height, width):
        return image, boxes
    resized = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                            antialias=scale < 1)[0]
    factors = boxes.new_tensor([new_w / width, new_h / height, new_w / width, new_h / height])
    return resized, boxes * factors


def hflip_scene(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror the image left-right; ``x1' = W - x2`` and ``x2' = W - x1``."""
    width = image.shape[-1]
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return image.flip(-1), flipped
