"""Label maps entry by entry against mmseg's dataset converters (tools/dataset_converters, recorded in
tests/data/mmseg_fidelity_tables.json by scripts/mmseg_fidelity.py), not against our own dataset cards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ocr_cluster.data import cards
from ocr_cluster.data.converters.pascal_context import Map459

MAPS = json.loads((Path(__file__).parent / "data" / "mmseg_fidelity_tables.json").read_text())["label_maps"]


def as_table(name: str) -> dict[int, int]:
    return {int(k): v for k, v in MAPS[name].items()}


def test_coco_stuff_164k_is_mmseg_clsID_to_trID():
    mmseg = as_table("coco_stuff164k_clsID_to_trID")  # 0-based COCO id (255 unlabeled) -> train id
    assert len(mmseg) == 172 and mmseg[255] == 255 and sorted(set(mmseg.values()) - {255}) == list(range(171))
    ours = cards.variant("coco-stuff", "164k").to_train_ids(np.arange(256, dtype=np.uint8))
    for source in range(256):
        # ids absent from mmseg's table never occur in stuffthingmaps; mmseg would keep them as they are
        assert ours[source] == mmseg.get(source, 255), source


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])  # a PNG label, and the .mat S map read as int64
def test_coco_stuff_10k_is_mmseg_clsID_to_trID_then_reduce_zero_label(dtype):
    mmseg = as_table("coco_stuff10k_clsID_to_trID")  # 1-based COCO id (0 unlabeled) -> 1..171
    assert len(mmseg) == 172 and mmseg[0] == 0 and sorted(set(mmseg.values()) - {0}) == list(range(1, 172))
    ours = cards.variant("coco-stuff", "10k").to_train_ids(np.arange(256).astype(dtype))
    for source in range(256):
        train_id = mmseg.get(source, 0)
        assert ours[source] == (255 if train_id == 0 else train_id - 1), source  # COCOStuff10k reduce_zero_label


@pytest.mark.parametrize("variant", ["60", "59"])
def test_pascal_context_459_map_is_mmseg_mapping(variant):
    mapping = MAPS["pascal_context_mapping"]  # the 459-class ids kept, sorted; the index is the 60-class label
    assert len(mapping) == 60 and mapping[0] == 0 and mapping == sorted(mapping)
    premap = Map459([int(i) for i in cards.load_card("pascal-context")["context_459_ids"]])
    ours = cards.variant("pascal-context", variant).to_train_ids(premap(np.arange(460)))
    for source in range(460):
        # np.digitize(mask, _mapping, right=True) -> index; mmseg asserts every value is in _mapping, the
        # Detail API having mapped the other classes to 0 already: they are background here
        label60 = mapping.index(source) if source in mapping else 0
        want = label60 if variant == "60" else (255 if label60 == 0 else label60 - 1)
        assert ours[source] == want, source
