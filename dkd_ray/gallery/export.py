"""The student's Re-ID embedder exported for deployment with ``torch.export`` (a ``.pt2`` file
that ``torch.export.load`` runs without this package).

What is exported: ``(image [3, H, W] float in [0, 1], boxes [n, 4] x1 y1 x2 y2 pixels) ->
embeddings [n, d]`` (L2-normalised): the backbone, RoIAlign, res5 and the embedding head, for any
number of boxes and one frame size (a camera's resolution: the scene resize depends on the size,
so each size is its own export). The detector is not exported: torchvision's batched NMS guards
on data-dependent sizes, which ``torch.export`` (2.14) refuses; run detection eagerly
(``jobs/index_gallery.py``) and the exported embedder where the embeddings are needed.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.transform import resize_boxes

MAX_BOXES = 4096


class BoxEmbedder(nn.Module):
    """``forward(image, boxes) -> embeddings``: ``PersonSearchNet.embed_boxes`` for one image,
    written without per-image Python lists so the number of boxes stays dynamic."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        image_list, features, _ = self.student._features([image])
        scaled = resize_boxes(boxes.float(), image.shape[-2:], image_list.image_sizes[0])
        heads = self.student.roi_heads
        return heads.reid_head(heads._box_features(features, [scaled], image_list.image_sizes)).float()


def export_embedder(student: nn.Module, height: int, width: int) -> torch.export.ExportedProgram:
    if height < 16 or width < 16:
        raise ValueError(f"frame size {height}x{width} is too small to export (at least 16x16)")
    module = BoxEmbedder(student.eval()).eval()
    example = (torch.rand(3, height, width), torch.tensor([[0.0, 0.0, width / 2, height / 2],
                                                           [width / 4, height / 4, width, height]]))
    boxes = torch.export.Dim("boxes", min=1, max=MAX_BOXES)
    with torch.no_grad():
        return torch.export.export(module, example, dynamic_shapes={"image": None, "boxes": {0: boxes}}, strict=False)


@torch.no_grad()
def max_difference(student: nn.Module, program: torch.export.ExportedProgram, height: int, width: int,
                   boxes: int = 7, seed: int = 0) -> float:
    """Largest absolute difference between the eager and the exported embeddings on a random
    frame and ``boxes`` random boxes."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=generator)
    corners = torch.rand(boxes, 2, 2, generator=generator) * torch.tensor([width, height])
    box = torch.cat([corners.min(1).values, corners.max(1).values + 4], dim=1)
    eager = student.eval().embed_boxes([image], [box])[0]
    return float((program.module()(image, box) - eager).abs().max())
