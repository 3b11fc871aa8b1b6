"""ResNet trunks from torchvision, with the three weight sources the config allows.

``weights`` is ``imagenet`` (torchvision's ``IMAGENET1K_V1`` weights: the ones the Re-ID and
person-search literature started from; downloaded once into the torch hub cache), ``none``
(random init) or a PATH to a state dict of the torchvision ResNet (read with
``torch.load(weights_only=True)``; the ``fc`` classifier may be missing).

The student splits the trunk the OIM/SeqNet way: ``conv1 .. layer3`` (C4, stride 16) is the
backbone, ``layer4`` (res5) the RoI box head. The teacher uses the whole trunk.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.ops.misc import FrozenBatchNorm2d

from dkd_ray.errors import InputError

_IMAGENET_WEIGHTS = {
    "resnet18": resnet.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": resnet.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": resnet.ResNet50_Weights.IMAGENET1K_V1,
}


class BackboneWeightsError(InputError, RuntimeError):
    """Backbone weights could not be loaded; the message names the source and what to do."""


def build_resnet(name: str, weights: str, norm_layer: Callable[..., nn.Module] | None = None) -> resnet.ResNet:
    """A torchvision ResNet ``name`` (resnet18/34/50) with ``weights`` = imagenet | none | PATH."""
    if name not in _IMAGENET_WEIGHTS:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(_IMAGENET_WEIGHTS)}")
    model = getattr(resnet, name)(weights=None, norm_layer=norm_layer or nn.BatchNorm2d)
    if weights == "none":
        return model
    if weights == "imagenet":
        state = _download_imagenet(name)
    else:
        state = _read_state_dict(Path(weights))
    _load_trunk(model, state, source=weights)
    return model


def is_pretrained(weights: str) -> bool:
    return weights != "none"


def detection_norm_layer(weights: str, norm: str = "batch") -> Callable[..., nn.Module]:
    """The student trunk's normalisation. ``batch``: trainable BatchNorm (SeqNet trains every BN
    but the stem's on ImageNet weights; batch statistics over its 5 scenes of ~300 RoIs each are
    well estimated). ``frozen``: torchvision detection's choice, FrozenBatchNorm2d with the
    pretrained statistics. From a random init there are no statistics to freeze: always ``batch``."""
    if norm not in ("batch", "frozen"):
        raise ValueError(f"unknown student norm {norm!r}; expected batch or frozen")
    return FrozenBatchNorm2d if norm == "frozen" and is_pretrained(weights) else nn.BatchNorm2d


def freeze_stem(model: resnet.ResNet) -> None:
    """Freeze ``conv1``/``bn1``'s parameters (SeqNet/OIM practice on ImageNet weights: low-level
    filters transfer). As in SeqNet, a trainable ``bn1`` still updates its running statistics."""
    for module in (model.conv1, model.bn1):
        for param in module.parameters():
            param.requires_grad_(False)


def trunk_channels(model: resnet.ResNet) -> tuple[int, int]:
    """``(C4, C5)`` output channels of ``layer3`` and ``layer4``."""
    expansion = model.layer1[0].expansion
    return 256 * expansion, 512 * expansion


class ResNetC4(nn.Sequential):
    """``conv1 .. layer3`` of a ResNet: the student's backbone (stride 16)."""

    def __init__(self, model: resnet.ResNet) -> None:
        super().__init__(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3)
        self.out_channels = trunk_channels(model)[0]


class ResNetRes5Head(nn.Module):
    """``layer4`` + global average pool on pooled RoI features: ``[N, C4, h, w] -> [N, C5]``."""

    def __init__(self, model: resnet.ResNet) -> None:
        super().__init__()
        self.layer4 = model.layer4
        self.out_channels = trunk_channels(model)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.layer4(x), 1), 1)


def _download_imagenet(name: str) -> dict[str, torch.Tensor]:
    weights = _IMAGENET_WEIGHTS[name]
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as err:  # URLError, HTTPError, timeouts, corrupt cache files ...
        raise BackboneWeightsError(
            f"could not load torchvision ImageNet weights {weights} for {name} from {weights.url}: {err}. "
            f"Without network access, put the file in the torch hub cache ({torch.hub.get_dir()}/checkpoints) "
            f"or set backbone_weights=none (random init) or backbone_weights=PATH to a saved state dict."
        ) from err


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneWeightsError(f"backbone weights file {path} does not exist "
                                   f"(backbone_weights must be imagenet, none or a PATH to a state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BackboneWeightsError(f"could not read backbone weights file {path}: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(f"backbone weights file {path} is not a state dict of tensors")
    return state


def _load_trunk(model: resnet.ResNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a torchvision ResNet state dict; every trunk key must match, ``fc.*`` is optional."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches: a different architecture
        raise BackboneWeightsError(f"backbone weights {source} do not fit this ResNet: {err}") from err
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise BackboneWeightsError(
            f"backbone weights {source} do not match the ResNet: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
