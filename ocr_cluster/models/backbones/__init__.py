"""Backbones: one family per file, each with a dict of named variants.

Every backbone returns a list of 4 feature maps and carries `out_channels`, `out_strides` and
`family` ('hrnet' or 'resnet') attributes that the heads are built from.
"""

from __future__ import annotations

from torch import nn

from ocr_cluster.models.backbones import hrnet as _hrnet
from ocr_cluster.models.backbones import resnet as _resnet
from ocr_cluster.models.backbones.hrnet import HRNet
from ocr_cluster.models.backbones.resnet import ResNetV1c
from ocr_cluster.models.names import BACKBONES

__all__ = ["HRNet", "ResNetV1c", "build_backbone", "pretrained_alias"]


def build_backbone(name: str, *, align_corners: bool = False) -> nn.Module:
    """Build a backbone by name. `align_corners` only affects HRNet's fusion upsampling."""
    if name in _hrnet.VARIANTS:
        return _hrnet.hrnet(name, align_corners=align_corners)
    if name in _resnet.VARIANTS:
        return _resnet.resnet(name)
    raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")


def pretrained_alias(name: str) -> str:
    """mmseg's `open-mmlab://...` alias of the ImageNet weights for this backbone."""
    variants = {**_hrnet.VARIANTS, **_resnet.VARIANTS}
    if name not in variants:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    return variants[name].pretrained
