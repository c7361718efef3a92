"""Checkpoints into and out of models: loading (strict, or the backbone only), writing this project's
format, and converting other formats into it.

Which formats are read, and how each is normalised to mmseg's key names, is in
`checkpoint_formats` (its docstring lists them); this module loads the normalised state_dict into
a model key for key. Nothing is downloaded: every checkpoint comes from a URI the user gives.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ocr_cluster import storage
from ocr_cluster.models.checkpoint_formats import (
    FORMAT,
    NOT_LOADABLE,
    SHOWN,
    CheckpointError,
    CheckpointMismatchError,
    plain_meta,
    fold_conv_bias_into_bn,
    hrnet_ocr_to_mmseg,
    hrnet_seg_to_mmseg,
    read_checkpoint,
    unpack_checkpoint,
)

# Keys of ImageNet classification checkpoints that no segmentation backbone has.
CLASSIFIER_PREFIXES = ("fc.", "classifier.", "incre_modules.", "downsamp_modules.", "final_layer.", "head.")


@dataclass
class LoadResult:
    """What `load_checkpoint` did. In a strict load the three lists are empty."""

    format: str
    meta: dict = field(default_factory=dict)
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)


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
    text = ", ".join(items[:SHOWN])
    return text + (", ..." if len(items) > SHOWN else "")


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
    return {"format": FORMAT, "model": sd, "meta": plain_meta(dict(meta or {})) or {}}


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
    return plain_meta(meta)


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
