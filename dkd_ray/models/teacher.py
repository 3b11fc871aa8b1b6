"""The teacher: a "bag of tricks" Re-ID network on person crops (docs/METHOD.md, "The teacher").

ResNet trunk with the last stride set to 1 (a 16x8 map for 256x128 crops instead of 8x4), global
average pooling, a BN-neck (BatchNorm1d with a frozen zero bias) and a bias-free identity
classifier over the K training identities. The triplet loss sees the features before the BN-neck,
the classifier the features after it; retrieval uses the L2-normalised BN-neck embedding.

Crops are float RGB in [0, 1], already resized to ``(input_height, input_width)`` by the crop
pipeline (which also applies ISA and random erasing); the network normalises them itself, so the
dataset, the knowledge bank and an online teacher (roi_align on raw scenes) all feed it the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet

from dkd_ray.config import TeacherConfig
from dkd_ray.models.backbone import build_resnet, trunk_channels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ReIDTeacher(nn.Module):
    """``forward(crops [B,3,H,W])``: train mode -> dict(features, embedding, logits);
    eval mode -> L2-normalised BN-neck embedding ``[B, embedding_dim]``."""

    def __init__(self, trunk: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"the teacher needs at least one training identity, got num_classes={num_classes}")
        self.embedding_dim = feature_dim
        self.num_classes = num_classes
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.trunk = trunk
        self.bnneck = nn.BatchNorm1d(feature_dim)
        self.bnneck.bias.requires_grad_(False)  # BoT: a shift before the classifier only hurts the metric space
        self.classifier = nn.Linear(feature_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def pooled_features(self, crops: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled trunk features before the BN-neck, ``[B, embedding_dim]``."""
        if crops.dim() != 4 or crops.shape[1] != 3:
            raise ValueError(f"teacher expects crops [B, 3, H, W], got {tuple(crops.shape)}")
        x = (crops - self.pixel_mean) / self.pixel_std
        return torch.flatten(F.adaptive_avg_pool2d(self.trunk(x), 1), 1)

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        features = self.pooled_features(crops)
        embedding = self.bnneck(features)
        if not self.training:
            return F.normalize(embedding, dim=1)
        return {"features": features, "embedding": embedding, "logits": self.classifier(embedding)}

    def forward_with_logits(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L2-normalised embedding [B, d], identity logits [B, K])``: what the knowledge bank stores.
        Uses the module's current mode; call ``.eval()`` first for fixed BN statistics."""
        embedding = self.bnneck(self.pooled_features(crops))
        return F.normalize(embedding, dim=1), self.classifier(embedding)


def build_teacher(cfg: TeacherConfig, num_classes: int) -> ReIDTeacher:
    """The teacher of ``cfg`` (backbone, weights, last stride) over ``num_classes`` identities."""
    model = build_resnet(cfg.backbone, cfg.backbone_weights)
    set_last_stride(model.layer4, cfg.last_stride)
    trunk = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                          model.layer1, model.layer2, model.layer3, model.layer4)
    return ReIDTeacher(trunk, trunk_channels(model)[1], num_classes)


def set_last_stride(layer4: nn.Sequential, stride: int) -> None:
    """Set the stride of ``layer4``'s first block (its strided conv and its downsample shortcut)."""
    if stride not in (1, 2):
        raise ValueError(f"teacher.last_stride must be 1 or 2, got {stride}")
    block = layer4[0]
    strided_conv = block.conv2 if isinstance(block, resnet.Bottleneck) else block.conv1
    strided_conv.stride = (stride, stride)
    block.stride = stride
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


def teacher_embedding_dim(cfg: TeacherConfig) -> int:
    """The teacher's embedding size for ``cfg.backbone`` without building it (512 or 2048)."""
    return {"resnet18": 512, "resnet34": 512, "resnet50": 2048}[cfg.backbone]
