"""Dataset cards: datasets/<name>.yaml in the repository (classes, palettes, label maps, layouts).

A card describes one *source* dataset as its converter sees it (`ocr-cluster data convert NAME`):
its expected directory layout, split sizes, classes and palette, and one or more variants. A
variant is what ends up in a manifest: the config dataset name (`data.dataset`), the number of
classes, how source label values become train ids (`label_map`, `reduce_zero_label`), and the
mmseg defaults `img_scale` (WxH) and `crop_size` (HxW).

    cityscapes      -> cityscapes
    ade20k          -> ade20k
    voc-aug         -> voc-aug
    pascal-context  -> pascal-context (--variant 60, default), pascal-context-59 (--variant 59)
    coco-stuff      -> coco-stuff164k (--variant 164k, default), coco-stuff10k (--variant 10k)
    lip             -> lip
    synthetic       -> synthetic (written by `ocr-cluster data synth`, not converted)

The cards live in datasets/ at the repository root; a built wheel carries them as ocr_cluster/datasets
(OCR_CLUSTER_DATASETS overrides the directory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ocr_cluster.data.codec import lut_from_map
from ocr_cluster.data.constants import IGNORE_INDEX
from ocr_cluster.data.errors import DataError

CONVERTER_NAMES = ("cityscapes", "ade20k", "voc-aug", "pascal-context", "coco-stuff", "lip")
CARD_NAMES = (*CONVERTER_NAMES, "synthetic")


def cards_dir() -> Path:
    """OCR_CLUSTER_DATASETS, else the cards an installed package carries (ocr_cluster/datasets), else the
    checkout's datasets/ (a source tree or an editable install)."""
    env = os.environ.get("OCR_CLUSTER_DATASETS")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    packaged = package / "datasets"
    return packaged if packaged.is_dir() else package.parent / "datasets"


@dataclass
class Variant:
    """One variant of a card, resolved: everything a converter and a manifest need."""

    card: str
    name: str
    dataset: str
    num_classes: int
    classes: list[str]
    palette: list[list[int]]
    reduce_zero_label: bool = False
    label_map: dict[int, int] | None = None
    img_scale: list[int] | None = None
    crop_size: list[int] | None = None
    flip_swap: list[list[int]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def label_lut(self) -> np.ndarray | None:
        """256-entry lookup table source value -> train id (None when no label_map)."""
        if self.label_map is None:
            return None
        return lut_from_map(self.label_map)

    def to_train_ids(self, label: np.ndarray) -> np.ndarray:
        """Source label values -> train ids (uint8, 255 = ignore), per label_map / reduce_zero_label."""
        if self.label_map is not None:
            if label.dtype == np.uint8:
                return self.label_lut()[label]
            lut = lut_from_map(self.label_map, size=max(256, int(label.max(initial=0)) + 1))
            return lut[np.clip(label, 0, len(lut) - 1)]
        if self.reduce_zero_label:
            out = label.astype(np.int64) - 1
            out[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
            label = out
        if label.dtype != np.uint8:
            if label.size and (label.min() < 0 or label.max() > 255):
                return label  # the writer reports the out-of-range values, naming the sample
            label = label.astype(np.uint8)
        return label


@lru_cache(maxsize=None)
def load_card(name: str) -> dict[str, Any]:
    """The raw card `datasets/<name>.yaml`."""
    path = cards_dir() / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(CARD_NAMES)
        raise DataError(f"no dataset card {path} (known datasets: {known})")
    with open(path) as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict) or data.get("name") != name:
        raise DataError(f"{path}: expected a mapping with name: {name}")
    return data


def variant_names(name: str) -> list[str]:
    return [str(v) for v in load_card(name).get("variants", {})]


def default_variant(name: str) -> str:
    return variant_names(name)[0]


def variant(name: str, which: str | None = None) -> Variant:
    """The resolved variant `which` (None = the card's first) of card `name`."""
    card = load_card(name)
    variants = {str(k): v for k, v in card.get("variants", {}).items()}
    which = str(which) if which is not None else default_variant(name)
    if which not in variants:
        raise DataError(f"{name} has no variant {which!r}; choose one of: {', '.join(variants)}")
    spec = dict(variants[which])
    classes = spec.pop("classes", card.get("classes"))
    palette = spec.pop("palette", card.get("palette"))
    lo_hi = spec.pop("class_slice", None)
    if lo_hi:
        classes, palette = classes[lo_hi[0]:lo_hi[1]], palette[lo_hi[0]:lo_hi[1]]
    label_map = spec.pop("label_map", None)
    out = Variant(card=name, name=which, dataset=spec.pop("dataset"), num_classes=int(spec.pop("num_classes")),
                  classes=[str(c) for c in classes], palette=[list(map(int, p)) for p in palette],
                  reduce_zero_label=bool(spec.pop("reduce_zero_label", False)),
                  label_map={int(k): int(v) for k, v in label_map.items()} if label_map is not None else None,
                  img_scale=spec.pop("img_scale", None), crop_size=spec.pop("crop_size", None),
                  flip_swap=[list(p) for p in spec.pop("flip_swap", [])], extra=spec)
    if len(out.classes) != out.num_classes or len(out.palette) != out.num_classes:
        raise DataError(f"card {name} variant {which}: {len(out.classes)} classes and {len(out.palette)} colours "
                        f"for num_classes {out.num_classes}")
    return out


def card_for_dataset(dataset: str) -> tuple[str, str]:
    """(card name, variant name) whose variant produces config dataset `dataset`."""
    for name in CARD_NAMES:
        try:
            card = load_card(name)
        except DataError:
            continue
        for which, spec in card.get("variants", {}).items():
            if spec.get("dataset") == dataset:
                return name, str(which)
    raise DataError(f"no dataset card produces dataset {dataset!r}")
