"""ISA head (interlaced sparse self-attention), mmseg `ISAHead` (mmseg/models/decode_heads/isa_head.py,
configs/_base_/models/isanet_r50-d8.py: channels 512, isa_channels 256, down_factor (8, 8), dropout 0.1).

`in_conv` ConvModule(in->512, 3x3); pad to multiples of the down factor (split between both sides);
global relation: attention within each group of pixels sharing the same offset inside the 8x8 cells
(long range); local relation: attention within each 8x8 cell; crop; `out_conv`
ConvModule(1024->512, 1x1) on cat[x, residual]; cls_seg.

Each relation is mmseg's ISA SelfAttentionBlock: query/key 2 x ConvModule 512->256, value a plain
biased conv 512->512 (no norm), no out projection, then `output_project` ConvModule 512->512.
ResNet models carry mmseg's auxiliary FCN head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ocr_cluster.models.heads.base import DecodeHead, FeatureSpec, HeadSet, resolve_dropout
from ocr_cluster.models.heads.fcn import aux_head
from ocr_cluster.models.layers import ConvModule, SelfAttentionBlock

__all__ = ["ISAHead", "ISARelation", "BUILDERS"]


class ISARelation(SelfAttentionBlock):
    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__(in_channels, in_channels, channels, in_channels, share_key_query=False,
                         key_query_num_convs=2, value_out_num_convs=1, key_query_norm=True,
                         value_out_norm=False, matmul_norm=True, with_out=False)
        self.output_project = ConvModule(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.output_project(super().forward(x, x))


class ISAHead(DecodeHead):
    def __init__(self, in_channels: int, channels: int, num_classes: int, *, isa_channels: int = 256,
                 down_factor: tuple[int, int] = (8, 8), **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.down_factor = tuple(down_factor)
        self.in_conv = ConvModule(in_channels, channels, 3)
        self.global_relation = ISARelation(channels, isa_channels)
        self.local_relation = ISARelation(channels, isa_channels)
        self.out_conv = ConvModule(channels * 2, channels, 1)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = self.in_conv(self._transform_inputs(inputs))
        residual = x
        n, c, h, w = x.shape
        loc_h, loc_w = self.down_factor
        glb_h, glb_w = math.ceil(h / loc_h), math.ceil(w / loc_w)
        pad_h, pad_w = glb_h * loc_h - h, glb_w * loc_w - w
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        # global relation: pixels with the same offset inside the loc_h x loc_w cells
        x = x.reshape(n, c, glb_h, loc_h, glb_w, loc_w).permute(0, 3, 5, 1, 2, 4)
        x = self.global_relation(x.reshape(-1, c, glb_h, glb_w))
        # local relation: the pixels of one cell
        x = x.reshape(n, loc_h, loc_w, c, glb_h, glb_w).permute(0, 4, 5, 3, 1, 2)
        x = self.local_relation(x.reshape(-1, c, loc_h, loc_w))
        # back to (n, c, H, W)
        x = x.reshape(n, glb_h, glb_w, c, loc_h, loc_w).permute(0, 3, 1, 4, 2, 5)
        x = x.reshape(n, c, glb_h * loc_h, glb_w * loc_w)
        if pad_h > 0 or pad_w > 0:
            x = x[:, :, pad_h // 2:pad_h // 2 + h, pad_w // 2:pad_w // 2 + w]
        return self.cls_seg(self.out_conv(torch.cat([x, residual], dim=1)))


def build_isa(spec: FeatureSpec, num_classes: int, *, dropout_ratio: float | None = None,
              align_corners: bool = False) -> HeadSet:
    in_index, in_channels = spec.decode_input()
    head = ISAHead(in_channels, 512, num_classes, isa_channels=256, down_factor=(8, 8), in_index=in_index,
                   dropout_ratio=resolve_dropout(dropout_ratio, 0.1), align_corners=align_corners,
                   out_stride=spec.stride_of(in_index))
    return HeadSet(head, aux_head(spec, num_classes, dropout_ratio=dropout_ratio, align_corners=align_corners))


BUILDERS = {"isa": build_isa}
