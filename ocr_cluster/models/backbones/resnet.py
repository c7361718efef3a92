"""Dilated ResNet V1c (deep stem) backbones, parameter- and key-compatible with mmsegmentation.

`ResNetV1c` = mmseg `ResNet(deep_stem=True, avg_down=False, style='pytorch')` with
`contract_dilation=True` and `multi_grid=None`, as in mmseg's `*_r50-d8.py` configs:

- stem: conv3x3 s2 3->32, BN, ReLU, conv3x3 32->32, BN, ReLU, conv3x3 32->64, BN, ReLU
  (`stem.0..8`), then MaxPool(3, 2, 1);
- layer1..4: Bottleneck blocks (stride on the 3x3 conv), outputs 256/512/1024/2048 channels;
- dilation: a stage with dilation d > 1 gives its first block d // 2 (contract_dilation) and the
  others d; the 3x3 padding equals its dilation.

Variants (`VARIANTS`): D8 = strides (1, 2, 1, 1), dilations (1, 1, 2, 4): output strides 4, 8, 8, 8.
D16 = strides (1, 2, 2, 1), dilations (1, 1, 1, 2): output strides 4, 8, 16, 16.

The blocks (`BasicBlock`, `Bottleneck`) are shared with the HRNet backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ocr_cluster.models.layers import constant_init, kaiming_init

__all__ = ["BasicBlock", "Bottleneck", "ResNetV1c", "VARIANTS", "make_res_layer", "resnet"]


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + identity (or downsample), ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place, as mmseg: the BN output is not kept for backward; no extra tensor
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 -> BN -> ReLU -> 3x3 (stride, dilation) -> BN -> ReLU -> 1x1 (x4) -> BN, + identity, ReLU
    ("pytorch" style: the stride sits on the 3x3 conv)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity  # in place, as mmseg: the BN output is not kept for backward; no extra tensor
        return self.relu(out)


def init_weights(backbone: nn.Module, zero_init_residual: bool) -> None:
    """mmseg's defaults without pretrained weights: Kaiming (fan_out) convs, BN weight 1 / bias 0, and
    with zero_init_residual the last BN of each residual block (Bottleneck.bn3, BasicBlock.bn2) at 0."""
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d):
            kaiming_init(m)
        elif isinstance(m, nn.BatchNorm2d):
            constant_init(m, 1.0)
    if zero_init_residual:
        for m in backbone.modules():
            if isinstance(m, Bottleneck):
                constant_init(m.bn3, 0.0)
            elif isinstance(m, BasicBlock):
                constant_init(m.bn2, 0.0)


def make_res_layer(block: type[BasicBlock] | type[Bottleneck], inplanes: int, planes: int,
                   num_blocks: int, stride: int = 1, dilation: int = 1,
                   contract_dilation: bool = False) -> nn.Sequential:
    """mmseg's ResLayer (no avg_down, no multi-grid): a Sequential of blocks whose first block gets the
    stride and a conv1x1 + BN `downsample` when the shape changes."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion))
    first_dilation = dilation // 2 if (dilation > 1 and contract_dilation) else dilation
    layers = [block(inplanes, planes, stride=stride, dilation=first_dilation, downsample=downsample)]
    inplanes = planes * block.expansion
    layers += [block(inplanes, planes, stride=1, dilation=dilation) for _ in range(1, num_blocks)]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class ResNetVariant:
    depth: int
    strides: tuple[int, int, int, int]
    dilations: tuple[int, int, int, int]
    pretrained: str  # mmseg's ImageNet weights for this backbone (open-mmlab:// alias)


_D8 = dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
_D16 = dict(strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))

VARIANTS: dict[str, ResNetVariant] = {
    "resnet50_d8": ResNetVariant(50, pretrained="open-mmlab://resnet50_v1c", **_D8),
    "resnet101_d8": ResNetVariant(101, pretrained="open-mmlab://resnet101_v1c", **_D8),
    "resnet50_d16": ResNetVariant(50, pretrained="open-mmlab://resnet50_v1c", **_D16),
    "resnet101_d16": ResNetVariant(101, pretrained="open-mmlab://resnet101_v1c", **_D16),
}

_BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class ResNetV1c(nn.Module):
    """ResNet V1c with a deep stem and dilated last stages; returns the 4 stage outputs."""

    family = "resnet"

    def __init__(self, depth: int = 50, strides: tuple[int, ...] = (1, 2, 1, 1),
                 dilations: tuple[int, ...] = (1, 1, 2, 4), contract_dilation: bool = True,
                 stem_channels: int = 64, base_channels: int = 64, in_channels: int = 3,
                 zero_init_residual: bool = True) -> None:
        super().__init__()
        if depth not in _BLOCKS_PER_STAGE:
            raise ValueError(f"unsupported ResNet depth {depth}; valid: {sorted(_BLOCKS_PER_STAGE)}")
        half = stem_channels // 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, half, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, stem_channels, 3, padding=1, bias=False), nn.BatchNorm2d(stem_channels),
            nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes, out_channels, out_strides, stride_so_far = stem_channels, [], [], 4
        for i, (num_blocks, stride, dilation) in enumerate(zip(_BLOCKS_PER_STAGE[depth], strides, dilations)):
            planes = base_channels * 2 ** i
            self.add_module(f"layer{i + 1}", make_res_layer(
                Bottleneck, inplanes, planes, num_blocks, stride=stride, dilation=dilation,
                contract_dilation=contract_dilation))
            inplanes = planes * Bottleneck.expansion
            stride_so_far *= stride
            out_channels.append(inplanes)
            out_strides.append(stride_so_far)
        self.out_channels = tuple(out_channels)
        self.out_strides = tuple(out_strides)
        init_weights(self, zero_init_residual)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.stem(x))
        outs = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            outs.append(x)
        return outs


def resnet(name: str, **kwargs) -> ResNetV1c:
    """Build a ResNet backbone by variant name (see `VARIANTS`)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown ResNet variant {name!r}; valid: {', '.join(VARIANTS)}")
    v = VARIANTS[name]
    return ResNetV1c(depth=v.depth, strides=v.strides, dilations=v.dilations, **kwargs)
