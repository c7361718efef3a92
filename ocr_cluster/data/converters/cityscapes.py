"""Cityscapes: leftImg8bit + gtFine `*_gtFine_labelIds.png`, mapped labelId -> trainId by the card's table.

The table is cityscapesscripts' helpers/labels.py (the upstream 35 labels): 19 train ids, every
other id (and the license plate, id -1) -> 255. A tree holding only `*_gtFine_labelTrainIds.png`
(already train ids, as cityscapesscripts' createTrainIdLabelImgs writes them) is read as it is.
"""

from __future__ import annotations

from pathlib import Path

from ocr_cluster.data.cards import Variant
from ocr_cluster.data.converters.common import SourceSample, layout_error

DEFAULT_SPLITS = ("train", "val")
IMG_SUFFIX = "_leftImg8bit.png"


def find_samples(src: Path, variant: Variant, *, layout: str, splits: list[str] | None = None,
                 **_: object) -> dict[str, list[SourceSample]]:
    img_root, ann_root = src / "leftImg8bit", src / "gtFine"
    if not img_root.is_dir() or not ann_root.is_dir():
        raise layout_error("Cityscapes", src, "no leftImg8bit/ and gtFine/ directories", layout)
    out: dict[str, list[SourceSample]] = {}
    for split in splits or DEFAULT_SPLITS:
        if not (img_root / split).is_dir():
            raise layout_error("Cityscapes", src, f"no leftImg8bit/{split}/ directory", layout)
        samples = []
        for image in sorted((img_root / split).glob(f"*/*{IMG_SUFFIX}")):
            key = image.name[: -len(IMG_SUFFIX)]
            city = image.parent.name
            label = ann_root / split / city / f"{key}_gtFine_labelIds.png"
            if label.is_file():
                samples.append(SourceSample(key, str(image), str(label)))
                continue
            train_ids = ann_root / split / city / f"{key}_gtFine_labelTrainIds.png"
            if train_ids.is_file():
                samples.append(SourceSample(key, str(image), str(train_ids), train_ids=True))
                continue
            raise layout_error("Cityscapes", src, f"no label {label.relative_to(src)} for {image.relative_to(src)}",
                               layout)
        if not samples:
            raise layout_error("Cityscapes", src, f"no */*{IMG_SUFFIX} under leftImg8bit/{split}/", layout)
        out[split] = samples
    return out

