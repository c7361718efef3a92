"""Converters from the official layouts of the seeds' six datasets to Parquet shards.

    convert(name, src, dst, variant=None, splits=None, shard_mb=256, workers=None, overwrite=False,
            limit=None, sbd=None, context=None) -> Manifest

name is a converter name (cityscapes, ade20k, voc-aug, pascal-context, coco-stuff, lip); the
variant picks pascal-context 60|59 and coco-stuff 164k|10k (see datasets/<name>.yaml). Labels are
read in their official encoding and stored as train ids (255 = ignore) by the card's label_map /
reduce_zero_label; sample keys are the source file stems. Images are stored byte for byte.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ocr_cluster.data import cards
from ocr_cluster.data.converters.common import write_dataset
from ocr_cluster.data.errors import DataError
from ocr_cluster.data.shards import DEFAULT_SHARD_MB, Manifest

MODULES = {"cityscapes": "cityscapes", "ade20k": "ade20k", "voc-aug": "voc_aug",
           "pascal-context": "pascal_context", "coco-stuff": "coco_stuff", "lip": "lip"}


def convert(name: str, src: str, dst: str, *, variant: str | None = None, splits: list[str] | None = None,
            shard_mb: float = DEFAULT_SHARD_MB, workers: int | None = None, overwrite: bool = False,
            limit: int | None = None, progress: bool = False, **options) -> Manifest:
    if name not in MODULES:
        raise DataError(f"unknown dataset {name!r}; converters: {', '.join(MODULES)}")
    source = Path(src).expanduser()
    if not source.is_dir():
        raise DataError(f"source directory not found: {src}")
    resolved = cards.variant(name, variant)
    layout = cards.load_card(name).get("layout", "")
    module = importlib.import_module(f"ocr_cluster.data.converters.{MODULES[name]}")
    samples = module.find_samples(source, resolved, layout=layout, splits=splits,
                                  **{k: v for k, v in options.items() if v is not None})
    return write_dataset(dst, resolved, samples, source=f"{name} {source.resolve()}", shard_mb=shard_mb,
                         workers=workers, overwrite=overwrite, limit=limit, progress=progress)
