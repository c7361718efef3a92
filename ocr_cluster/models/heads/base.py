"""Base decode head and the description of backbone features the heads are built from.

`DecodeHead` mirrors mmseg's BaseDecodeHead: `conv_seg` (1x1 classifier, created first so that it
leads the head's state_dict as in mmseg) with optional `dropout` (Dropout2d) before it, and
`_transform_inputs` selecting the input: one backbone map (`in_index` int) or the `resize_concat` of
several (`in_index` tuple: resize all to the first one's size, bilinear with the head's
align_corners, concatenate in order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ocr_cluster.models.layers import normal_init, resize

__all__ = ["DecodeHead", "FeatureSpec", "HeadSet", "aspp_dilations", "resolve_dropout"]

InIndex = int | tuple[int, ...]


@dataclass(frozen=True)
class FeatureSpec:
    """What a backbone returns: channels and strides of its 4 maps, and its family."""

    channels: tuple[int, ...]
    strides: tuple[int, ...]
    family: str  # 'hrnet' or 'resnet'

    @property
    def is_hrnet(self) -> bool:
        return self.family == "hrnet"

    def decode_input(self) -> tuple[InIndex, int]:
        """(in_index, in_channels) of a main head: HRNet resize_concat of all maps; ResNet layer4."""
        if self.is_hrnet:
            return tuple(range(len(self.channels))), sum(self.channels)
        return 3, self.channels[3]

    def aux_input(self) -> tuple[InIndex, int]:
        """(in_index, in_channels) of mmseg's auxiliary / soft-region FCN head."""
        if self.is_hrnet:
            return self.decode_input()
        return 2, self.channels[2]

    def stride_of(self, in_index: InIndex) -> int:
        return self.strides[in_index[0] if isinstance(in_index, tuple) else in_index]


class HeadSet:
    """What a head builder returns: the decode head(s) and an optional auxiliary head.

    `cascade=True` means `decode` is a ModuleList [soft-region FCN head, final head] run as mmseg's
    CascadeEncoderDecoder (the first head's logits feed the second); otherwise `decode` is a single
    head and `aux` (if any) is mmseg's `auxiliary_head`.
    """

    def __init__(self, decode: nn.Module, aux: nn.Module | None = None, cascade: bool = False,
                 aux_weight: float = 0.4) -> None:
        self.decode = decode
        self.aux = aux
        self.cascade = cascade
        self.aux_weight = aux_weight


def resolve_dropout(override: float | None, default: float) -> float:
    """The dropout of a classifier: the model-wide override if given, else the head's default."""
    return default if override is None else float(override)


def aspp_dilations(stride: int, base: Sequence[int] = (12, 24, 36)) -> tuple[int, ...]:
    """Atrous rates for features at `stride`: mmseg's (12, 24, 36) at stride 8, scaled by 8 / stride
    ((6, 12, 18) at 16, (24, 48, 72) at 4 as openseg's HRNet ASP-OCR)."""
    return tuple(max(1, d * 8 // stride) for d in base)


class DecodeHead(nn.Module):
    """mmseg BaseDecodeHead: input selection + `cls_seg` (dropout -> conv_seg)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, in_index: InIndex,
                 dropout_ratio: float = 0.1, align_corners: bool = False, out_stride: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.channels = channels
        self.num_classes = num_classes
        self.in_index = in_index
        self.align_corners = align_corners
        self.dropout_ratio = dropout_ratio
        self.out_stride = out_stride  # stride of this head's logits w.r.t. the input image
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        normal_init(self.conv_seg, std=0.01)

    def _transform_inputs(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        if isinstance(self.in_index, tuple):
            picked = [inputs[i] for i in self.in_index]
            size = picked[0].shape[2:]
            return torch.cat([resize(x, size, self.align_corners) for x in picked], dim=1)
        return inputs[self.in_index]

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)
