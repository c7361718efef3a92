"""Look Into Person: TrainVal_images/*_images/*.jpg + TrainVal_parsing_annotations/*_segmentations/*.png (0..19)."""

from __future__ import annotations

from pathlib import Path

from ocr_cluster.data.cards import Variant
from ocr_cluster.data.converters.common import SourceSample, first_existing, layout_error, read_lines


def find_samples(src: Path, variant: Variant, *, layout: str, splits: list[str] | None = None,
                 **_: object) -> dict[str, list[SourceSample]]:
    out: dict[str, list[SourceSample]] = {}
    for split in splits or ["train", "val"]:
        img_dir = first_existing(src / "TrainVal_images" / f"{split}_images", src / f"{split}_images")
        ann_dir = first_existing(src / "TrainVal_parsing_annotations" / f"{split}_segmentations",
                                 src / f"{split}_segmentations")
        if img_dir is None or ann_dir is None:
            raise layout_error("LIP", src, f"no {split}_images/ and {split}_segmentations/", layout)
        listing = first_existing(src / f"{split}_id.txt", src / "TrainVal_images" / f"{split}_id.txt")
        ids = read_lines(listing) if listing else sorted(p.stem for p in ann_dir.glob("*.png"))
        samples = []
        for i in ids:
            image, label = img_dir / f"{i}.jpg", ann_dir / f"{i}.png"
            if not image.is_file() or not label.is_file():
                missing = image if not image.is_file() else label
                raise layout_error("LIP", src, f"sample {i}: missing {missing.relative_to(src)}", layout)
            samples.append(SourceSample(i, str(image), str(label)))
        if not samples:
            raise layout_error("LIP", src, f"no labels in {ann_dir}", layout)
        out[split] = samples
    return out
