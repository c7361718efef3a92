"""COCO-Stuff 164k (stuffthingmaps PNGs) and 10k (v1.1 .mat annotations); 171 classes.

164k: `annotations/{train2017,val2017}/<id>.png` hold the 0-based COCO id (255 = unlabeled); the
card's label_map (mmseg's clsID_to_trID) gives the train ids. mmseg's converted
`<id>_labelTrainIds.png` are taken as they are when the raw maps are absent.
10k: `annotations/<name>.mat` hold S, the 1-based COCO id (0 = unlabeled); the card's label_map is
mmseg's clsID_to_trID followed by reduce_zero_label. The 10k test split is written as val.
mmseg's converted 10k layout (`images/train2014`, `annotations/train2014/*_labelTrainIds.png`, values
1..171, 0 = unlabeled) is read too and reduce_zero_label is applied to it.
"""

from __future__ import annotations

from pathlib import Path

from ocr_cluster.data.codec import reduce_zero_label
from ocr_cluster.data.cards import Variant
from ocr_cluster.data.converters.common import SourceSample, layout_error, read_lines

SPLITS_164K = {"train": "train2017", "val": "val2017"}
SPLITS_10K = {"train": "train", "val": "test"}
MMSEG_10K = {"train": "train2014", "val": "test2014"}


def find_samples(src: Path, variant: Variant, *, layout: str, splits: list[str] | None = None,
                 **_: object) -> dict[str, list[SourceSample]]:
    if variant.name == "10k":
        return _find_10k(src, layout, splits)
    return _find_164k(src, layout, splits)


def _find_164k(src: Path, layout: str, splits: list[str] | None) -> dict[str, list[SourceSample]]:
    out: dict[str, list[SourceSample]] = {}
    for split in splits or list(SPLITS_164K):
        folder = SPLITS_164K.get(split)
        if folder is None:
            raise layout_error("COCO-Stuff 164k", src, f"unknown split {split!r}", layout)
        img_dir, ann_dir = src / "images" / folder, src / "annotations" / folder
        if not img_dir.is_dir() or not ann_dir.is_dir():
            raise layout_error("COCO-Stuff 164k", src, f"no images/{folder}/ and annotations/{folder}/", layout)
        samples = []
        for image in sorted(img_dir.glob("*.jpg")):
            raw, converted = ann_dir / f"{image.stem}.png", ann_dir / f"{image.stem}_labelTrainIds.png"
            if raw.is_file():
                samples.append(SourceSample(image.stem, str(image), str(raw)))
            elif converted.is_file():
                samples.append(SourceSample(image.stem, str(image), str(converted), train_ids=True))
            else:
                raise layout_error("COCO-Stuff 164k", src, f"no label annotations/{folder}/{image.stem}.png", layout)
        if not samples:
            raise layout_error("COCO-Stuff 164k", src, f"no images/{folder}/*.jpg", layout)
        out[split] = samples
    return out


def _reduced(label):
    return reduce_zero_label(label)


def _find_10k(src: Path, layout: str, splits: list[str] | None) -> dict[str, list[SourceSample]]:
    out: dict[str, list[SourceSample]] = {}
    mmseg_layout = (src / "annotations" / "train2014").is_dir()
    if not mmseg_layout and not (src / "imageLists").is_dir():
        raise layout_error("COCO-Stuff 10k", src, "no imageLists/ (or mmseg's annotations/train2014/)", layout)
    for split in splits or list(SPLITS_10K):
        if split not in SPLITS_10K:
            raise layout_error("COCO-Stuff 10k", src, f"unknown split {split!r} (train, val)", layout)
        samples = []
        if mmseg_layout:
            folder = MMSEG_10K[split]
            for image in sorted((src / "images" / folder).glob("*.jpg")):
                label = src / "annotations" / folder / f"{image.stem}_labelTrainIds.png"
                if not label.is_file():
                    raise layout_error("COCO-Stuff 10k", src, f"no label {label.relative_to(src)}", layout)
                samples.append(SourceSample(image.stem, str(image), str(label), premap=_reduced, train_ids=True))
        else:
            listing = src / "imageLists" / f"{SPLITS_10K[split]}.txt"
            if not listing.is_file():
                raise layout_error("COCO-Stuff 10k", src, f"no imageLists/{listing.name}", layout)
            for name in read_lines(listing):
                label = src / "annotations" / f"{name}.mat"
                if not label.is_file():
                    raise layout_error("COCO-Stuff 10k", src, f"no label annotations/{name}.mat", layout)
                samples.append(SourceSample(name, str(src / "images" / f"{name}.jpg"), str(label), label_field="S"))
        out[split] = samples
    return out
