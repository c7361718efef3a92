"""`ocr-cluster data inspect`: what a sharded dataset holds, from its manifest (and, with verify, its shards).

    report(uri, verify=False) -> dict       # JSON-ready
    format_report(report) -> str            # the human-readable text
"""

from __future__ import annotations

from typing import Any

from ocr_cluster.data.errors import DataError
from ocr_cluster.data.shards import read_manifest, read_shard


def report(uri: str, *, verify: bool = False) -> dict[str, Any]:
    """Counts per split, class pixel histogram, image size range, shard sizes.

    With `verify`, every shard is read back and checked (size, SHA-256, Parquet, row count); the
    first failure raises a DataError naming the shard.
    """
    manifest = read_manifest(uri)
    splits: dict[str, Any] = {}
    for name, split in manifest.splits.items():
        labelled = sum(split.class_pixels)
        total = labelled + split.ignore_pixels
        sizes = [s.num_bytes for s in split.shards]
        if verify:
            for shard in split.shards:
                read_shard(manifest, shard, verify="sha256", columns=["key"])
        splits[name] = {
            "samples": split.num_samples,
            "shards": len(split.shards),
            "bytes": sum(sizes),
            "shard_bytes": {"min": min(sizes, default=0), "max": max(sizes, default=0),
                            "mean": (sum(sizes) // len(sizes)) if sizes else 0},
            "height": {"min": split.height_range[0], "max": split.height_range[1]},
            "width": {"min": split.width_range[0], "max": split.width_range[1]},
            "image_formats": dict(split.image_formats),
            "class_pixels": {cls: int(n) for cls, n in zip(manifest.classes, split.class_pixels)},
            "class_fraction": {cls: (n / labelled if labelled else 0.0)
                               for cls, n in zip(manifest.classes, split.class_pixels)},
            "ignore_pixels": split.ignore_pixels,
            "ignore_fraction": split.ignore_pixels / total if total else 0.0,
            "absent_classes": [cls for cls, n in zip(manifest.classes, split.class_pixels) if n == 0],
        }
    return {"uri": manifest.uri, "name": manifest.name, "dataset": manifest.dataset,
            "num_classes": manifest.num_classes, "classes": manifest.classes, "palette": manifest.palette,
            "img_scale": manifest.img_scale, "crop_size": manifest.crop_size, "source": manifest.source,
            "created_at": manifest.created_at, "created_by": manifest.created_by, "verified": verify,
            "splits": splits}


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def format_report(rep: dict[str, Any], top: int = 12) -> str:
    lines = [f"{rep['uri']}: dataset {rep['dataset']}, {rep['num_classes']} classes"
             + (" (shards verified)" if rep.get("verified") else ""),
             f"  source: {rep['source'] or '-'}; created {rep['created_at'] or '-'} by {rep['created_by']}"]
    if rep.get("img_scale"):
        lines.append(f"  card defaults: img_scale {rep['img_scale'][0]}x{rep['img_scale'][1]} (WxH), "
                     f"crop {rep['crop_size'][0]}x{rep['crop_size'][1]} (HxW)")
    for name, split in rep["splits"].items():
        sb = split["shard_bytes"]
        lines.append(f"  {name}: {split['samples']} samples in {split['shards']} shards, {_mb(split['bytes'])} "
                     f"(shards {_mb(sb['min'])} .. {_mb(sb['max'])})")
        lines.append(f"    image size: height {split['height']['min']}..{split['height']['max']}, "
                     f"width {split['width']['min']}..{split['width']['max']}; formats "
                     + ", ".join(f"{k} {v}" for k, v in split["image_formats"].items()))
        ranked = sorted(split["class_fraction"].items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{cls} {frac * 100:.1f}%" for cls, frac in ranked[:top])
        more = f", ... ({len(ranked) - top} more)" if len(ranked) > top else ""
        lines.append(f"    class pixels: {shown}{more}; ignore {split['ignore_fraction'] * 100:.1f}% of all pixels")
        if split["absent_classes"]:
            absent = split["absent_classes"]
            lines.append(f"    absent classes ({len(absent)}): {', '.join(absent[:top])}"
                         + (", ..." if len(absent) > top else ""))
    return "\n".join(lines)


__all__ = ["DataError", "format_report", "report"]
