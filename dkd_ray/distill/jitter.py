"""Box jitter: the one spatial-invariant augmentation behind both ISA (teacher crops) and FSA
(extra student RoIs). Keeping it in one place means "strength" means the same thing to both.

A jittered box keeps the ground-truth identity but is misaligned the way a detection can be:
its centre moves by up to ``strength`` box sizes and its width and height are each rescaled by
a factor in ``[exp(-strength), exp(strength)]`` (independently, so the aspect ratio changes too;
a factor above one is the "enlarge" of the paper). Results are clipped to the image and kept at
least one pixel wide and high. Strength 0 returns the boxes unchanged.
"""

from __future__ import annotations

import torch


def jitter_boxes(
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    strength: float,
    num: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return ``num`` jittered copies of each box.

    Args:
        boxes: ``[n, 4]`` float boxes ``x1 y1 x2 y2`` in pixels.
        image_size: ``(height, width)`` used for clipping.
        strength: jitter strength, >= 0 (0 is the identity).
        num: copies per box.
        generator: optional RNG for reproducible jitter.

    Returns:
        ``[n, num, 4]`` boxes, inside the image, each at least 1 px on a side.
    """
    if strength < 0:
        raise ValueError(f"jitter strength must be >= 0, got {strength}")
    boxes = boxes.to(torch.float32)
    n = boxes.shape[0]
    copies = boxes[:, None, :].expand(n, num, 4)
    if strength == 0 or n == 0:
        return copies.clone()
    height, width = image_size
    # Uniform in [-strength, strength]: shift of the centre (in box sizes) and log-scale.
    u = (torch.rand((n, num, 4), generator=generator, device=boxes.device) * 2 - 1) * strength
    w = (copies[..., 2] - copies[..., 0]).clamp(min=1.0)
    h = (copies[..., 3] - copies[..., 1]).clamp(min=1.0)
    cx = (copies[..., 0] + copies[..., 2]) / 2 + u[..., 0] * w
    cy = (copies[..., 1] + copies[..., 3]) / 2 + u[..., 1] * h
    w = w * torch.exp(u[..., 2])
    h = h * torch.exp(u[..., 3])
    return clip_boxes(torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1), image_size)


def clip_boxes(boxes: torch.Tensor, image_size: tuple[int, int], min_size: float = 1.0) -> torch.Tensor:
    """Clip ``[..., 4]`` boxes to the image and keep each at least ``min_size`` px on a side."""
    height, width = image_size
    x1 = boxes[..., 0].clamp(0, max(width - min_size, 0))
    y1 = boxes[..., 1].clamp(0, max(height - min_size, 0))
    x2 = torch.maximum(boxes[..., 2].clamp(max=width), x1 + min_size)
    y2 = torch.maximum(boxes[..., 3].clamp(max=height), y1 + min_size)
    return torch.stack([x1, y1, x2, y2], dim=-1)
