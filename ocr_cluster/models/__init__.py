"""Pure-PyTorch model zoo (no mmcv / mmseg), parameter- and state_dict-compatible with
mmsegmentation for the models mmseg has.

    from ocr_cluster.models import build_model
    model = build_model("hrnetv2_w48", "ocr", num_classes=19)
    model.eval(); logits = model(images)              # (B, K, H, W), resized to the input
    model.train(); outs = model(images)               # {'decode': ..., 'aux': ...} at feature size
    model.loss_weights                                # {'decode': 1.0, 'aux': 0.4}
    model.output_stride, model.output_strides         # 4 / 8 / 16; per train-output key

Names: `names.BACKBONES` x `names.HEADS`. What each (backbone, head) reproduces:
`references.REFERENCES`; the 11 mmseg 1.2.2 reference models: `references.MMSEG_REFERENCE_MODELS`.

The torch-dependent names are imported lazily, so `ocr_cluster.models.names` (used by config
validation and the CLI) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ocr_cluster.models.names import BACKBONES, HEADS
from ocr_cluster.models.references import MMSEG_REFERENCE_MODELS, REFERENCES, Reference, references_for

if TYPE_CHECKING:  # pragma: no cover
    from ocr_cluster.models.backbones import pretrained_alias
    from ocr_cluster.models.convert import CheckpointError, convert_checkpoint, load_checkpoint
    from ocr_cluster.models.segmentor import (Segmentor, build_model, convert_sync_batchnorm, count_params,
                                              output_stride)

_LAZY = {
    "Segmentor": "ocr_cluster.models.segmentor",
    "build_model": "ocr_cluster.models.segmentor",
    "convert_sync_batchnorm": "ocr_cluster.models.segmentor",
    "count_params": "ocr_cluster.models.segmentor",
    "output_stride": "ocr_cluster.models.segmentor",
    "pretrained_alias": "ocr_cluster.models.backbones",
    "load_checkpoint": "ocr_cluster.models.convert",
    "convert_checkpoint": "ocr_cluster.models.convert",
    "CheckpointError": "ocr_cluster.models.convert",
}

__all__ = [
    "BACKBONES",
    "HEADS",
    "MMSEG_REFERENCE_MODELS",
    "REFERENCES",
    "Reference",
    "references_for",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
