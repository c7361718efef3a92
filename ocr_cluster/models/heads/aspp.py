"""ASPP heads: DeepLabV3 (mmseg `ASPPHead`) and DeepLabV3+ (mmseg `DepthwiseSeparableASPPHead`).

- `deeplabv3`: `image_pool` = AdaptiveAvgPool(1) + ConvModule(in->512, 1x1), resized back;
  `aspp_modules` = ConvModule 1x1 + three ConvModule 3x3 with dilation 12/24/36 (at stride 8);
  concatenation (5 x 512) -> `bottleneck` ConvModule(2560->512, 3x3) -> dropout 0.1 -> cls_seg.
- `deeplabv3_sepconv`: "DeepLabv3 (w/ SepDepthWiseConv)" of openseg-group/mmsegmentation
  (configs/_base_/models/deeplabv3_sep_r50-d8.py): DepthwiseSeparableASPPHead with
  c1_in_channels=0, i.e. separable dilated ASPP branches and `sep_bottleneck` (2 x separable 3x3,
  512->512) after the bottleneck, no low-level decoder.
- `deeplabv3plus`: DepthwiseSeparableASPPHead(c1_in_channels=256, c1_channels=48): separable dilated
  ASPP branches; `c1_bottleneck` ConvModule(256->48, 1x1) on backbone map 0; the ASPP output resized
  to it and concatenated (560); `sep_bottleneck` = 2 x DepthwiseSeparableConvModule 3x3 -> 512;
  dropout 0.1; cls_seg. Output stride 4.

ResNet models carry mmseg's auxiliary FCN head (1024->256, weight 0.4). Rates scale with the feature
stride (`aspp_dilations`): (12, 24, 36) at 8, (6, 12, 18) at 16, (24, 48, 72) at 4 (HRNet).
"""

from __future__ import annotations

import torch
from torch import nn

from ocr_cluster.models.heads.base import (DecodeHead, FeatureSpec, HeadSet, aspp_dilations,
                                           resolve_dropout)
from ocr_cluster.models.heads.fcn import aux_head
from ocr_cluster.models.layers import ConvModule, DepthwiseSeparableConvModule, resize

__all__ = ["ASPPHead", "DepthwiseSeparableASPPHead", "BUILDERS"]


class ASPPHead(DecodeHead):
    def __init__(self, in_channels: int, channels: int, num_classes: int, *,
                 dilations: tuple[int, ...] = (1, 6, 12, 18), separable: bool = False, **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.dilations = tuple(dilations)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(in_channels, channels, 1))
        self.aspp_modules = nn.ModuleList([
            ConvModule(in_channels, channels, 1) if d == 1
            else (DepthwiseSeparableConvModule(in_channels, channels, 3, dilation=d) if separable
                  else ConvModule(in_channels, channels, 3, dilation=d))
            for d in self.dilations])
        self.bottleneck = ConvModule((len(self.dilations) + 1) * channels, channels, 3)

    def _aspp(self, x: torch.Tensor) -> torch.Tensor:
        outs = [resize(self.image_pool(x), x.shape[2:], self.align_corners)]
        outs += [m(x) for m in self.aspp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self._aspp(self._transform_inputs(inputs)))


class DepthwiseSeparableASPPHead(ASPPHead):
    """DeepLabV3+ head; with c1_in_channels=0 there is no low-level decoder branch."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, c1_in_channels: int,
                 c1_channels: int, **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, separable=True, **kwargs)
        if c1_in_channels < 0:
            raise ValueError("c1_in_channels must be >= 0")
        self.c1_bottleneck = ConvModule(c1_in_channels, c1_channels, 1) if c1_in_channels > 0 else None
        self.sep_bottleneck = nn.Sequential(
            DepthwiseSeparableConvModule(channels + c1_channels, channels, 3),
            DepthwiseSeparableConvModule(channels, channels, 3))

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        output = self._aspp(self._transform_inputs(inputs))
        if self.c1_bottleneck is not None:
            c1 = self.c1_bottleneck(inputs[0])
            output = torch.cat([resize(output, c1.shape[2:], self.align_corners), c1], dim=1)
        return self.cls_seg(self.sep_bottleneck(output))


def _common(spec: FeatureSpec, dropout_ratio: float | None, align_corners: bool) -> dict:
    in_index, _ = spec.decode_input()
    stride = spec.stride_of(in_index)
    return dict(in_index=in_index, dilations=(1,) + aspp_dilations(stride),
                dropout_ratio=resolve_dropout(dropout_ratio, 0.1), align_corners=align_corners,
                out_stride=stride)


def build_deeplabv3(spec: FeatureSpec, num_classes: int, *, dropout_ratio: float | None = None,
                    align_corners: bool = False) -> HeadSet:
    head = ASPPHead(spec.decode_input()[1], 512, num_classes, **_common(spec, dropout_ratio, align_corners))
    return HeadSet(head, aux_head(spec, num_classes, dropout_ratio=dropout_ratio, align_corners=align_corners))


def build_deeplabv3_sepconv(spec: FeatureSpec, num_classes: int, *, dropout_ratio: float | None = None,
                            align_corners: bool = False) -> HeadSet:
    head = DepthwiseSeparableASPPHead(spec.decode_input()[1], 512, num_classes, c1_in_channels=0,
                                      c1_channels=0, **_common(spec, dropout_ratio, align_corners))
    return HeadSet(head, aux_head(spec, num_classes, dropout_ratio=dropout_ratio, align_corners=align_corners))


def build_deeplabv3plus(spec: FeatureSpec, num_classes: int, *, dropout_ratio: float | None = None,
                        align_corners: bool = False) -> HeadSet:
    common = _common(spec, dropout_ratio, align_corners)
    common["out_stride"] = spec.strides[0]
    head = DepthwiseSeparableASPPHead(spec.decode_input()[1], 512, num_classes,
                                      c1_in_channels=spec.channels[0], c1_channels=48, **common)
    return HeadSet(head, aux_head(spec, num_classes, dropout_ratio=dropout_ratio, align_corners=align_corners))


BUILDERS = {
    "deeplabv3": build_deeplabv3,
    "deeplabv3_sepconv": build_deeplabv3_sepconv,
    "deeplabv3plus": build_deeplabv3plus,
}
