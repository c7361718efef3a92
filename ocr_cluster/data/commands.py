"""Handlers of `ocr-cluster data convert | synth | inspect` (wired by ocr_cluster/cli.py).

    HELP                            action -> one-line help
    add_arguments(action, parser)   adds the arguments and the handler of one action to its argparse parser
    cmd_convert(args) -> int
    cmd_synth(args) -> int
    cmd_inspect(args) -> int

Bad input raises `ocr_cluster.data.DataError` (a ValueError) with a one-line message.
"""

from __future__ import annotations

import argparse
import json
import sys

from ocr_cluster import storage
from ocr_cluster.config import parse_size
from ocr_cluster.data import cards
from ocr_cluster.data.errors import DataError
from ocr_cluster.data.shards import DEFAULT_SHARD_MB, Manifest, manifest_uri
from ocr_cluster.errors import unknown_choice

HELP = {
    "convert": "convert an official dataset layout to Parquet shards",
    "synth": "write a learnable synthetic dataset",
    "inspect": "counts per split, class pixel histogram, image sizes, shard sizes",
}

CONVERT_HELP = {
    "variant": "pascal-context: 60 (default, background is a class) or 59 (background ignored); "
               "coco-stuff: 164k (default) or 10k",
}


def add_arguments(action: str, parser: argparse.ArgumentParser) -> None:
    """The arguments and handler of `ocr-cluster data ACTION`."""
    if action == "convert":
        parser.add_argument("dataset", choices=cards.CONVERTER_NAMES, help="source dataset (see datasets/<name>.yaml)")
        parser.add_argument("src", help="the dataset's directory in its official layout")
        parser.add_argument("dst", help="where to write the shards (s3://, gs://, file:// or a path)")
        parser.add_argument("--variant", default=None, help=CONVERT_HELP["variant"])
        parser.add_argument("--splits", default=None, metavar="A,B",
                            help="comma-separated splits to convert (default: train,val)")
        parser.add_argument("--sbd", default=None, metavar="DIR",
                            help="voc-aug: the raw SBD release (benchmark_RELEASE) instead of SegmentationClassAug/")
        parser.add_argument("--context", default=None, metavar="DIR",
                            help="pascal-context: the official trainval/*.mat labels instead of "
                                 "SegmentationClassContext/")
        _add_writer_args(parser)
        parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPUs, at most 8)")
        parser.add_argument("--limit", type=int, default=None, metavar="N",
                            help="convert only the first N samples of each split (a trial run)")
        parser.set_defaults(func=cmd_convert)
    elif action == "synth":
        parser.add_argument("dst", help="where to write the shards (s3://, gs://, file:// or a path)")
        parser.add_argument("--classes", type=int, default=6, help="number of classes, background included (6)")
        parser.add_argument("--num-train", type=int, default=256, help="training images (256)")
        parser.add_argument("--num-val", type=int, default=64, help="validation images (64)")
        parser.add_argument("--size", default="256x256", metavar="HxW", help="image size (256x256)")
        parser.add_argument("--seed", type=int, default=0, help="the dataset is a function of the seed (0)")
        parser.add_argument("--format", dest="image_format", choices=("png", "jpeg"), default="png",
                            help="image encoding (png)")
        _add_writer_args(parser)
        parser.set_defaults(func=cmd_synth)
    elif action == "inspect":
        parser.add_argument("uri", help="a dataset written by convert or synth")
        parser.add_argument("--json", action="store_true", help="print the report as JSON")
        parser.add_argument("--verify", action="store_true",
                            help="also read every shard back and check its size and checksum")
        parser.set_defaults(func=cmd_inspect)
    else:
        raise unknown_choice("data action", action, HELP)


def _add_writer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_MB,
                        help=f"target shard size in MB of encoded samples ({DEFAULT_SHARD_MB})")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already at DST")


def _summary(manifest: Manifest) -> str:
    parts = [f"{name} {split.num_samples} samples / {len(split.shards)} shards"
             for name, split in manifest.splits.items()]
    return f"wrote {manifest.dataset} ({manifest.num_classes} classes) to {manifest.uri}: " + ", ".join(parts)


def _reachable(dst: str) -> None:
    """An object store that does not answer, refuses the credentials or lacks the bucket: one line, before any work."""
    if not storage.is_remote(dst):
        return
    try:
        storage.exists(manifest_uri(dst))  # the writer's first request; raises where the store cannot be used
    except Exception as exc:  # noqa: BLE001 - endpoint, credentials: all one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise DataError(f"cannot reach {dst}: {type(exc).__name__}: {first}") from None
    bucket = storage.filesystem(dst)[1].split("/", 1)[0]
    if not storage.exists(f"{storage.scheme(dst)}://{bucket}"):
        raise DataError(f"bucket '{bucket}' of {dst} does not exist")


def cmd_convert(args: argparse.Namespace) -> int:
    from ocr_cluster.data.converters import convert

    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if getattr(args, "splits", None) else None
    if getattr(args, "sbd", None) and args.dataset != "voc-aug":
        raise DataError("--sbd applies to voc-aug only")
    if getattr(args, "context", None) and args.dataset != "pascal-context":
        raise DataError("--context applies to pascal-context only")
    _reachable(args.dst)
    manifest = convert(args.dataset, args.src, args.dst, variant=getattr(args, "variant", None), splits=splits,
                       shard_mb=getattr(args, "shard_mb", DEFAULT_SHARD_MB), workers=getattr(args, "workers", None),
                       overwrite=getattr(args, "overwrite", False), limit=getattr(args, "limit", None),
                       progress=sys.stderr.isatty(), sbd=getattr(args, "sbd", None),
                       context=getattr(args, "context", None))
    print(_summary(manifest))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from ocr_cluster.data.synth import SynthSpec, write_synthetic

    _reachable(args.dst)
    spec = SynthSpec(classes=getattr(args, "classes", 6), num_train=getattr(args, "num_train", 256),
                     num_val=getattr(args, "num_val", 64), size_hw=parse_size(getattr(args, "size", "256x256"), what="--size"),
                     seed=getattr(args, "seed", 0), image_format=getattr(args, "image_format", "png"))
    manifest = write_synthetic(args.dst, spec, shard_mb=getattr(args, "shard_mb", DEFAULT_SHARD_MB),
                               overwrite=getattr(args, "overwrite", False))
    print(_summary(manifest))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ocr_cluster.data.inspect import format_report, report

    rep = report(args.uri, verify=getattr(args, "verify", False))
    print(json.dumps(rep, indent=1) if getattr(args, "json", False) else format_report(rep))
    return 0
