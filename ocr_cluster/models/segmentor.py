"""The segmentor: backbone + decode head(s) (+ auxiliary head), as mmseg's EncoderDecoder /
CascadeEncoderDecoder, with mmseg's state_dict layout:

- `backbone.*`
- cascade models (every OCR variant): `decode_head.0.*` (FCN soft-region head, loss weight 0.4) and
  `decode_head.1.*` (final head);
- single-head models: `decode_head.*` and, for the ResNet baselines, `auxiliary_head.*` (FCN, 0.4).

Forward:
- eval mode: `model(images)` -> final logits bilinearly resized to the input size (B, K, H, W), using
  the final head's align_corners: mmseg's `encode_decode` in whole mode. For a cascade: backbone ->
  FCN head -> final head(features, soft-region logits) -> resize.
- train mode: `model(images)` -> {'decode': final logits, 'aux': auxiliary / soft-region logits} at
  feature resolution (no 'aux' when the model has none). `model.loss_weights` gives each key's loss
  weight ({'decode': 1.0, 'aux': 0.4}) and `model.output_strides` its stride. As mmseg's
  CascadeEncoderDecoder, a cascade runs the FCN head twice in training: once for its own loss ('aux')
  and once more to produce the soft regions fed (not detached) to the final head; the two differ when
  the FCN head has dropout. `recompute_soft_regions=False` reuses the first pass instead.
"""

from __future__ import annotations

import torch
from torch import nn

from ocr_cluster.models.backbones import build_backbone
from ocr_cluster.models.heads import build_heads
from ocr_cluster.models.heads.base import FeatureSpec, HeadSet
from ocr_cluster.models.layers import resize
from ocr_cluster.models.names import BACKBONES, HEADS

__all__ = ["Segmentor", "build_model", "convert_sync_batchnorm", "count_params", "output_stride"]


class Segmentor(nn.Module):
    def __init__(self, backbone: nn.Module, heads: HeadSet, *, backbone_name: str = "", head_name: str = "",
                 num_classes: int, align_corners: bool = False, norm: str = "bn",
                 recompute_soft_regions: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = heads.decode
        self.auxiliary_head = heads.aux
        self.cascade = heads.cascade
        self.backbone_name = backbone_name
        self.head_name = head_name
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.norm = norm  # 'syncbn': convert with convert_sync_batchnorm when running under DDP
        self.recompute_soft_regions = recompute_soft_regions

        aux = self.decode_head[0] if self.cascade else self.auxiliary_head
        self.loss_weights: dict[str, float] = {"decode": 1.0}
        self.output_strides: dict[str, int] = {"decode": self.final_head.out_stride}
        if aux is not None:
            self.loss_weights["aux"] = heads.aux_weight
            self.output_strides["aux"] = aux.out_stride
        self.output_stride: int = self.final_head.out_stride

    @property
    def final_head(self) -> nn.Module:
        return self.decode_head[-1] if self.cascade else self.decode_head

    @property
    def name(self) -> str:
        return f"{self.head_name}_{self.backbone_name}"

    def forward(self, images: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        feats = self.backbone(images)
        aux = None
        if self.cascade:
            aux = self.decode_head[0](feats)
            regions = self.decode_head[0](feats) if (self.training and self.recompute_soft_regions) else aux
            out = self.decode_head[1](feats, regions)
        else:
            out = self.decode_head(feats)
            if self.training and self.auxiliary_head is not None:
                aux = self.auxiliary_head(feats)
        if self.training:
            outs = {"decode": out}
            if aux is not None:
                outs["aux"] = aux
            return outs
        return resize(out, images.shape[2:], self.final_head.align_corners)

    def extra_repr(self) -> str:
        return (f"name={self.name}, num_classes={self.num_classes}, output_stride={self.output_stride}, "
                f"loss_weights={self.loss_weights}")


NORMS = ("syncbn", "bn")
OPTIONS = ("align_corners", "dropout_ratio", "norm", "aux_weight", "recompute_soft_regions")


def build_model(backbone: str, head: str, num_classes: int, **options) -> Segmentor:
    """Build backbone + head(s) for `num_classes` classes.

    Options:
      align_corners (False): bilinear align_corners of the heads' resize_concat / decoder resizes, the
        final resize, and HRNet's fusion upsampling (True = the HRNet-OCR / openseg recipes).
      dropout_ratio (None): dropout before every classifier of the model; None = each head's default
        (mmseg's per config; <= 0 disables).
      norm ('syncbn'): recorded on the model; layers are always nn.BatchNorm2d. Call
        `convert_sync_batchnorm(model)` under DDP when it is 'syncbn'.
      aux_weight (0.4): loss weight of the auxiliary / soft-region head.
      recompute_soft_regions (True): in training, run a cascade's FCN head a second time for the
        soft regions, as mmseg does.
    Raises ValueError for unknown names or options.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)}; valid: {', '.join(OPTIONS)}")
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; valid: {', '.join(HEADS)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    norm = options.get("norm", "syncbn")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    align_corners = bool(options.get("align_corners", False))
    dropout_ratio = options.get("dropout_ratio")

    net = build_backbone(backbone, align_corners=align_corners)
    spec = FeatureSpec(tuple(net.out_channels), tuple(net.out_strides), net.family)
    heads = build_heads(head, spec, num_classes, dropout_ratio=dropout_ratio, align_corners=align_corners)
    if options.get("aux_weight") is not None:
        heads.aux_weight = float(options["aux_weight"])
    return Segmentor(net, heads, backbone_name=backbone, head_name=head, num_classes=num_classes,
                     align_corners=align_corners, norm=norm,
                     recompute_soft_regions=bool(options.get("recompute_soft_regions", True)))


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm*d with SyncBatchNorm (for DDP); returns the converted model."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once); buffers excluded."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def output_stride(backbone: str, head: str) -> int:
    """Stride of the final logits w.r.t. the input for (backbone, head), without allocating weights."""
    with torch.device("meta"):
        return build_model(backbone, head, num_classes=2).output_stride
