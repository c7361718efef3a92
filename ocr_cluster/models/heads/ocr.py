"""OCR heads: mmseg OCRNet and the openseg-group/mmsegmentation and openseg variants.

Every model here is a cascade (mmseg CascadeEncoderDecoder, `decode_head.0` / `decode_head.1`): an FCN
soft-object-region head (loss weight 0.4, `heads.fcn.soft_region_head`) whose raw logits feed the
second head.

- `ocr`: mmseg `OCRHead` (mmseg/models/decode_heads/ocr_head.py): `bottleneck` ConvModule(in->512,
  3x3) -> `spatial_gather_module` (softmax over pixels of the soft-region logits, region features
  (B, 512, K, 1)) -> `object_context_block` (ObjectAttentionBlock: query/key 2x ConvModule 512->256,
  value ConvModule 512->256, out ConvModule 256->512, fusion `bottleneck` ConvModule(1024->512, 1x1)
  on cat[context, feats]) -> cls_seg. Dropout: HRNet none (-1), ResNet 0.1, in both heads.
- `ocr_dropout`: "OCRNet (w/ dropout)" of openseg-group/mmsegmentation: the same modules with
  dropout 0.1 in both heads (that row was also trained with align_corners=True; pass it).
- `ocr_sepconv`: "OCRNet (replace the 1x1 Conv (fusion) with 3x3 SepDepthWiseConv)"
  (`use_sep_conv=True` at openseg-group/mmsegmentation fcd3fb2): `bottleneck` becomes
  DepthwiseSeparableConvModule(in->512, 3x3) and the fusion DepthwiseSeparableConvModule(1024->512, 3x3).
- `ocrplus`, `ocrplus_sepdecoder`, `ocrplus_sepconv`: OCRNetPlus (`OCRPlusHead`), an OCR head followed
  by a DeepLabV3+-style decoder: `c1_bottleneck` ConvModule(c1->48, 1x1) on backbone map 0 (ResNet
  layer1), the OCR output resized to it and concatenated (512+48), `fuse_bottleneck` = 2 x 3x3 convs
  to 512, dropout 0.1, cls_seg.
  * `ocrplus` ("OCRNetPlus"): plain ConvModules (bottleneck 3x3, fuse_bottleneck 2 x 3x3), 1x1 fusion;
  * `ocrplus_sepdecoder` ("OCRNetPlus (Decoder w/ SepDepthWiseConv)"): bottleneck and fuse_bottleneck
    separable, 1x1 fusion (`use_sep_conv=False`);
  * `ocrplus_sepconv` ("OCRNetPlus (OCR & Decoder w/ SepDepthWiseConv)"): also the fusion separable
    (`use_sep_conv=True`).
- `asp_ocr`: openseg.pytorch ASP-OCR (`SpatialOCR_ASP_Module`) in mmseg style (ConvModules without
  bias; openseg's convs carry a bias and use InPlaceABN): 5 parallel branches on the backbone features
  - `context_conv` ConvModule(in->256, 3x3) -> object context (ObjectAttentionBlock 256, key 128, no
  fusion: the context alone) and `aspp_modules` (1x1 and three 3x3 dilated, rates 12/24/36 at stride 8)
  - concatenated (1280) -> `bottleneck` ConvModule(1280->256, 1x1) -> dropout 0.1 -> cls_seg.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ocr_cluster.models.heads.base import (DecodeHead, FeatureSpec, HeadSet, aspp_dilations,
                                           resolve_dropout)
from ocr_cluster.models.heads.fcn import soft_region_head
from ocr_cluster.models.layers import ConvModule, DepthwiseSeparableConvModule, SelfAttentionBlock, resize

__all__ = [
    "ASPOCRHead",
    "OCRHead",
    "OCRPlusHead",
    "ObjectAttentionBlock",
    "SpatialGatherModule",
    "BUILDERS",
]


class SpatialGatherModule(nn.Module):
    """Object region representations: softmax over pixels of each class's logits, then a weighted sum
    of the pixel features. feats (B, C, H, W), probs (B, K, H, W) -> (B, C, K, 1). No parameters."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, feats: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        b, k = probs.shape[:2]
        c = feats.shape[1]
        probs = F.softmax(self.scale * probs.reshape(b, k, -1), dim=2)      # (B, K, HW)
        feats = feats.reshape(b, c, -1).permute(0, 2, 1)                      # (B, HW, C)
        context = torch.matmul(probs, feats)                                  # (B, K, C)
        return context.permute(0, 2, 1).unsqueeze(3)                          # (B, C, K, 1)


class ObjectAttentionBlock(SelfAttentionBlock):
    """mmseg's ObjectAttentionBlock (scale 1): pixel queries attend to the K region features.

    fusion='conv1x1' (mmseg): ConvModule(2C->C, 1x1) on cat[context, query_feats];
    fusion='sepconv3x3': DepthwiseSeparableConvModule(2C->C, 3x3); fusion=None: the context alone
    (openseg's SpatialOCR_Context, used by ASP-OCR).
    """

    def __init__(self, in_channels: int, channels: int, fusion: str | None = "conv1x1") -> None:
        super().__init__(in_channels, in_channels, channels, in_channels, share_key_query=False,
                         key_query_num_convs=2, value_out_num_convs=1, key_query_norm=True,
                         value_out_norm=True, matmul_norm=True, with_out=True)
        if fusion == "conv1x1":
            self.bottleneck = ConvModule(in_channels * 2, in_channels, 1)
        elif fusion == "sepconv3x3":
            self.bottleneck = DepthwiseSeparableConvModule(in_channels * 2, in_channels, 3)
        elif fusion is None:
            self.bottleneck = None
        else:
            raise ValueError(f"unknown OCR fusion {fusion!r}; valid: conv1x1, sepconv3x3, None")

    def forward(self, query_feats: torch.Tensor, key_feats: torch.Tensor) -> torch.Tensor:
        context = super().forward(query_feats, key_feats)
        if self.bottleneck is None:
            return context
        return self.bottleneck(torch.cat([context, query_feats], dim=1))


class OCRHead(DecodeHead):
    """mmseg OCRHead (cascade stage 2): forward(inputs, prev_output) with prev_output the soft-region
    logits (B, K, H, W) at the same resolution as the selected features."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, ocr_channels: int = 256,
                 sep_conv: bool = False, **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.object_context_block = ObjectAttentionBlock(
            channels, ocr_channels, fusion="sepconv3x3" if sep_conv else "conv1x1")
        self.spatial_gather_module = SpatialGatherModule(1)
        self.bottleneck = (DepthwiseSeparableConvModule(in_channels, channels, 3) if sep_conv
                           else ConvModule(in_channels, channels, 3))

    def forward(self, inputs: list[torch.Tensor], prev_output: torch.Tensor) -> torch.Tensor:
        x = self._transform_inputs(inputs)
        feats = self.bottleneck(x)
        context = self.spatial_gather_module(feats, prev_output)
        return self.cls_seg(self.object_context_block(feats, context))


class OCRPlusHead(DecodeHead):
    """OCRNetPlus (openseg-group/mmsegmentation `OCRPlusHead`): OCR head + DeepLabV3+-style decoder."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, c1_in_channels: int,
                 c1_channels: int = 48, ocr_channels: int = 256, sep_decoder: bool = False,
                 sep_fusion: bool = False, **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        conv3 = DepthwiseSeparableConvModule if sep_decoder else ConvModule
        self.object_context_block = ObjectAttentionBlock(
            channels, ocr_channels, fusion="sepconv3x3" if sep_fusion else "conv1x1")
        self.spatial_gather_module = SpatialGatherModule(1)
        self.bottleneck = conv3(in_channels, channels, 3)
        self.fuse_bottleneck = nn.Sequential(conv3(channels + c1_channels, channels, 3),
                                             conv3(channels, channels, 3))
        self.c1_bottleneck = ConvModule(c1_in_channels, c1_channels, 1)

    def forward(self, inputs: list[torch.Tensor], prev_output: torch.Tensor) -> torch.Tensor:
        x = self._transform_inputs(inputs)
        feats = self.bottleneck(x)
        context = self.spatial_gather_module(feats, prev_output)
        output = self.object_context_block(feats, context)
        c1 = self.c1_bottleneck(inputs[0])
        output = torch.cat([resize(output, c1.shape[2:], self.align_corners), c1], dim=1)
        return self.cls_seg(self.fuse_bottleneck(output))


class ASPOCRHead(DecodeHead):
    """ASP-OCR (openseg `SpatialOCR_ASP_Module`): object context + ASPP branches, concatenated."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, hidden_channels: int = 256,
                 dilations: tuple[int, ...] = (12, 24, 36), **kwargs) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.context_conv = ConvModule(in_channels, hidden_channels, 3)
        self.object_context_block = ObjectAttentionBlock(hidden_channels, hidden_channels // 2, fusion=None)
        self.spatial_gather_module = SpatialGatherModule(1)
        self.aspp_modules = nn.ModuleList(
            [ConvModule(in_channels, hidden_channels, 1)]
            + [ConvModule(in_channels, hidden_channels, 3, dilation=d) for d in dilations])
        self.bottleneck = ConvModule(hidden_channels * (len(dilations) + 2), channels, 1)

    def forward(self, inputs: list[torch.Tensor], prev_output: torch.Tensor) -> torch.Tensor:
        x = self._transform_inputs(inputs)
        feats = self.context_conv(x)
        context = self.spatial_gather_module(feats, prev_output)
        outs = [self.object_context_block(feats, context)] + [m(x) for m in self.aspp_modules]
        return self.cls_seg(self.bottleneck(torch.cat(outs, dim=1)))


# ---------------------------------------------------------------------------------------------
# builders: (FeatureSpec, num_classes, dropout_ratio override, align_corners) -> HeadSet


def _cascade(spec: FeatureSpec, num_classes: int, final: DecodeHead, soft_dropout: float,
             align_corners: bool) -> HeadSet:
    soft = soft_region_head(spec, num_classes, dropout_ratio=soft_dropout, align_corners=align_corners)
    return HeadSet(nn.ModuleList([soft, final]), cascade=True)


def _ocr(spec: FeatureSpec, num_classes: int, dropout_ratio: float | None, align_corners: bool, *,
         default_dropout: float, sep_conv: bool) -> HeadSet:
    drop = resolve_dropout(dropout_ratio, default_dropout)
    in_index, in_channels = spec.decode_input()
    head = OCRHead(in_channels, 512, num_classes, ocr_channels=256, sep_conv=sep_conv, in_index=in_index,
                   dropout_ratio=drop, align_corners=align_corners, out_stride=spec.stride_of(in_index))
    return _cascade(spec, num_classes, head, drop, align_corners)


def build_ocr(spec: FeatureSpec, num_classes: int, *, dropout_ratio: float | None = None,
              align_corners: bool = False) -> HeadSet:
    return _ocr(spec, num_classes, dropout_ratio, align_corners,
                default_dropout=-1 if spec.is_hrnet else 0.1, sep_conv=False)


def build_ocr_dropout(spec: FeatureSpec, num_classes: int, *, dropout_ratio: float | None = None,
                      align_corners: bool = False) -> HeadSet:
    return _ocr(spec, num_classes, dropout_ratio, align_corners, default_dropout=0.1, sep_conv=False)


def build_ocr_sepconv(spec: FeatureSpec, num_classes: int, *, dropout_ratio: float | None = None,
                      align_corners: bool = False) -> HeadSet:
    return _ocr(spec, num_classes, dropout_ratio, align_corners,
                default_dropout=-1 if spec.is_hrnet else 0.1, sep_conv=True)


def _ocrplus(spec: FeatureSpec, num_classes: int, dropout_ratio: float | None, align_corners: bool, *,
             sep_decoder: bool, sep_fusion: bool) -> HeadSet:
    drop = resolve_dropout(dropout_ratio, 0.1)
    in_index, in_channels = spec.decode_input()
    head = OCRPlusHead(in_channels, 512, num_classes, c1_in_channels=spec.channels[0], c1_channels=48,
                       ocr_channels=256, sep_decoder=sep_decoder, sep_fusion=sep_fusion,
                       in_index=in_index, dropout_ratio=drop, align_corners=align_corners,
                       out_stride=spec.strides[0])
    return _cascade(spec, num_classes, head, drop, align_corners)


def build_ocrplus(spec: FeatureSpec, num_classes: int, *, dropout_ratio: float | None = None,
                  align_corners: bool = False) -> HeadSet:
    return _ocrplus(spec, num_classes, dropout_ratio, align_corners, sep_decoder=False, sep_fusion=False)


def build_ocrplus_sepdecoder(spec: FeatureSpec, num_classes: int, *, dropout_ratio: float | None = None,
                             align_corners: bool = False) -> HeadSet:
    return _ocrplus(spec, num_classes, dropout_ratio, align_corners, sep_decoder=True, sep_fusion=False)


def build_ocrplus_sepconv(spec: FeatureSpec, num_classes: int, *, dropout_ratio: float | None = None,
                          align_corners: bool = False) -> HeadSet:
    return _ocrplus(spec, num_classes, dropout_ratio, align_corners, sep_decoder=True, sep_fusion=True)


def build_asp_ocr(spec: FeatureSpec, num_classes: int, *, dropout_ratio: float | None = None,
                  align_corners: bool = False) -> HeadSet:
    in_index, in_channels = spec.decode_input()
    stride = spec.stride_of(in_index)
    head = ASPOCRHead(in_channels, 256, num_classes, hidden_channels=256, dilations=aspp_dilations(stride),
                      in_index=in_index, dropout_ratio=resolve_dropout(dropout_ratio, 0.1),
                      align_corners=align_corners, out_stride=stride)
    soft_drop = resolve_dropout(dropout_ratio, -1 if spec.is_hrnet else 0.1)
    return _cascade(spec, num_classes, head, soft_drop, align_corners)


BUILDERS = {
    "ocr": build_ocr,
    "ocr_dropout": build_ocr_dropout,
    "ocr_sepconv": build_ocr_sepconv,
    "ocrplus": build_ocrplus,
    "ocrplus_sepdecoder": build_ocrplus_sepdecoder,
    "ocrplus_sepconv": build_ocrplus_sepconv,
    "asp_ocr": build_asp_ocr,
}
