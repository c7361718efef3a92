"""Small building blocks shared by the backbones and heads (pure PyTorch, no mmcv).

Attribute names follow mmcv / mmsegmentation so that state_dict keys match mmseg checkpoints:

- `ConvModule`: `conv` (+ `bn`) (+ `activate`, no parameters), as mmcv's ConvModule with BN + ReLU.
- `DepthwiseSeparableConvModule`: `depthwise_conv` and `pointwise_conv`, both ConvModules, as mmcv's.
- `SelfAttentionBlock`: `key_project`, `query_project`, `value_project`, `out_project`, as
  mmseg/models/utils/self_attention_block.py.

Norm layers are always plain `nn.BatchNorm2d` (eps 1e-5, momentum 0.1); convert them with
`torch.nn.SyncBatchNorm.convert_sync_batchnorm` under DDP (see `convert_sync_batchnorm`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvModule",
    "DepthwiseSeparableConvModule",
    "SelfAttentionBlock",
    "resize",
    "kaiming_init",
    "constant_init",
    "normal_init",
]


def resize(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize to `size` (H, W); a no-op when the size already matches."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def kaiming_init(module: nn.Module) -> None:
    """mmcv's default conv init: Kaiming normal, fan_out, ReLU gain; bias 0."""
    nn.init.kaiming_normal_(module.weight, a=0, mode="fan_out", nonlinearity="relu")
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def constant_init(module: nn.Module, value: float, bias: float = 0.0) -> None:
    if getattr(module, "weight", None) is not None:
        nn.init.constant_(module.weight, value)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def normal_init(module: nn.Module, std: float = 0.01) -> None:
    nn.init.normal_(module.weight, 0.0, std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class ConvModule(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU, as mmcv's ConvModule(norm_cfg=BN, act_cfg=ReLU).

    `padding=None` means "same" padding for odd kernels: dilation * (kernel_size // 2). The conv has
    no bias when followed by a norm layer (mmcv's bias='auto').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1,
                 norm: bool = True, act: bool = True, bias: bool | None = None) -> None:
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size // 2)
        if bias is None:
            bias = not norm
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.activate = nn.ReLU(inplace=True) if act else None
        kaiming_init(self.conv)
        if self.bn is not None:
            constant_init(self.bn, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x


class DepthwiseSeparableConvModule(nn.Module):
    """Depthwise ConvModule (groups = in_channels) then pointwise 1x1 ConvModule, both with BN + ReLU,
    as mmcv's DepthwiseSeparableConvModule with its defaults."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, dilation: int = 1) -> None:
        super().__init__()
        self.depthwise_conv = ConvModule(in_channels, in_channels, kernel_size, stride=stride,
                                         padding=padding, dilation=dilation, groups=in_channels)
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


def _project(in_channels: int, channels: int, num_convs: int, use_conv_module: bool) -> nn.Module:
    """mmseg's SelfAttentionBlock.build_project: 1x1 ConvModules (or plain biased convs); one conv is
    returned bare, several as a Sequential."""
    make = (lambda i, o: ConvModule(i, o, 1)) if use_conv_module else (lambda i, o: nn.Conv2d(i, o, 1))
    convs = [make(in_channels, channels)] + [make(channels, channels) for _ in range(num_convs - 1)]
    return convs[0] if len(convs) == 1 else nn.Sequential(*convs)


class SelfAttentionBlock(nn.Module):
    """Generic key/query/value attention, as mmseg's `SelfAttentionBlock` (no down-sampling).

    query (B, HWq, C) x key (B, C, HWk) -> softmax over keys (scaled by channels^-0.5 when
    `matmul_norm`) -> x value (B, HWk, Cv) -> (B, Cv, Hq, Wq) -> out_project (when `with_out`).

    When `out_project` is a plain conv (value_out_norm=False) it is zero-initialised, as mmseg does
    (this is also OCNet's zero-initialised `W`).
    """

    def __init__(self, key_in_channels: int, query_in_channels: int, channels: int, out_channels: int,
                 *, share_key_query: bool = False, key_query_num_convs: int = 2,
                 value_out_num_convs: int = 1, key_query_norm: bool = True, value_out_norm: bool = True,
                 matmul_norm: bool = True, with_out: bool = True) -> None:
        super().__init__()
        if share_key_query and key_in_channels != query_in_channels:
            raise ValueError("share_key_query needs key_in_channels == query_in_channels")
        self.channels = channels
        self.out_channels = out_channels
        self.matmul_norm = matmul_norm
        self.key_project = _project(key_in_channels, channels, key_query_num_convs, key_query_norm)
        if share_key_query:
            self.query_project = self.key_project
        else:
            self.query_project = _project(query_in_channels, channels, key_query_num_convs, key_query_norm)
        self.value_project = _project(key_in_channels, channels if with_out else out_channels,
                                      value_out_num_convs, value_out_norm)
        self.out_project = (_project(channels, out_channels, value_out_num_convs, value_out_norm)
                            if with_out else None)
        if self.out_project is not None and not isinstance(self.out_project, ConvModule):
            for m in self.out_project.modules():
                if isinstance(m, nn.Conv2d):
                    constant_init(m, 0.0)

    def forward(self, query_feats: torch.Tensor, key_feats: torch.Tensor) -> torch.Tensor:
        b = query_feats.shape[0]
        query = self.query_project(query_feats)
        query = query.reshape(b, query.shape[1], -1).permute(0, 2, 1)          # (B, HWq, C)
        key = self.key_project(key_feats)
        key = key.reshape(b, key.shape[1], -1)                                  # (B, C, HWk)
        value = self.value_project(key_feats)
        value = value.reshape(b, value.shape[1], -1).permute(0, 2, 1)          # (B, HWk, Cv)
        sim = torch.matmul(query, key)
        if self.matmul_norm:
            sim = sim * (self.channels ** -0.5)
        sim = F.softmax(sim, dim=-1)
        context = torch.matmul(sim, value)                                      # (B, HWq, Cv)
        context = context.permute(0, 2, 1).contiguous().reshape(b, -1, *query_feats.shape[2:])  # as mmseg: same fp32 sums
        if self.out_project is not None:
            context = self.out_project(context)
        return context
