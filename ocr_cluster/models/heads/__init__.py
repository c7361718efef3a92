"""Decode heads, one file per family. `HEAD_BUILDERS` maps each name of `names.HEADS` to a function
(FeatureSpec, num_classes, *, dropout_ratio, align_corners) -> HeadSet."""

from __future__ import annotations

from ocr_cluster.models.heads import aspp, fcn, isa, ocnet, ocr
from ocr_cluster.models.heads.base import DecodeHead, FeatureSpec, HeadSet
from ocr_cluster.models.names import HEADS

__all__ = ["DecodeHead", "FeatureSpec", "HeadSet", "HEAD_BUILDERS", "build_heads"]

HEAD_BUILDERS = {
    **ocr.BUILDERS,
    "fcn": fcn.build_fcn,
    **aspp.BUILDERS,
    **isa.BUILDERS,
    **ocnet.BUILDERS,
}

if set(HEAD_BUILDERS) != set(HEADS):  # keep names.py and the builders in step
    raise ImportError(f"head builders {sorted(HEAD_BUILDERS)} do not match names.HEADS {sorted(HEADS)}")


def build_heads(name: str, spec: FeatureSpec, num_classes: int, *, dropout_ratio: float | None = None,
                align_corners: bool = False) -> HeadSet:
    if name not in HEAD_BUILDERS:
        raise ValueError(f"unknown head {name!r}; valid: {', '.join(HEADS)}")
    return HEAD_BUILDERS[name](spec, num_classes, dropout_ratio=dropout_ratio, align_corners=align_corners)
