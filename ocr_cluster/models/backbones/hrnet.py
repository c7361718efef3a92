"""HRNetV2 backbones (W18-Small v2, W18, W48), parameter- and key-compatible with mmsegmentation.

Layout (mmseg/models/backbones/hrnet.py, configs/_base_/models/*_hr18.py):

- stem: conv1 3x3 s2 3->64, bn1, ReLU, conv2 3x3 s2 64->64, bn2, ReLU (stride 4);
- layer1: Bottleneck blocks (planes 64, 256 channels out);
- transition1..3: ModuleLists indexed by branch; `None` keeps a branch, a new branch is
  Sequential(Sequential(conv3x3 s2 from the last previous branch, BN, ReLU));
- stage2..4: Sequentials of `HRModule`s (`branches`, `fuse_layers`); every module keeps all
  resolutions (multiscale_output=True), so the backbone returns 4 maps at strides 4, 8, 16, 32 with
  channels (C, 2C, 4C, 8C).

Fusion: output i = ReLU(sum_j f_ij(x_j)); j > i: conv1x1 + BN + x2^(j-i) bilinear upsample
(align_corners=False) then a resize to x_i's exact size, as mmseg; j < i: a chain of stride-2 3x3
convs (ReLU between, none after the last). With `align_corners=True` (the HRNet-OCR recipe) the
upsampling is a single bilinear resize to x_i's size with align_corners=True, as the HRNet repo does.

mmseg's "HRNetV2p-W18-Small" is HRNetV2-W18-Small-v2 (stage1 2 blocks; stages 2-4 of 1/3/2 modules,
2 blocks per branch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ocr_cluster.models.backbones.resnet import BasicBlock, Bottleneck, init_weights, make_res_layer
from ocr_cluster.models.layers import resize

__all__ = ["HRModule", "HRNet", "VARIANTS", "hrnet"]

BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


@dataclass(frozen=True)
class StageCfg:
    num_modules: int
    num_branches: int
    block: str
    num_blocks: tuple[int, ...]
    num_channels: tuple[int, ...]


@dataclass(frozen=True)
class HRNetVariant:
    stage1: StageCfg
    stage2: StageCfg
    stage3: StageCfg
    stage4: StageCfg
    pretrained: str  # mmseg's ImageNet weights (open-mmlab:// alias)


def _w(c: int, blocks: int, modules: tuple[int, int, int], stem_blocks: int, pretrained: str) -> HRNetVariant:
    return HRNetVariant(
        stage1=StageCfg(1, 1, "BOTTLENECK", (stem_blocks,), (64,)),
        stage2=StageCfg(modules[0], 2, "BASIC", (blocks,) * 2, (c, 2 * c)),
        stage3=StageCfg(modules[1], 3, "BASIC", (blocks,) * 3, (c, 2 * c, 4 * c)),
        stage4=StageCfg(modules[2], 4, "BASIC", (blocks,) * 4, (c, 2 * c, 4 * c, 8 * c)),
        pretrained=pretrained)


VARIANTS: dict[str, HRNetVariant] = {
    "hrnetv2_w18_small": _w(18, 2, (1, 3, 2), 2, "open-mmlab://msra/hrnetv2_w18_small"),
    "hrnetv2_w18": _w(18, 4, (1, 4, 3), 4, "open-mmlab://msra/hrnetv2_w18"),
    "hrnetv2_w48": _w(48, 4, (1, 4, 3), 4, "open-mmlab://msra/hrnetv2_w48"),
}


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
                               nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=False))
    return layers


class HRModule(nn.Module):
    """One high-resolution module: parallel branches of residual blocks, then multi-scale fusion."""

    def __init__(self, num_branches: int, block: type[BasicBlock] | type[Bottleneck],
                 num_blocks: tuple[int, ...], in_channels: list[int], num_channels: tuple[int, ...],
                 multiscale_output: bool = True, align_corners: bool = False) -> None:
        super().__init__()
        if not (num_branches == len(num_blocks) == len(in_channels) == len(num_channels)):
            raise ValueError("HRModule: branches, blocks, in_channels and channels must have equal length")
        self.num_branches = num_branches
        self.multiscale_output = multiscale_output
        self.align_corners = align_corners
        self.in_channels = list(in_channels)
        branches = []
        for i in range(num_branches):
            branches.append(make_res_layer(block, self.in_channels[i], num_channels[i], num_blocks[i]))
            self.in_channels[i] = num_channels[i] * block.expansion
        self.branches = nn.ModuleList(branches)
        self.fuse_layers = self._make_fuse_layers()
        self.relu = nn.ReLU(inplace=False)

    def _make_fuse_layers(self) -> nn.ModuleList | None:
        if self.num_branches == 1:
            return None
        ch = self.in_channels
        num_out = self.num_branches if self.multiscale_output else 1
        fuse_layers = []
        for i in range(num_out):
            row: list[nn.Module | None] = []
            for j in range(self.num_branches):
                if j > i:
                    row.append(nn.Sequential(
                        nn.Conv2d(ch[j], ch[i], 1, bias=False), nn.BatchNorm2d(ch[i]),
                        nn.Upsample(scale_factor=2 ** (j - i), mode="bilinear", align_corners=False)))
                elif j == i:
                    row.append(None)
                else:
                    steps = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        steps.append(nn.Sequential(*_conv_bn(ch[j], ch[i] if last else ch[j], 3, stride=2,
                                                             relu=not last)))
                    row.append(nn.Sequential(*steps))
            fuse_layers.append(nn.ModuleList(row))
        return nn.ModuleList(fuse_layers)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        outs = []
        for i, row in enumerate(self.fuse_layers):
            size = xs[i].shape[2:]
            y, owned = None, False  # owned: y is a tensor made here, safe to add into in place (as mmseg)
            for j, x in enumerate(xs):
                if j == i:
                    z = x
                elif j > i:
                    layer = row[j]
                    if self.align_corners:
                        z = resize(layer[1](layer[0](x)), size, align_corners=True)
                    else:
                        z = resize(layer(x), size, align_corners=False)
                else:
                    z = row[j](x)
                if y is None:
                    y, owned = z, j != i  # xs[i] itself is still read by the other rows
                elif owned:
                    y += z
                else:
                    y, owned = y + z, True
            outs.append(self.relu(y))
        return outs


class HRNet(nn.Module):
    """HRNetV2 backbone returning the 4 branch outputs (strides 4, 8, 16, 32)."""

    family = "hrnet"

    def __init__(self, variant: HRNetVariant, in_channels: int = 3, align_corners: bool = False,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)

        s1 = variant.stage1
        block1 = BLOCKS[s1.block]
        self.layer1 = make_res_layer(block1, 64, s1.num_channels[0], s1.num_blocks[0])
        pre = [s1.num_channels[0] * block1.expansion]

        for idx, cfg in ((2, variant.stage2), (3, variant.stage3), (4, variant.stage4)):
            block = BLOCKS[cfg.block]
            cur = [c * block.expansion for c in cfg.num_channels]
            setattr(self, f"transition{idx - 1}", self._make_transition(pre, cur))
            stage, pre = self._make_stage(cfg, cur, align_corners)
            setattr(self, f"stage{idx}", stage)

        self.out_channels = tuple(pre)
        self.out_strides = tuple(4 * 2 ** i for i in range(len(pre)))
        init_weights(self, zero_init_residual)

    @staticmethod
    def _make_transition(pre: list[int], cur: list[int]) -> nn.ModuleList:
        layers: list[nn.Module | None] = []
        for i, c in enumerate(cur):
            if i < len(pre):
                layers.append(nn.Sequential(*_conv_bn(pre[i], c, 3)) if c != pre[i] else None)
            else:
                steps = []
                for j in range(i + 1 - len(pre)):
                    cin = pre[-1]
                    cout = c if j == i - len(pre) else cin
                    steps.append(nn.Sequential(*_conv_bn(cin, cout, 3, stride=2)))
                layers.append(nn.Sequential(*steps))
        return nn.ModuleList(layers)

    @staticmethod
    def _make_stage(cfg: StageCfg, in_channels: list[int], align_corners: bool
                    ) -> tuple[nn.Sequential, list[int]]:
        block = BLOCKS[cfg.block]
        modules = []
        for _ in range(cfg.num_modules):
            m = HRModule(cfg.num_branches, block, cfg.num_blocks, in_channels, cfg.num_channels,
                         multiscale_output=True, align_corners=align_corners)
            in_channels = m.in_channels
            modules.append(m)
        return nn.Sequential(*modules), list(in_channels)

    @staticmethod
    def _transition(transition: nn.ModuleList, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = []
        for i, t in enumerate(transition):
            if t is None:
                xs.append(ys[i])
            else:
                xs.append(t(ys[i] if i < len(ys) else ys[-1]))
        return xs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        ys = [self.layer1(x)]
        ys = self.stage2(self._transition(self.transition1, ys))
        ys = self.stage3(self._transition(self.transition2, ys))
        ys = self.stage4(self._transition(self.transition3, ys))
        return ys


def hrnet(name: str, **kwargs) -> HRNet:
    """Build an HRNetV2 backbone by variant name (see `VARIANTS`)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown HRNet variant {name!r}; valid: {', '.join(VARIANTS)}")
    return HRNet(VARIANTS[name], **kwargs)
