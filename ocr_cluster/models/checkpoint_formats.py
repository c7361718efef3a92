"""What a checkpoint file holds: reading it, telling its format, and its state_dict in mmseg key names.

This project's models use mmsegmentation's module names, so a model's state_dict keys are
exactly those of the matching mmseg model (`backbone.*`, `decode_head.0.*` / `decode_head.1.*`
for OCRNet, `decode_head.*` and `auxiliary_head.*` for the other heads). Every source format
is therefore normalised to mmseg key names and then loaded key for key.

Formats read (detected from the content, never from the file name):

- ``ocr_cluster``: this project's checkpoint, ``{'format': 'ocr_cluster/v1', 'model':
  state_dict, 'meta': {...}}``. Training saves model state in this shape (`convert.checkpoint_dict`,
  `save_checkpoint`); `meta` holds plain Python values only (str, int, float, bool, None,
  lists and dicts of them), so that ``torch.load(weights_only=True)`` reads it back.
- ``mmseg``: ``{'state_dict': ..., 'meta': ...}`` as mmsegmentation / mmengine save it
  (a ``module.`` prefix from DDP is stripped).
- ``hrnet_ocr``: HRNet/HRNet-Semantic-Segmentation (branch HRNet-OCR) checkpoints, a plain
  state_dict of ``FullModel`` (keys ``model.*``, maybe ``loss.criterion.weight``) or
  ``{'state_dict': ...}`` from its tools/train.py. Keys are renamed to mmseg's OCRNet names
  and the biases of ``aux_head.0`` and ``conv3x3_ocr.0`` are folded into the BN that follows
  (running_mean -= bias: exact, OCRNET_SPEC.md §9.2). The same repo's plain HRNet
  segmentation checkpoints (``last_layer.*``) map to mmseg's FCN-on-HRNet head
  (``hrnet_seg``).
- ``state_dict``: a plain state_dict already in mmseg/project names.
- ``backbone``: ImageNet backbone weights for ``backbone_only=True``: MSRA HRNet ImageNet
  checkpoints and mmseg's V1c ResNets (``open-mmlab://resnet50_v1c``), keys without the
  ``backbone.`` prefix; classifier-only keys (``fc.``, ``classifier.``, ``incre_modules.``,
  ``downsamp_modules.``, ``final_layer.``) are ignored.

openseg.pytorch checkpoints are recognised and refused: their InPlaceABN leaky-ReLU heads and
3x3 aux head cannot be mapped onto the mmseg architecture (OCRNET_SPEC.md §9.3).

Nothing is downloaded: every checkpoint comes from a URI the user gives (a path, file://,
s3:// or gs://, read through `ocr_cluster.storage`).
"""

from __future__ import annotations

import io
import os
import re
from typing import Any, Mapping

import torch

from ocr_cluster import storage
from ocr_cluster.errors import UserInputError

FORMAT = "ocr_cluster/v1"

SHOWN = 10  # names listed per kind in an error message

# What torch.save writes starts with one of these: a zip archive, or (the legacy format) a pickle.
ZIP_MAGIC, PICKLE_MAGIC = b"PK\x03\x04", b"\x80"
NOT_LOADABLE = "not a checkpoint this project, mmseg or HRNet-OCR can load"


class CheckpointError(UserInputError):
    """A checkpoint that cannot be read or used; the message is one line meant for the user."""


class CheckpointMismatchError(CheckpointError):
    """A strict load whose keys or shapes do not fit the model.

    `missing`, `unexpected` and `mismatched` hold the full lists; the message lists up to ten
    of each with the counts.
    """

    def __init__(self, message: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple, tuple]]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


# ------------------------------------------------------------------------------------ reading


def read_checkpoint(uri: str, map_location: Any = "cpu") -> Any:
    """`torch.load(weights_only=True)` of the object at `uri` (path, file://, s3://, gs://)."""
    if storage.scheme(uri) == "file":
        path = storage.local_path(uri)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint not found: {uri}")
        with open(path, "rb") as handle:
            head = handle.read(len(ZIP_MAGIC))
        source: Any = path
    else:
        fs, path = storage.filesystem(uri)
        try:
            with fs.open(path, "rb") as handle:
                source = io.BytesIO(handle.read())
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint not found: {uri}") from None
        head = source.getvalue()[:len(ZIP_MAGIC)]
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):  # before torch, whose own error advises unsafe loading
        raise CheckpointError(f"cannot read checkpoint {uri}: {NOT_LOADABLE} (neither a zip archive nor a pickle, "
                              "the two formats torch.save writes)")
    return _torch_load(source, uri, map_location)


def _torch_load(source: Any, uri: str, map_location: Any) -> Any:
    safe = _numpy_safe_globals()
    try:
        if safe and hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals(safe):
                return torch.load(source, map_location=map_location, weights_only=True)
        return torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError, zip errors, ...
        reason = _torch_reason(exc)
        hint = ("; a checkpoint holding Python objects besides tensors and plain values must be re-saved with "
                "only its state_dict") if "global" in reason.lower() else ""
        raise CheckpointError(f"cannot read checkpoint {uri}: {NOT_LOADABLE} (torch.load(weights_only=True) "
                              f"refused it: {reason}{hint})") from None


def _torch_reason(exc: Exception) -> str:
    """The first sentence of torch's error, without its advice to load unsafely or to allowlist classes."""
    text = str(exc)
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text, re.S)
    lines = [line.strip() for line in (detail.group(1) if detail else text).splitlines() if line.strip()]
    kept = [line for line in lines if "weights_only" not in line]
    return re.split(r"(?<=[^.])\.(?:\s|$)", kept[0])[0] if kept else type(exc).__name__


def _numpy_safe_globals() -> list:
    """numpy scalars / arrays that mmengine puts in checkpoint meta, allowed for weights_only."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    out: list = [np.ndarray, np.dtype]
    try:
        from numpy.core.multiarray import _reconstruct, scalar  # numpy < 2 pickles name these
        out += [_reconstruct, scalar]
    except ImportError:  # pragma: no cover
        pass
    try:
        from numpy._core.multiarray import _reconstruct as r2, scalar as s2  # numpy >= 2
        out += [r2, s2]
    except ImportError:  # pragma: no cover
        pass
    out += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "bool", "uint8")]
    return out


# ------------------------------------------------------------------------------ normalising


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop `prefix` from every key when every key has it."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def plain_meta(value: Any, depth: int = 0) -> Any:
    """The JSON-like part of a meta value (what weights_only can read back); the rest dropped."""
    if depth > 8:
        return None
    if value is None or type(value) in (bool, int, float, str):
        return value
    for kind in (bool, int, float, str):  # subclasses (torch's TorchVersion, IntEnum, ...)
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (list, tuple)):
        return [plain_meta(v, depth + 1) for v in value]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            plain = plain_meta(v, depth + 1)
            if plain is not None or v is None:
                out[str(k)] = plain
        return out
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return None


_OPENSEG_MARKERS = ("spatial_ocr_head.", "spatial_context_head.", "dsn_head.", "ocr_distri_head.")


def _kind_of_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    keys = list(sd)
    if any(k.startswith(("model.conv3x3_ocr.", "model.ocr_distri_head.", "model.aux_head.")) for k in keys):
        return "hrnet_ocr"
    if any(k.startswith("model.last_layer.") for k in keys):
        return "hrnet_seg"
    if any(k.startswith(("backbone.", "decode_head.", "auxiliary_head.")) for k in keys):
        if any(m in k for k in keys for m in _OPENSEG_MARKERS) and not any(
            k.startswith("decode_head.") for k in keys
        ):
            return "openseg"
        return "state_dict"
    if any(m in k for k in keys for m in _OPENSEG_MARKERS):
        return "openseg"
    return "backbone"


def unpack_checkpoint(obj: Any) -> tuple[str, dict[str, torch.Tensor], dict]:
    """(source format, state_dict in mmseg/project key names, meta) of a loaded checkpoint.

    For the 'backbone' format the state_dict keeps its keys as they are (no `backbone.`).
    """
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT and _is_state_dict(obj.get("model")):
        return "ocr_cluster", _strip_prefix(obj["model"], "module."), dict(obj.get("meta") or {})
    if isinstance(obj, Mapping) and isinstance(obj.get("format"), str) and str(obj["format"]).startswith("ocr_cluster/"):
        raise CheckpointError(f"checkpoint format {obj['format']!r} is not supported by this version "
                              f"(it reads {FORMAT!r})")
    meta: dict = {}
    fmt_hint = None
    if isinstance(obj, Mapping) and _is_state_dict(obj.get("state_dict")):
        sd = obj["state_dict"]
        meta = plain_meta(obj.get("meta") or {}) or {}
        fmt_hint = "mmseg"
    elif isinstance(obj, Mapping) and _is_state_dict(obj.get("model")):
        sd = obj["model"]  # e.g. {'model': state_dict, 'optimizer': ...}
    elif _is_state_dict(obj):
        sd = obj
    else:
        what = type(obj).__name__
        if isinstance(obj, Mapping):
            what += " with keys " + ", ".join(repr(k) for k in list(obj)[:SHOWN])
        raise CheckpointError(f"no state_dict found in the checkpoint (a {what})")
    sd = _strip_prefix(sd, "module.")
    if any(k.startswith(("conv3x3_ocr.", "last_layer.")) for k in sd) and any(k.startswith("stage4.") for k in sd):
        # HRNet-Semantic-Segmentation weights with `model.` already stripped (its tools/test.py does that).
        sd = {("" if k.startswith("loss.") else "model.") + k: v for k, v in sd.items()}
    kind = _kind_of_state_dict(sd)
    if kind == "openseg":
        raise CheckpointError(
            "openseg.pytorch checkpoints are not supported: their InPlaceABN (leaky-ReLU) heads "
            "and 3x3 aux head do not map onto the mmseg OCRNet layout (OCRNET_SPEC.md §9.3)"
        )
    if kind == "hrnet_ocr":
        return "hrnet_ocr", hrnet_ocr_to_mmseg(sd), meta
    if kind == "hrnet_seg":
        return "hrnet_seg", hrnet_seg_to_mmseg(sd), meta
    if kind == "state_dict":
        return fmt_hint or "state_dict", sd, meta
    return "backbone", sd, meta


# ----------------------------------------------------------------------- HRNet-OCR mapping

_HR_BACKBONE = re.compile(r"^(conv1|bn1|conv2|bn2|layer1|transition\d|stage\d)\.")

_HR_OCR_HEAD = [
    # (HRNet-OCR prefix after `model.`, mmseg prefix)
    ("aux_head.0.", "decode_head.0.convs.0.conv."),
    ("aux_head.1.", "decode_head.0.convs.0.bn."),
    ("aux_head.3.", "decode_head.0.conv_seg."),
    ("conv3x3_ocr.0.", "decode_head.1.bottleneck.conv."),
    ("conv3x3_ocr.1.", "decode_head.1.bottleneck.bn."),
    ("ocr_distri_head.object_context_block.f_pixel.0.", "decode_head.1.object_context_block.query_project.0.conv."),
    ("ocr_distri_head.object_context_block.f_pixel.1.0.", "decode_head.1.object_context_block.query_project.0.bn."),
    ("ocr_distri_head.object_context_block.f_pixel.2.", "decode_head.1.object_context_block.query_project.1.conv."),
    ("ocr_distri_head.object_context_block.f_pixel.3.0.", "decode_head.1.object_context_block.query_project.1.bn."),
    ("ocr_distri_head.object_context_block.f_object.0.", "decode_head.1.object_context_block.key_project.0.conv."),
    ("ocr_distri_head.object_context_block.f_object.1.0.", "decode_head.1.object_context_block.key_project.0.bn."),
    ("ocr_distri_head.object_context_block.f_object.2.", "decode_head.1.object_context_block.key_project.1.conv."),
    ("ocr_distri_head.object_context_block.f_object.3.0.", "decode_head.1.object_context_block.key_project.1.bn."),
    ("ocr_distri_head.object_context_block.f_down.0.", "decode_head.1.object_context_block.value_project.conv."),
    ("ocr_distri_head.object_context_block.f_down.1.0.", "decode_head.1.object_context_block.value_project.bn."),
    ("ocr_distri_head.object_context_block.f_up.0.", "decode_head.1.object_context_block.out_project.conv."),
    ("ocr_distri_head.object_context_block.f_up.1.0.", "decode_head.1.object_context_block.out_project.bn."),
    ("ocr_distri_head.conv_bn_dropout.0.", "decode_head.1.object_context_block.bottleneck.conv."),
    ("ocr_distri_head.conv_bn_dropout.1.0.", "decode_head.1.object_context_block.bottleneck.bn."),
    ("cls_head.", "decode_head.1.conv_seg."),
]
# conv (mmseg prefix) whose bias is folded into the BN (mmseg prefix) that follows it.
_HR_OCR_FOLD = [
    ("decode_head.0.convs.0.conv.", "decode_head.0.convs.0.bn."),
    ("decode_head.1.bottleneck.conv.", "decode_head.1.bottleneck.bn."),
]

_HR_SEG_HEAD = [
    ("last_layer.0.", "decode_head.convs.0.conv."),
    ("last_layer.1.", "decode_head.convs.0.bn."),
    ("last_layer.3.", "decode_head.conv_seg."),
]
_HR_SEG_FOLD = [("decode_head.convs.0.conv.", "decode_head.convs.0.bn.")]


def fold_conv_bias_into_bn(conv_bias: torch.Tensor, running_mean: torch.Tensor) -> torch.Tensor:
    """The BN running_mean that makes (bias-free conv -> BN) equal (conv with bias -> BN).

    BN(conv(x) + b) = gamma (conv(x) + b - mu) / sqrt(var + eps) + beta, so mu' = mu - b.
    Exact in eval mode; in training mode the batch mean absorbs the bias either way.
    """
    if conv_bias.shape != running_mean.shape:
        raise CheckpointError(f"cannot fold a conv bias of shape {tuple(conv_bias.shape)} into a BN "
                              f"running_mean of shape {tuple(running_mean.shape)}")
    return running_mean.to(torch.float64).sub(conv_bias.to(torch.float64)).to(running_mean.dtype)


def _rename_hrnet(sd: Mapping[str, torch.Tensor], head_map, folds, fmt: str) -> dict[str, torch.Tensor]:
    sd = _strip_prefix(sd, "module.")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key.startswith("loss."):  # FullModel's criterion (class weights)
            continue
        if not key.startswith("model."):
            unknown.append(key)
            continue
        name = key[len("model."):]
        if _HR_BACKBONE.match(name):
            out["backbone." + name] = value
            continue
        for src, dst in head_map:
            if name.startswith(src):
                out[dst + name[len(src):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{fmt} checkpoint has {len(unknown)} key(s) with no mmseg equivalent: "
            + ", ".join(unknown[:SHOWN]) + (" ..." if len(unknown) > SHOWN else "")
        )
    for conv, bn in folds:
        bias = out.pop(conv + "bias", None)
        if bias is None:
            continue
        if bn + "running_mean" not in out:
            raise CheckpointError(f"{fmt} checkpoint has {conv}bias but no {bn}running_mean to fold it into")
        out[bn + "running_mean"] = fold_conv_bias_into_bn(bias, out[bn + "running_mean"])
    return out


def hrnet_ocr_to_mmseg(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HRNet-Semantic-Segmentation (HRNet-OCR) state_dict -> mmseg OCRNet names, biases folded."""
    return _rename_hrnet(sd, _HR_OCR_HEAD, _HR_OCR_FOLD, "HRNet-OCR")


def hrnet_seg_to_mmseg(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HRNet-Semantic-Segmentation (FCN `last_layer`) state_dict -> mmseg FCN-on-HRNet names."""
    return _rename_hrnet(sd, _HR_SEG_HEAD, _HR_SEG_FOLD, "HRNet-Seg")
