"""ADE20K (ADEChallengeData2016): images/*.jpg + annotations/*.png, reduce_zero_label (0 = other -> 255)."""

from __future__ import annotations

from pathlib import Path

from ocr_cluster.data.cards import Variant
from ocr_cluster.data.converters.common import SourceSample, layout_error

SPLITS = {"train": "training", "val": "validation"}


def find_samples(src: Path, variant: Variant, *, layout: str, splits: list[str] | None = None,
                 **_: object) -> dict[str, list[SourceSample]]:
    if not (src / "images").is_dir() and (src / "ADEChallengeData2016").is_dir():
        src = src / "ADEChallengeData2016"
    if not (src / "images").is_dir() or not (src / "annotations").is_dir():
        raise layout_error("ADE20K", src, "no images/ and annotations/ directories", layout)
    out: dict[str, list[SourceSample]] = {}
    for split in splits or list(SPLITS):
        if split not in SPLITS:
            raise layout_error("ADE20K", src, f"unknown split {split!r} (ADE20K has {', '.join(SPLITS)})", layout)
        folder = SPLITS[split]
        samples = []
        for image in sorted((src / "images" / folder).glob("*.jpg")):
            label = src / "annotations" / folder / f"{image.stem}.png"
            if not label.is_file():
                raise layout_error("ADE20K", src, f"no label {label.relative_to(src)} for {image.name}", layout)
            samples.append(SourceSample(image.stem, str(image), str(label)))
        if not samples:
            raise layout_error("ADE20K", src, f"no images/{folder}/*.jpg", layout)
        out[split] = samples
    return out
