"""PASCAL VOC 2012 + SBD: the 10582-image trainaug split and the 1449-image val split.

train = (VOC train + SBD train + SBD val) - VOC val, each image once. Labels, as mmseg's
pascal_voc12_aug config reads them: VOC's `SegmentationClass/<id>.png` for the ids of VOC's
train.txt, SBD's label for the others: `SegmentationClassAug/<id>.png` (mmseg's voc_aug.py output,
listed in `ImageSets/Segmentation/aug.txt`) or, with --sbd, the raw SBD `dataset/cls/<id>.mat`.
VOC label PNGs are palette images: their indices are the class ids (0..20, 255 = border).
"""

from __future__ import annotations

from pathlib import Path

from ocr_cluster.data.cards import Variant
from ocr_cluster.data.converters.common import SourceSample, layout_error, read_lines


def _voc_root(src: Path) -> Path:
    for candidate in (src, src / "VOC2012", src / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    return src


def find_samples(src: Path, variant: Variant, *, layout: str, splits: list[str] | None = None,
                 sbd: str | None = None, **_: object) -> dict[str, list[SourceSample]]:
    root = _voc_root(src)
    sets = root / "ImageSets" / "Segmentation"
    if not (root / "JPEGImages").is_dir() or not (sets / "train.txt").is_file() or not (sets / "val.txt").is_file():
        raise layout_error("VOC2012", src, "no JPEGImages/ and ImageSets/Segmentation/{train,val}.txt", layout)
    voc_train, voc_val = read_lines(sets / "train.txt"), read_lines(sets / "val.txt")

    def image(i: str) -> str:
        return str(root / "JPEGImages" / f"{i}.jpg")

    def voc_label(i: str) -> SourceSample:
        path = root / "SegmentationClass" / f"{i}.png"
        if not path.is_file():
            raise layout_error("VOC2012", src, f"no label SegmentationClass/{i}.png", layout)
        return SourceSample(i, image(i), str(path))

    out: dict[str, list[SourceSample]] = {}
    wanted = splits or ["train", "val"]
    for split in wanted:
        if split not in ("train", "val"):
            raise layout_error("VOC2012", src, f"unknown split {split!r} (voc-aug has train, val)", layout)
    if "val" in wanted:
        out["val"] = [voc_label(i) for i in voc_val]
    if "train" in wanted:
        samples = {i: voc_label(i) for i in voc_train}
        excluded = set(voc_train) | set(voc_val)
        for i, sample in _sbd_samples(src, root, layout, sbd, image).items():
            if i not in excluded:
                samples[i] = sample
        out["train"] = list(samples.values())
    return out


def _sbd_samples(src: Path, root: Path, layout: str, sbd: str | None, image) -> dict[str, SourceSample]:
    if sbd:
        base = Path(sbd)
        base = base / "dataset" if (base / "dataset" / "cls").is_dir() else base
        if not (base / "cls").is_dir():
            raise layout_error("SBD", sbd, "no dataset/cls/ directory of .mat labels", layout)
        ids: list[str] = []
        for name in ("train.txt", "val.txt"):
            if (base / name).is_file():
                ids += read_lines(base / name)
        if not ids:
            ids = sorted(p.stem for p in (base / "cls").glob("*.mat"))
        return {i: SourceSample(i, image(i), str(base / "cls" / f"{i}.mat"), label_field="GTcls.Segmentation")
                for i in ids}
    aug_dir = root / "SegmentationClassAug"
    if not aug_dir.is_dir():
        raise layout_error("VOC2012 + SBD", src, "no SegmentationClassAug/ (mmseg's converted SBD labels); "
                           "give the raw SBD release with --sbd DIR", layout)
    aug_list = root / "ImageSets" / "Segmentation" / "aug.txt"
    ids = read_lines(aug_list) if aug_list.is_file() else sorted(p.stem for p in aug_dir.glob("*.png"))
    out = {}
    for i in ids:
        path = aug_dir / f"{i}.png"
        if not path.is_file():
            raise layout_error("VOC2012 + SBD", src, f"aug.txt lists {i} but SegmentationClassAug/{i}.png is missing",
                               layout)
        out[i] = SourceSample(i, image(i), str(path))
    return out
