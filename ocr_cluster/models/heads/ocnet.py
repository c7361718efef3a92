"""OCNet heads (Base-OC, ASP-OC) after openseg.pytorch, written in mmseg style.

Not in mmsegmentation, so the layout follows openseg.pytorch (lib/models/nets/ocnet.py,
lib/models/modules/base_oc_block.py, asp_oc_block.py) with mmseg building blocks: ConvModules (conv
without bias + BN + ReLU) where openseg has conv (with bias) + BNReLU / InPlaceABN, and mmseg's
SelfAttentionBlock for the object-context attention (query/key 2 x ConvModule, value and `W`
(`out_project`) plain biased 1x1 convs, `W` zero-initialised, softmax(QK^T / sqrt(key_channels))).

- `base_oc` (openseg `BaseOCNet`): `in_conv` ConvModule(in->512, 3x3); `oc_block` self-attention over
  all pixels (key/value 256, out 512); `out_conv` ConvModule(1024->512, 1x1) on cat[context, x];
  dropout 0.05; cls_seg.
- `asp_oc` (openseg `ASP_OC_Module` after conv3x3 2048->512): `in_conv` ConvModule(in->512, 3x3); five
  branches on it: `context_conv` ConvModule(512->256, 3x3) -> `oc_block` (self-attention on 2x2
  max-pooled features, key/value 128, out 256, resized back) -> `context_out` ConvModule(256->256, 1x1),
  and `aspp_modules` (ConvModule 1x1 and 3x3 with dilation 12/24/36 at stride 8, 512->256);
  concatenation (1280) -> `bottleneck` ConvModule(1280->512, 1x1) -> dropout 0.1 -> cls_seg.

The auxiliary head is mmseg's FCN (1024->256, weight 0.4) like the other ResNet baselines; openseg's
`dsn` is conv3x3 1024->512 + BNReLU + conv1x1.
"""

from __future__ import annotations

import torch
from torch import nn

from ocr_cluster.models.heads.base import (DecodeHead, FeatureSpec, HeadSet, aspp_dilations,
                                           resolve_dropout)
from ocr_cluster.models.heads.fcn import aux_head
from ocr_cluster.models.layers import ConvModule, SelfAttentionBlock, resize

__all__ = ["ASPOCHead", "BaseOCHead", "ObjectContextBlock", "BUILDERS"]


class ObjectContextBlock(SelfAttentionBlock):
    """OCNet's self-attention (openseg SelfAttentionBlock2D): separate query/key projections with BN,
    plain value conv, zero-initialised plain `out_project` (openseg's `W`); optional max-pooling of the
    input by `pool` before the attention, the context resized back afterwards."""

    def __init__(self, in_channels: int, key_channels: int, out_channels: int, pool: int = 1,
                 align_corners: bool = False) -> None:
        super().__init__(in_channels, in_channels, key_channels, out_channels, share_key_query=False,
                         key_query_num_convs=2, value_out_num_convs=1, key_query_norm=True,
                         value_out_norm=False, matmul_norm=True, with_out=True)
        self.pool = nn.MaxPool2d(pool) if pool > 1 else None
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.pool is None:
            return super().forward(x, x)
        pooled = self.pool(x)
        return resize(super().forward(pooled, pooled), x.shape[2:], self.align_corners)


class BaseOCHead(DecodeHead):
    def __init__(self, in_channels: int, channels: int, num_classes: int, *, key_channels: int = 256,
                 **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.in_conv = ConvModule(in_channels, channels, 3)
        self.oc_block = ObjectContextBlock(channels, key_channels, channels, pool=1,
                                           align_corners=self.align_corners)
        self.out_conv = ConvModule(channels * 2, channels, 1)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = self.in_conv(self._transform_inputs(inputs))
        context = self.oc_block(x)
        return self.cls_seg(self.out_conv(torch.cat([context, x], dim=1)))


class ASPOCHead(DecodeHead):
    def __init__(self, in_channels: int, channels: int, num_classes: int, *, hidden_channels: int = 256,
                 dilations: tuple[int, ...] = (12, 24, 36), **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.in_conv = ConvModule(in_channels, channels, 3)
        self.context_conv = ConvModule(channels, hidden_channels, 3)
        self.oc_block = ObjectContextBlock(hidden_channels, hidden_channels // 2, hidden_channels, pool=2,
                                           align_corners=self.align_corners)
        self.context_out = ConvModule(hidden_channels, hidden_channels, 1)
        self.aspp_modules = nn.ModuleList(
            [ConvModule(channels, hidden_channels, 1)]
            + [ConvModule(channels, hidden_channels, 3, dilation=d) for d in dilations])
        self.bottleneck = ConvModule(hidden_channels * (len(dilations) + 2), channels, 1)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = self.in_conv(self._transform_inputs(inputs))
        context = self.context_out(self.oc_block(self.context_conv(x)))
        outs = [context] + [m(x) for m in self.aspp_modules]
        return self.cls_seg(self.bottleneck(torch.cat(outs, dim=1)))


def build_base_oc(spec: FeatureSpec, num_classes: int, *, dropout_ratio: float | None = None,
                  align_corners: bool = False) -> HeadSet:
    in_index, in_channels = spec.decode_input()
    head = BaseOCHead(in_channels, 512, num_classes, key_channels=256, in_index=in_index,
                      dropout_ratio=resolve_dropout(dropout_ratio, 0.05), align_corners=align_corners,
                      out_stride=spec.stride_of(in_index))
    return HeadSet(head, aux_head(spec, num_classes, dropout_ratio=dropout_ratio, align_corners=align_corners))


def build_asp_oc(spec: FeatureSpec, num_classes: int, *, dropout_ratio: float | None = None,
                 align_corners: bool = False) -> HeadSet:
    in_index, in_channels = spec.decode_input()
    stride = spec.stride_of(in_index)
    head = ASPOCHead(in_channels, 512, num_classes, hidden_channels=256, dilations=aspp_dilations(stride),
                     in_index=in_index, dropout_ratio=resolve_dropout(dropout_ratio, 0.1),
                     align_corners=align_corners, out_stride=stride)
    return HeadSet(head, aux_head(spec, num_classes, dropout_ratio=dropout_ratio, align_corners=align_corners))


BUILDERS = {"base_oc": build_base_oc, "asp_oc": build_asp_oc}
