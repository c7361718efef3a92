"""Checkpoint loading and conversion: this project's format, mmsegmentation, HRNet-OCR, plain.

This project's models use mmsegmentation's module names, so a model's state_dict keys are
exactly those of the matching mmseg model (`backbone.*`, `decode_head.0.*` / `decode_head.1.*`
for OCRNet, `decode_head.*` and `auxiliary_head.*` for the other heads). Every source format
is therefore normalised to mmseg key names and then loaded key for key.

Formats read (detected from the content, never from the file name):

- ``ocr_cluster``: this project's checkpoint, ``{'format': 'ocr_cluster/v1', 'model':
  state_dict, 'meta': {...}}``. Training saves model state in this shape (`checkpoint_dict`,
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
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ocr_cluster import storage
from ocr_cluster.errors import UserInputError

FORMAT = "ocr_cluster/v1"

# Keys of ImageNet classification checkpoints that no segmentation backbone has.
CLASSIFIER_PREFIXES = ("fc.", "classifier.", "incre_modules.", "downsamp_modules.", "final_layer.", "head.")

_SHOWN = 10  # names listed per kind in an error message

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


@dataclass
class LoadResult:
    """What `load_checkpoint` did. In a strict load the three lists are empty."""

    format: str
    meta: dict = field(default_factory=dict)
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)


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


def _plain_meta(value: Any, depth: int = 0) -> Any:
    """The JSON-like part of a meta value (what weights_only can read back); the rest dropped."""
    if depth > 8:
        return None
    if value is None or type(value) in (bool, int, float, str):
        return value
    for kind in (bool, int, float, str):  # subclasses (torch's TorchVersion, IntEnum, ...)
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (list, tuple)):
        return [_plain_meta(v, depth + 1) for v in value]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            plain = _plain_meta(v, depth + 1)
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
        meta = _plain_meta(obj.get("meta") or {}) or {}
        fmt_hint = "mmseg"
    elif isinstance(obj, Mapping) and _is_state_dict(obj.get("model")):
        sd = obj["model"]  # e.g. {'model': state_dict, 'optimizer': ...}
    elif _is_state_dict(obj):
        sd = obj
    else:
        what = type(obj).__name__
        if isinstance(obj, Mapping):
            what += " with keys " + ", ".join(repr(k) for k in list(obj)[:_SHOWN])
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
            + ", ".join(unknown[:_SHOWN]) + (" ..." if len(unknown) > _SHOWN else "")
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


# ---------------------------------------------------------------------------------- loading


def _bare(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP-style `.module` wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _compare(target: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]):
    missing = [k for k in target if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in target]
    mismatched = [(k, tuple(sd[k].shape), tuple(target[k].shape))
                  for k in target if k in sd and tuple(sd[k].shape) != tuple(target[k].shape)]
    return missing, unexpected, mismatched


def _shown(items: list[str]) -> str:
    text = ", ".join(items[:_SHOWN])
    return text + (", ..." if len(items) > _SHOWN else "")


def mismatch_message(what: str, missing, unexpected, mismatched) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing [{_shown(missing)}]")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected [{_shown(unexpected)}]")
    if mismatched:
        shapes = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched]
        parts.append(f"{len(mismatched)} mis-shaped [{_shown(shapes)}]")
    return f"{what} does not fit the model: " + "; ".join(parts)


def load_state_dict_checked(module: nn.Module, sd: Mapping[str, torch.Tensor], *, strict: bool = True,
                            what: str = "checkpoint", check_only: bool = False) -> tuple[list, list, list]:
    """Copy `sd` into `module`; strict raises one CheckpointMismatchError listing every problem.

    Non-strict loads the keys present with the right shape and returns (missing, unexpected,
    mismatched). Missing `num_batches_tracked` buffers are never an error (old checkpoints
    lack them); they keep the model's value. `check_only`: the same checks, nothing copied.
    """
    target = module.state_dict()
    missing, unexpected, mismatched = _compare(target, sd)
    if strict and (missing or unexpected or mismatched):
        message = mismatch_message(what, missing, unexpected, mismatched)
        if sd and len(unexpected) == len(sd):  # no key in common: not weights of this kind of model at all
            message = (f"{what} is {NOT_LOADABLE}: none of its keys [{_shown(unexpected)}] is a weight of the "
                       f"model ({message.split(': ', 1)[1]})")
        raise CheckpointMismatchError(message, missing, unexpected, mismatched)
    if check_only:
        return missing, unexpected, mismatched
    bad = {k for k, _, _ in mismatched}
    usable = {k: v for k, v in sd.items() if k in target and k not in bad}
    module.load_state_dict(usable, strict=False)
    return missing, unexpected, mismatched


def _backbone_weights(sd: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    if fmt != "backbone":
        # A whole segmentor's checkpoint: take its backbone.
        return {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return {k: v for k, v in sd.items() if not k.startswith(CLASSIFIER_PREFIXES)}


def load_checkpoint(model: nn.Module, uri: str, *, strict: bool = True, backbone_only: bool = False,
                    map_location: Any = "cpu", check_only: bool = False) -> LoadResult:
    """Load the checkpoint at `uri` (path, file://, s3://, gs://) into `model`.

    Reads this project's format, mmsegmentation checkpoints, HRNet-OCR checkpoints (renamed,
    conv biases folded into BN) and plain state_dicts. With `backbone_only=True` it loads
    ImageNet backbone weights (MSRA HRNet, mmseg V1c ResNet; classifier keys ignored), or the
    backbone part of any segmentor checkpoint, into `model.backbone`, strict over the
    backbone's keys. A strict load that does not fit raises CheckpointMismatchError (a
    ValueError) naming the missing, unexpected and mis-shaped keys. `check_only`: every check,
    no weight copied (see `check_checkpoint`).
    """
    model = _bare(model)
    obj = read_checkpoint(uri, map_location=map_location)
    fmt, sd, meta = unpack_checkpoint(obj)
    if backbone_only:
        backbone = getattr(model, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise CheckpointError("backbone_only=True needs a model with a .backbone module")
        weights = _backbone_weights(sd, fmt)
        if not weights:
            raise CheckpointError(f"checkpoint {uri} ({fmt}) holds no backbone weights")
        missing, unexpected, mismatched = load_state_dict_checked(
            backbone, weights, strict=strict, what=f"backbone checkpoint {uri} ({fmt})", check_only=check_only)
        loaded = len(weights) - len(unexpected) - len(mismatched)
        return LoadResult(fmt, meta, loaded, missing, unexpected, mismatched)
    if fmt == "backbone":
        backbone = getattr(model, "backbone", None)
        if isinstance(backbone, nn.Module) and set(sd) & set(backbone.state_dict()):
            raise CheckpointError(
                f"checkpoint {uri} holds backbone (ImageNet) weights only, with no backbone./decode_head. "
                "keys; load it with backbone_only=True"
            )
        fmt = "state_dict"  # keys in no known layout: the strict check below names them
    missing, unexpected, mismatched = load_state_dict_checked(
        model, sd, strict=strict, what=f"checkpoint {uri} ({fmt})", check_only=check_only)
    loaded = len(sd) - len(unexpected) - len(mismatched)
    if fmt in ("hrnet_ocr", "hrnet_seg") and getattr(model, "align_corners", None) is False and not check_only:
        warnings.warn(f"{uri}: HRNet-Semantic-Segmentation weights were trained with align_corners=True "
                      "(OCRNET_SPEC.md §9.2); build the model with align_corners=True to reproduce them",
                      stacklevel=2)
    return LoadResult(fmt, meta, loaded, missing, unexpected, mismatched)


def check_checkpoint(model: nn.Module, uri: str, *, backbone_only: bool = False) -> str:
    """Whether `load_checkpoint(model, uri, backbone_only=...)` would succeed, without copying a weight, so
    `model` may live on the meta device (built under `torch.device("meta")`: no memory for its weights).
    Returns the checkpoint's format; raises the CheckpointError the load would raise."""
    return load_checkpoint(model, uri, backbone_only=backbone_only, check_only=True).format


# ------------------------------------------------------------------------------- writing


def checkpoint_dict(state_dict: Mapping[str, torch.Tensor] | nn.Module, meta: Mapping | None = None) -> dict:
    """This project's checkpoint object: {'format': 'ocr_cluster/v1', 'model': ..., 'meta': ...}.

    `state_dict` may be a module (its state_dict is taken, on CPU). `meta` keeps plain values
    only (what `torch.load(weights_only=True)` reads back).
    """
    if isinstance(state_dict, nn.Module):
        state_dict = _bare(state_dict).state_dict()
    sd = {k: v.detach().cpu() for k, v in state_dict.items()}
    return {"format": FORMAT, "model": sd, "meta": _plain_meta(dict(meta or {})) or {}}


def to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(state_dict: Mapping[str, torch.Tensor] | nn.Module, uri: str, meta: Mapping | None = None) -> str:
    """Write a project checkpoint to `uri` atomically (readers see all of it or nothing)."""
    return storage.write_bytes_atomic(uri, to_bytes(checkpoint_dict(state_dict, meta)))


def _model_from_spec(model_spec: Any) -> tuple[nn.Module | None, dict | None]:
    if model_spec is None:
        return None, None
    if isinstance(model_spec, nn.Module):
        return _bare(model_spec), None
    if isinstance(model_spec, Mapping):
        spec = dict(model_spec)
        try:
            backbone, head, num_classes = spec.pop("backbone"), spec.pop("head"), spec.pop("num_classes")
        except KeyError as exc:
            raise CheckpointError(f"model_spec needs backbone, head and num_classes (missing {exc})") from None
        from ocr_cluster.models import build_model

        model = build_model(backbone, head, int(num_classes), **spec)
        return model, {"backbone": backbone, "head": head, "num_classes": int(num_classes), **spec}
    raise CheckpointError(
        f"model_spec must be None, a dict(backbone=..., head=..., num_classes=..., **options) or a model, "
        f"not {type(model_spec).__name__}")


def convert_checkpoint(src_uri: str, dst_uri: str, model_spec: Any = None) -> dict:
    """Read an mmseg / HRNet-OCR / plain checkpoint, write it in this project's format.

    The source format is detected and recorded in meta ('source_format', 'source_uri', and the
    source's own meta as 'source_meta'). With `model_spec` (a dict for build_model or a model)
    the converted weights are first checked to fit that model strictly, and the spec is
    recorded as meta['model']. The file is written atomically. Returns the meta written.
    """
    obj = read_checkpoint(src_uri)
    fmt, sd, source_meta = unpack_checkpoint(obj)
    if fmt == "backbone":
        raise CheckpointError(
            f"{src_uri} holds backbone (ImageNet) weights only; it is loaded with "
            "load_checkpoint(..., backbone_only=True), not converted")
    model, spec = _model_from_spec(model_spec)
    if model is not None:
        missing, unexpected, mismatched = _compare(model.state_dict(), sd)
        if missing or unexpected or mismatched:
            raise CheckpointMismatchError(
                mismatch_message(f"converted checkpoint {src_uri} ({fmt})", missing, unexpected, mismatched),
                missing, unexpected, mismatched)
        if spec is None:
            spec = getattr(model, "spec", None)
    if fmt == "ocr_cluster":
        meta = dict(source_meta)
        meta.setdefault("source_format", "ocr_cluster")
    else:
        meta = {"source_format": fmt, "source_meta": source_meta}
        if fmt in ("hrnet_ocr", "hrnet_seg"):
            meta["source_align_corners"] = True  # how those weights were trained (OCRNET_SPEC.md §9.2)
    meta["source_uri"] = str(src_uri)
    meta["converted_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta["torch_version"] = str(torch.__version__)
    if spec is not None:
        meta["model"] = spec
    storage.write_bytes_atomic(dst_uri, to_bytes(checkpoint_dict(sd, meta)))
    return _plain_meta(meta)


__all__ = [
    "FORMAT",
    "CLASSIFIER_PREFIXES",
    "CheckpointError",
    "CheckpointMismatchError",
    "LoadResult",
    "checkpoint_dict",
    "convert_checkpoint",
    "fold_conv_bias_into_bn",
    "hrnet_ocr_to_mmseg",
    "hrnet_seg_to_mmseg",
    "load_checkpoint",
    "load_state_dict_checked",
    "read_checkpoint",
    "save_checkpoint",
    "unpack_checkpoint",
]
