"""Handlers of `ocr-cluster models list | info` (wired in cli.py).

- `cmd_list(args)`: every backbone x head with its parameter count, output stride and the published
  models / seed-table rows it corresponds to. Optional args: `num_classes` (default 19), `backbone`,
  `head` (filters), `json` (one JSON object per line instead of a table).
- `cmd_info(args)`: one model: parameters (total / backbone / heads), multiply-accumulates at
  `args.size` ('HxW', default 512x1024), output strides, loss weights, references. Optional args:
  `num_classes` (default 19), `json`.

Compute is counted with `torch.utils.flop_counter.FlopCounterMode` on the meta device (no weights are
allocated, so even HRNet-W48 at 1024x2048 takes about a second): convolutions and matrix products
(including the attention matmuls), batch 1, eval mode. Reported as GMACs, which is what mmcv's
`get_model_complexity_info` / mmseg's tools/analysis_tools/get_flops.py print under the name
"GFLOPs" (mmcv additionally counts BN / ReLU / pooling / upsampling elements and skips matmuls), and
as GFLOPs = 2 x GMACs (fvcore / torch.utils.flop_counter convention).
"""

from __future__ import annotations

import argparse
import json
import sys

from ocr_cluster.config import parse_size
from ocr_cluster.errors import UserInputError, unknown_choice

__all__ = ["HELP", "add_arguments", "cmd_convert", "cmd_info", "cmd_list", "count_macs"]

DEFAULT_NUM_CLASSES = 19
DEFAULT_SIZE = "512x1024"


def _num_classes(args: argparse.Namespace) -> int:
    value = getattr(args, "num_classes", None)
    if value is None:
        return DEFAULT_NUM_CLASSES
    try:
        value = int(value)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise UserInputError(f"bad num_classes {getattr(args, 'num_classes', None)!r}: expected a positive integer")
    return value


def _check_names(backbone: str | None, head: str | None) -> None:
    from ocr_cluster.models.names import BACKBONES, HEADS

    if backbone is not None and backbone not in BACKBONES:
        raise UserInputError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
    if head is not None and head not in HEADS:
        raise UserInputError(f"unknown head {head!r}; valid: {', '.join(HEADS)}")


def _meta_model(backbone: str, head: str, num_classes: int):
    import torch

    from ocr_cluster.models.segmentor import build_model

    with torch.device("meta"):
        return build_model(backbone, head, num_classes)


def count_macs(model, size: tuple[int, int]) -> dict[str, int]:
    """Multiply-accumulates of one eval-mode forward at batch 1 (meta device), by aten op."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.empty(1, 3, *size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return {str(op).replace("aten.", ""): int(flops) // 2 for op, flops in counter.get_flop_counts()["Global"].items()}


def _params(model) -> dict[str, int]:
    from ocr_cluster.models.segmentor import count_params

    total = count_params(model)
    backbone = count_params(model.backbone)
    return {"total": total, "backbone": backbone, "heads": total - backbone}


def _reference_summary(backbone: str, head: str) -> str:
    from ocr_cluster.models.references import MMSEG_REFERENCE_MODELS, references_for

    parts = [f"mmseg {key} (exact keys)" for key, (b, h, _) in MMSEG_REFERENCE_MODELS.items()
             if (b, h) == (backbone, head)]
    for ref in references_for(backbone, head):
        seed = f"seed {ref.seed}" if ref.seed else ref.source
        parts.append(f"{seed}: {ref.rows}" + ("" if ref.exact else " [close variant]"))
    return "; ".join(parts)


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)


def cmd_list(args: argparse.Namespace) -> int:
    from ocr_cluster.models.names import BACKBONES, HEADS

    num_classes = _num_classes(args)
    only_backbone = getattr(args, "backbone", None)
    only_head = getattr(args, "head", None)
    _check_names(only_backbone, only_head)
    import torch

    from ocr_cluster.models.backbones import build_backbone
    from ocr_cluster.models.heads import build_heads
    from ocr_cluster.models.heads.base import FeatureSpec

    rows = []
    for backbone in BACKBONES:
        if only_backbone and backbone != only_backbone:
            continue
        # One backbone per row group and the heads alone: the same counts as build_model, faster.
        with torch.device("meta"):
            net = build_backbone(backbone)
        spec = FeatureSpec(tuple(net.out_channels), tuple(net.out_strides), net.family)
        backbone_params = sum(p.numel() for p in net.parameters())
        for head in HEADS:
            if only_head and head != only_head:
                continue
            with torch.device("meta"):
                heads = build_heads(head, spec, num_classes)
            head_params = sum(p.numel() for m in (heads.decode, heads.aux) if m is not None
                              for p in m.parameters())
            final = heads.decode[-1] if heads.cascade else heads.decode
            rows.append(dict(backbone=backbone, head=head, params=backbone_params + head_params,
                             output_stride=final.out_stride,
                             aux_head="soft-region FCN" if heads.cascade else (
                                 "FCN" if heads.aux is not None else ""),
                             reproduces=_reference_summary(backbone, head)))
    if getattr(args, "json", False):
        for row in rows:
            print(json.dumps(row))
        return 0

    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"ocr_cluster model zoo ({num_classes} classes)")
    for name, justify in (("backbone", "left"), ("head", "left"), ("params (M)", "right"), ("OS", "right"),
                          ("aux", "left"), ("reproduces", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for row in rows:
        table.add_row(row["backbone"], row["head"], f"{row['params'] / 1e6:.2f}", str(row["output_stride"]),
                      row["aux_head"], escape(row["reproduces"] or "-"))
    _console().print(table)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ocr_cluster.models.backbones import pretrained_alias
    from ocr_cluster.models.references import references_for

    backbone, head = getattr(args, "backbone", None), getattr(args, "head", None)
    if backbone is None or head is None:
        raise UserInputError("models info needs a backbone and a head")
    _check_names(backbone, head)
    num_classes = _num_classes(args)
    size = parse_size(getattr(args, "size", None) or DEFAULT_SIZE, square=True)
    model = _meta_model(backbone, head, num_classes)
    params = _params(model)
    macs = count_macs(model, size)
    total_macs = sum(macs.values())
    info = dict(
        backbone=backbone, head=head, num_classes=num_classes, size=f"{size[0]}x{size[1]}",
        params=params, gmacs=total_macs / 1e9, gflops_2x=2 * total_macs / 1e9,
        gmacs_by_op={k: v / 1e9 for k, v in macs.items()},
        output_stride=model.output_stride, output_strides=model.output_strides,
        loss_weights=model.loss_weights, cascade=model.cascade,
        pretrained_backbone=pretrained_alias(backbone),
        references=[ref.__dict__ for ref in references_for(backbone, head)],
    )
    if getattr(args, "json", False):
        print(json.dumps(info))
        return 0

    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{head} on {backbone}, {num_classes} classes", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("params", f"{params['total']:,} ({params['total'] / 1e6:.2f} M): backbone "
                            f"{params['backbone']:,}, heads {params['heads']:,}")
    table.add_row(f"GMACs @ {info['size']}",
                  f"{info['gmacs']:.2f}  (= mmcv/mmseg get_flops 'GFLOPs'; conv + matmul MACs, batch 1)")
    table.add_row("GFLOPs (2 x MACs)", f"{info['gflops_2x']:.2f}  (fvcore / torch.utils.flop_counter)")
    table.add_row("GMACs by op", ", ".join(f"{k} {v:.2f}" for k, v in info["gmacs_by_op"].items()))
    table.add_row("output stride", f"{model.output_stride} (per output: "
                                   + ", ".join(f"{k} {v}" for k, v in model.output_strides.items()) + ")")
    table.add_row("loss weights", ", ".join(f"{k} {v}" for k, v in model.loss_weights.items()))
    table.add_row("structure", "cascade: decode_head.0 (soft regions) -> decode_head.1" if model.cascade
                  else "decode_head" + (" + auxiliary_head" if model.auxiliary_head is not None else ""))
    table.add_row("ImageNet weights", info["pretrained_backbone"])
    table.add_row("reproduces", escape(_reference_summary(backbone, head) or "-"))
    _console().print(table)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """mmseg / HRNet-OCR / plain checkpoint -> this project's format, written atomically."""
    from ocr_cluster.models.convert import convert_checkpoint

    spec = None
    if args.backbone or args.head:
        if not (args.backbone and args.head and args.num_classes):
            raise UserInputError("to check the weights against a model give --backbone, --head and --num-classes")
        _check_names(args.backbone, args.head)
        spec = {"backbone": args.backbone, "head": args.head, "num_classes": _num_classes(args)}
    meta = convert_checkpoint(args.src, args.dst, model_spec=spec)
    print(f"{args.src} ({meta.get('source_format')}) -> {args.dst}")
    return 0


HELP = {
    "list": "every backbone x head with its parameter count, output stride and the seed rows it reproduces",
    "info": "parameters, GMACs at a size and output stride of one model",
    "convert": "convert an mmseg / HRNet-OCR checkpoint to this project's format",
}


def add_arguments(action: str, p: argparse.ArgumentParser) -> None:
    """Add the arguments of `ocr-cluster models <action>` and its handler to `p`."""
    if action == "list":
        p.add_argument("--backbone", help="only this backbone")
        p.add_argument("--head", help="only this head")
        p.add_argument("--num-classes", type=int, default=DEFAULT_NUM_CLASSES, help="classes (default 19)")
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        p.set_defaults(func=cmd_list)
    elif action == "info":
        p.add_argument("--backbone", required=True)
        p.add_argument("--head", required=True)
        p.add_argument("--num-classes", type=int, default=DEFAULT_NUM_CLASSES, help="classes (default 19)")
        p.add_argument("--size", default=DEFAULT_SIZE, metavar="HxW", help="input size for GMACs (default 512x1024)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_info)
    elif action == "convert":
        p.add_argument("src", metavar="SRC", help="source checkpoint URI (path, file://, s3://, gs://)")
        p.add_argument("dst", metavar="DST", help="destination URI")
        p.add_argument("--backbone", help="check the weights fit this model strictly (with --head, --num-classes)")
        p.add_argument("--head")
        p.add_argument("--num-classes", type=int)
        p.set_defaults(func=cmd_convert)
    else:
        raise unknown_choice("models action", action, HELP)
