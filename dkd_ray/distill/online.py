"""The online teacher: the frozen teacher run on crops of the current image batch.

The knowledge bank covers the usual case (exact ground-truth crops, fixed teacher outputs). This
is the option for teacher inputs that are not fixed (``DistillConfig.use_bank = False``, e.g.
photometric augmentation of the scenes, or teacher outputs on jittered boxes).

Crops are taken with ``torchvision.ops.roi_align(aligned=True)`` at the teacher's input size. With
``aligned=True`` a box ``[x1, y1, x2, y2]`` in pixel-edge coordinates samples the same points as
cutting ``image[:, y1:y2, x1:x2]`` and resizing it bilinearly (``align_corners=False``): each
output pixel is the average of ``ceil(box size / output size)`` bilinear samples per axis, which
acts like an anti-aliased resize when the box is larger than the teacher input. So for an exact
box the embedding equals the bank's up to interpolation differences: the resize filter of the
crops the bank was built from, and roi_align reading pixels just outside the box at its border
where a cut crop is clamped to its edge.

Images must be in the value range and normalisation the teacher's crops come in (the same as
the crops given to ``build_knowledge_bank``), and boxes in the images' pixel coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align


class OnlineTeacher:
    """Wraps a frozen teacher; not an ``nn.Module``, so it stays out of the student's parameters,
    optimiser, DDP wrapper and state dict."""

    def __init__(self, teacher: nn.Module, crop_size: tuple[int, int]) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        if min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be (height, width) >= 1, got {crop_size}")

    def crops(self, images: Tensor | Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        """``[M, 3, H, W]`` crops of ``boxes`` (one ``[n_i, 4]`` tensor per image), in box order."""
        if len(images) != len(boxes):
            raise ValueError(f"got {len(images)} images but {len(boxes)} box tensors")
        for i, image_boxes in enumerate(boxes):
            if image_boxes.dim() != 2 or image_boxes.shape[1] != 4:
                raise ValueError(f"boxes[{i}] must be [n, 4] x1 y1 x2 y2, got {tuple(image_boxes.shape)}")
        if len(images) == 0:
            return torch.zeros(0, 3, *self.crop_size)
        if isinstance(images, Tensor):  # a padded batch [N, 3, H, W]: one call
            return roi_align(images, [b.to(images) for b in boxes], self.crop_size, aligned=True)
        # Images of different sizes: per image (a step holds a few), no padding copies.
        return torch.cat([
            roi_align(image[None], [image_boxes.to(image)], self.crop_size, aligned=True)
            for image, image_boxes in zip(images, boxes)
        ])

    def __call__(self, images: Tensor | Sequence[Tensor], boxes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Teacher ``(embedding [M, dt], logits [M, K])`` for every box, float32, no gradient."""
        if self.teacher.training:  # e.g. a parent called .train(); the teacher stays frozen
            self.teacher.eval()
        with torch.no_grad():
            crops = self.crops(images, boxes)
            if len(crops) == 0:
                device = crops.device
                return (torch.zeros(0, int(self.teacher.embedding_dim), device=device),
                        torch.zeros(0, int(self.teacher.num_classes), device=device))
            embedding, logits = self.teacher.forward_with_logits(crops)
        return embedding.float(), logits.float()
