"""FCN head (mmseg `FCNHead`), also used as the auxiliary head and as OCRNet's soft-region head.

`convs` = `num_convs` ConvModules (kernel `kernel_size`), optional `conv_cat` ConvModule on
cat[input, convs(input)], then `cls_seg`.

Configurations (mmseg configs):
- ResNet FCN baseline (`fcn_r50-d8.py`): 2048->512, 2 convs 3x3, concat_input, dropout 0.1, on
  layer4, plus the auxiliary FCN below.
- HRNet FCN baseline (`fcn_hr18.py`): resize_concat C->C, 1 conv 1x1, no concat, no dropout, and no
  auxiliary head.
- ResNet auxiliary / soft-region FCN: 1024->256, 1 conv 3x3, no concat, dropout 0.1, on layer3,
  loss weight 0.4.
- HRNet soft-region FCN (`ocrnet_hr18.py`): as the HRNet FCN baseline, loss weight 0.4.
"""

from __future__ import annotations

import torch
from torch import nn

from ocr_cluster.models.heads.base import DecodeHead, FeatureSpec, HeadSet, resolve_dropout
from ocr_cluster.models.layers import ConvModule

__all__ = ["FCNHead", "aux_head", "build_fcn", "soft_region_head"]


class FCNHead(DecodeHead):
    def __init__(self, in_channels: int, channels: int, num_classes: int, *, num_convs: int = 2,
                 kernel_size: int = 3, concat_input: bool = True, dilation: int = 1, **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        if num_convs < 0 or (num_convs == 0 and in_channels != channels):
            raise ValueError("FCNHead: num_convs must be >= 0, and 0 needs in_channels == channels")
        self.concat_input = concat_input
        if num_convs == 0:
            self.convs = nn.Identity()
        else:
            convs = [ConvModule(in_channels, channels, kernel_size, dilation=dilation)]
            convs += [ConvModule(channels, channels, kernel_size, dilation=dilation)
                      for _ in range(num_convs - 1)]
            self.convs = nn.Sequential(*convs)
        if concat_input:
            self.conv_cat = ConvModule(in_channels + channels, channels, kernel_size)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = self._transform_inputs(inputs)
        feats = self.convs(x)
        if self.concat_input:
            feats = self.conv_cat(torch.cat([x, feats], dim=1))
        return self.cls_seg(feats)


def soft_region_head(spec: FeatureSpec, num_classes: int, *, dropout_ratio: float,
                     align_corners: bool) -> FCNHead:
    """mmseg's FCN head in front of an OCR head (decode_head.0), or a ResNet auxiliary head.

    HRNet: 1x1 ConvModule C->C on the concatenated maps. ResNet: 3x3 ConvModule 1024->256 on layer3.
    """
    in_index, in_channels = spec.aux_input()
    common = dict(num_convs=1, concat_input=False, in_index=in_index, dropout_ratio=dropout_ratio,
                  align_corners=align_corners, out_stride=spec.stride_of(in_index))
    if spec.is_hrnet:
        return FCNHead(in_channels, in_channels, num_classes, kernel_size=1, **common)
    return FCNHead(in_channels, 256, num_classes, kernel_size=3, **common)


def aux_head(spec: FeatureSpec, num_classes: int, *, dropout_ratio: float | None,
             align_corners: bool) -> FCNHead | None:
    """mmseg's `auxiliary_head` of the ResNet baselines (FCN 1024->256, dropout 0.1, weight 0.4).
    The mmseg HRNet baselines have none."""
    if spec.is_hrnet:
        return None
    return soft_region_head(spec, num_classes, dropout_ratio=resolve_dropout(dropout_ratio, 0.1),
                            align_corners=align_corners)


def build_fcn(spec: FeatureSpec, num_classes: int, *, dropout_ratio: float | None = None,
              align_corners: bool = False) -> HeadSet:
    in_index, in_channels = spec.decode_input()
    stride = spec.stride_of(in_index)
    if spec.is_hrnet:
        head = FCNHead(in_channels, in_channels, num_classes, num_convs=1, kernel_size=1,
                       concat_input=False, in_index=in_index,
                       dropout_ratio=resolve_dropout(dropout_ratio, -1), align_corners=align_corners,
                       out_stride=stride)
    else:
        head = FCNHead(in_channels, 512, num_classes, num_convs=2, kernel_size=3, concat_input=True,
                       in_index=in_index, dropout_ratio=resolve_dropout(dropout_ratio, 0.1),
                       align_corners=align_corners, out_stride=stride)
    return HeadSet(head, aux_head(spec, num_classes, dropout_ratio=dropout_ratio, align_corners=align_corners))
