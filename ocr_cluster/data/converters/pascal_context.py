"""PASCAL-Context on VOC 2010: 60 classes (background + 59) or 59 (background ignored).

Labels come from mmseg's converted `SegmentationClassContext/<id>.png` (values 0..59) with
`ImageSets/SegmentationContext/{train,val}.txt`, or, with --context DIR, from the official release's
`trainval/<id>.mat` (LabelMap over the 459 full classes) with VOC 2010's `ImageSets/Main/{train,val}.txt`.
There the card's `context_459_ids` keep their index and every other class becomes background (0),
as mmseg's pascal_context.py does. Variant 59 then applies reduce_zero_label (background -> 255).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ocr_cluster.data.cards import Variant, load_card
from ocr_cluster.data.converters.common import SourceSample, layout_error, read_lines


def _voc_root(src: Path) -> Path:
    for candidate in (src, src / "VOC2010", src / "VOCdevkit" / "VOC2010"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    return src


class Map459:
    """459-class LabelMap -> 60-class index (0 = background and every class not kept)."""

    def __init__(self, ids: list[int]):
        self.lut = np.zeros(max(ids) + 1, dtype=np.uint8)
        for index, cid in enumerate(ids):
            self.lut[cid] = index

    def __call__(self, label: np.ndarray) -> np.ndarray:
        label = np.asarray(label, dtype=np.int64)
        inside = (label >= 0) & (label < len(self.lut))
        out = np.zeros(label.shape, dtype=np.uint8)
        out[inside] = self.lut[label[inside]]
        return out


def find_samples(src: Path, variant: Variant, *, layout: str, splits: list[str] | None = None,
                 context: str | None = None, **_: object) -> dict[str, list[SourceSample]]:
    root = _voc_root(src)
    if not (root / "JPEGImages").is_dir():
        raise layout_error("PASCAL-Context (VOC2010)", src, "no JPEGImages/ directory", layout)
    out: dict[str, list[SourceSample]] = {}
    if context:
        base = Path(context)
        base = base / "trainval" if (base / "trainval").is_dir() else base
        if not any(base.glob("*.mat")):
            raise layout_error("PASCAL-Context", context, "no trainval/*.mat label files", layout)
        premap = Map459([int(i) for i in load_card("pascal-context")["context_459_ids"]])
        lists, label_dir, suffix, field = root / "ImageSets" / "Main", base, ".mat", "LabelMap"
    else:
        label_dir = root / "SegmentationClassContext"
        lists, suffix, field, premap = root / "ImageSets" / "SegmentationContext", ".png", "", None
        if not label_dir.is_dir():
            raise layout_error("PASCAL-Context", src, "no SegmentationClassContext/ (mmseg's converted labels); "
                               "give the official trainval/*.mat release with --context DIR", layout)
    for split in splits or ["train", "val"]:
        listing = lists / f"{split}.txt"
        if not listing.is_file():
            raise layout_error("PASCAL-Context", src, f"no split list {listing.relative_to(root)}", layout)
        samples = []
        for i in read_lines(listing):
            label = label_dir / f"{i}{suffix}"
            if not label.is_file():
                raise layout_error("PASCAL-Context", src, f"no label {label} for {i}", layout)
            samples.append(SourceSample(i, str(root / "JPEGImages" / f"{i}.jpg"), str(label), label_field=field,
                                        premap=premap))
        out[split] = samples
    return out
