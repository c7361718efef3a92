"""Converters on tiny fake trees in each dataset's official layout: exact train ids out."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ocr_cluster.data import DataError, cards, commands, matfile
from ocr_cluster.data.converters import convert
from ocr_cluster.data.pipeline import iter_rows
from ocr_cluster.data.shards import read_manifest
from ocr_cluster.data.codec import decode_label

DATA = Path(__file__).parent / "data"

# cityscapesscripts/helpers/labels.py: (name, id, trainId) of the upstream 35 labels
CITYSCAPES_LABELS = [
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
]


def save_image(path: Path, h: int, w: int, seed: int = 0, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)


def save_label(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8)).save(path)


def save_palette_label(path: Path, label: np.ndarray) -> None:
    """VOC's SegmentationClass PNGs are palette images; the indices are the classes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("P", (label.shape[1], label.shape[0]))
    img.putpalette([(i * 53) % 256 for i in range(768)])
    img.putdata(label.ravel().tolist())
    img.save(path)
    assert Image.open(path).mode == "P"


def write_list(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def stored(uri: str, split: str) -> dict[str, np.ndarray]:
    """key -> stored train-id label of a converted split."""
    manifest = read_manifest(uri)
    return {key: decode_label(label) for _, _, key, _, label in iter_rows(manifest, split, shuffle=False)}


# ---------------------------------------------------------------------------------------------


def test_cityscapes_label_ids_map_to_train_ids_exactly(tmp_path):
    src = tmp_path / "cityscapes"
    all_ids = np.array([row[1] for row in CITYSCAPES_LABELS] + [34, 40, 255], np.uint8)  # + unknown ids
    label_ids = np.resize(all_ids, (6, 8))
    for split, city, n in (("train", "aachen", 2), ("val", "lindau", 1)):
        for i in range(n):
            key = f"{city}_{i:06d}_000019"
            save_image(src / "leftImg8bit" / split / city / f"{key}_leftImg8bit.png", 6, 8, seed=i)
            save_label(src / "gtFine" / split / city / f"{key}_gtFine_labelIds.png", np.roll(label_ids, i))
            save_label(src / "gtFine" / split / city / f"{key}_gtFine_color.png", np.zeros((6, 8)))  # ignored
    manifest = convert("cityscapes", str(src), str(tmp_path / "out"))
    assert manifest.dataset == "cityscapes" and manifest.num_classes == 19
    assert manifest.classes[:3] == ["road", "sidewalk", "building"] and manifest.palette[0] == [128, 64, 128]
    assert {k: v.num_samples for k, v in manifest.splits.items()} == {"train": 2, "val": 1}
    expected = {row[1]: row[2] for row in CITYSCAPES_LABELS}
    train = stored(str(tmp_path / "out"), "train")
    assert sorted(train) == ["aachen_000000_000019", "aachen_000001_000019"]
    for i, key in enumerate(sorted(train)):
        source = np.roll(label_ids, i)
        want = np.vectorize(lambda v: expected.get(int(v), 255))(source).astype(np.uint8)
        assert np.array_equal(train[key], want), key
    assert set(np.unique(train["aachen_000000_000019"])) == set(range(19)) | {255}
    # the card's table is exactly the official one
    assert cards.variant("cityscapes").label_map == {i: t for _, i, t in CITYSCAPES_LABELS if t != 255}


def test_cityscapes_bad_layout_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"not look like Cityscapes: no leftImg8bit/ and gtFine/ .*Expected layout"):
        convert("cityscapes", str(tmp_path), str(tmp_path / "out"))
    save_image(tmp_path / "leftImg8bit" / "train" / "x" / "x_0_0_leftImg8bit.png", 4, 4)
    (tmp_path / "gtFine" / "train").mkdir(parents=True)
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no label gtFine/train/x/x_0_0_gtFine_labelIds.png"):
        convert("cityscapes", str(tmp_path), str(tmp_path / "out"))


def test_ade20k_reduces_zero_label(tmp_path):
    src = tmp_path / "ADEChallengeData2016"
    label = np.arange(0, 152, dtype=np.uint8)[:150].reshape(10, 15)  # values 0..149
    label[0, 0], label[0, 1] = 150, 0
    for split, folder, prefix in (("train", "training", "ADE_train"), ("val", "validation", "ADE_val")):
        save_image(src / "images" / folder / f"{prefix}_00000001.jpg", 10, 15, fmt="JPEG")
        save_label(src / "annotations" / folder / f"{prefix}_00000001.png", label)
    manifest = convert("ade20k", str(tmp_path), str(tmp_path / "out"))  # the parent of ADEChallengeData2016 works
    assert manifest.dataset == "ade20k" and manifest.num_classes == 150 and manifest.classes[0] == "wall"
    out = stored(str(tmp_path / "out"), "val")["ADE_val_00000001"]
    want = label.astype(np.int64) - 1
    want[label == 0] = 255
    assert np.array_equal(out, want.astype(np.uint8))
    assert out[0, 0] == 149 and out[0, 1] == 255
    assert manifest.split("train").image_formats == {"jpeg": 1}


def _voc_tree(root: Path) -> dict[str, np.ndarray]:
    labels = {}
    ids = ["2007_000001", "2007_000002", "2008_000003", "2008_000004", "2009_000005"]
    for n, i in enumerate(ids):
        save_image(root / "JPEGImages" / f"{i}.jpg", 5, 6, seed=n, fmt="JPEG")
        lab = np.full((5, 6), n, np.uint8)
        lab[0, :] = 255  # VOC's object borders
        lab[1, 1] = 20
        labels[i] = lab
    # VOC labels: train 000001, val 000002; SBD (aug) labels for all but val
    save_palette_label(root / "SegmentationClass" / "2007_000001.png", labels["2007_000001"])
    save_palette_label(root / "SegmentationClass" / "2007_000002.png", labels["2007_000002"])
    write_list(root / "ImageSets" / "Segmentation" / "train.txt", ["2007_000001"])
    write_list(root / "ImageSets" / "Segmentation" / "val.txt", ["2007_000002"])
    return labels


def test_voc_aug_with_segmentation_class_aug(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    labels = _voc_tree(root)
    aug = root / "SegmentationClassAug"
    for i in ("2007_000001", "2008_000003", "2008_000004", "2009_000005", "2007_000002"):
        save_label(aug / f"{i}.png", np.full((5, 6), 7, np.uint8) if i == "2007_000001" else labels[i])
    write_list(root / "ImageSets" / "Segmentation" / "aug.txt", ["2008_000003", "2008_000004", "2009_000005"])
    manifest = convert("voc-aug", str(tmp_path / "VOCdevkit"), str(tmp_path / "out"))
    assert manifest.dataset == "voc-aug" and manifest.num_classes == 21
    train, val = stored(str(tmp_path / "out"), "train"), stored(str(tmp_path / "out"), "val")
    assert sorted(train) == ["2007_000001", "2008_000003", "2008_000004", "2009_000005"]
    assert sorted(val) == ["2007_000002"]
    # VOC's own (palette) label wins for VOC train ids: indices, not palette colours
    assert np.array_equal(train["2007_000001"], labels["2007_000001"])
    for i in ("2008_000003", "2008_000004", "2009_000005"):
        assert np.array_equal(train[i], labels[i])
    assert np.array_equal(val["2007_000002"], labels["2007_000002"])


def test_voc_aug_with_raw_sbd_mat_files(tmp_path):
    root = tmp_path / "VOC2012"
    labels = _voc_tree(root)
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    for i in ("2008_000003", "2008_000004", "2009_000005", "2007_000002"):  # SBD also labels a VOC val image
        (sbd / "cls" / f"{i}.mat").write_bytes(matfile.savemat({"GTcls": {"Segmentation": labels[i]}}))
    write_list(sbd / "train.txt", ["2008_000003", "2007_000002"])
    write_list(sbd / "val.txt", ["2008_000004", "2009_000005"])
    args = argparse.Namespace(dataset="voc-aug", src=str(root), dst=str(tmp_path / "out"),
                              sbd=str(tmp_path / "benchmark_RELEASE"), workers=2)
    assert commands.cmd_convert(args) == 0
    train = stored(str(tmp_path / "out"), "train")
    assert sorted(train) == ["2007_000001", "2008_000003", "2008_000004", "2009_000005"]  # val excluded
    for i in train:
        assert np.array_equal(train[i], labels[i]), i


def test_pascal_context_60_and_59(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2010"
    label = np.arange(60, dtype=np.uint8).reshape(6, 10)
    for i in ("2008_000002", "2008_000003"):
        save_image(root / "JPEGImages" / f"{i}.jpg", 6, 10, fmt="JPEG")
        save_label(root / "SegmentationClassContext" / f"{i}.png", label)
    write_list(root / "ImageSets" / "SegmentationContext" / "train.txt", ["2008_000002"])
    write_list(root / "ImageSets" / "SegmentationContext" / "val.txt", ["2008_000003"])
    m60 = convert("pascal-context", str(tmp_path / "VOCdevkit"), str(tmp_path / "p60"))
    assert m60.dataset == "pascal-context" and m60.num_classes == 60 and m60.classes[0] == "background"
    assert np.array_equal(stored(str(tmp_path / "p60"), "train")["2008_000002"], label)
    m59 = convert("pascal-context", str(root), str(tmp_path / "p59"), variant="59")
    assert m59.dataset == "pascal-context-59" and m59.num_classes == 59 and m59.classes[0] == "aeroplane"
    out = stored(str(tmp_path / "p59"), "val")["2008_000003"]
    assert out[0, 0] == 255 and np.array_equal(out.ravel()[1:], np.arange(59))
    with pytest.raises(DataError, match="pascal-context has no variant '61'; choose one of: 60, 59"):
        convert("pascal-context", str(root), str(tmp_path / "x"), variant="61")


def test_pascal_context_official_mat_labels(tmp_path):
    root = tmp_path / "VOC2010"
    ids = cards.load_card("pascal-context")["context_459_ids"]
    full = np.array([[0, 2, 259, 460 - 1], [458, 1, 3, 284]], np.uint16)  # 1, 3, 459: not among the 59
    save_image(root / "JPEGImages" / "2008_000002.jpg", 2, 4, fmt="JPEG")
    write_list(root / "ImageSets" / "Main" / "train.txt", ["2008_000002"])
    (tmp_path / "ctx" / "trainval").mkdir(parents=True)
    (tmp_path / "ctx" / "trainval" / "2008_000002.mat").write_bytes(matfile.savemat({"LabelMap": full}))
    convert("pascal-context", str(root), str(tmp_path / "out"), splits=["train"], context=str(tmp_path / "ctx"))
    out = stored(str(tmp_path / "out"), "train")["2008_000002"]
    want = [[0, ids.index(2), ids.index(259), 0], [ids.index(458), 0, 0, ids.index(284)]]
    assert out.tolist() == want and want[0][1] == 1 and want[1][0] == 59  # aeroplane, wood
    convert("pascal-context", str(root), str(tmp_path / "out59"), splits=["train"], context=str(tmp_path / "ctx"),
            variant="59")
    assert stored(str(tmp_path / "out59"), "train")["2008_000002"].tolist() == \
        [[255, 0, ids.index(259) - 1, 255], [58, 255, 255, ids.index(284) - 1]]


def test_coco_stuff_164k_stuffthingmaps(tmp_path):
    src = tmp_path / "coco_stuff164k"
    raw = np.array([[0, 10, 11, 12], [90, 91, 181, 182], [255, 25, 26, 100]], np.uint8)
    for split in ("train2017", "val2017"):
        save_image(src / "images" / split / "000000000139.jpg", 3, 4, fmt="JPEG")
        save_label(src / "annotations" / split / "000000000139.png", raw)
    manifest = convert("coco-stuff", str(src), str(tmp_path / "out"))
    assert manifest.dataset == "coco-stuff164k" and manifest.num_classes == 171
    out = stored(str(tmp_path / "out"), "val")["000000000139"]
    # 0-based COCO ids; 11, 25, 90 are unused ids (-> 255); 91 is the first stuff class (train id 80)
    assert out.tolist() == [[0, 10, 255, 11], [255, 80, 170, 255], [255, 255, 24, 89]]


def test_coco_stuff_10k_mat(tmp_path):
    src = tmp_path / "cocostuff-10k-v1.1"
    s_map = np.array([[0, 1, 11, 12], [13, 92, 182, 183]], np.uint16)
    names = {"train": "COCO_train2014_000000000077", "test": "COCO_train2014_000000000078"}
    for split, name in names.items():
        save_image(src / "images" / f"{name}.jpg", 2, 4, fmt="JPEG")
        (src / "annotations").mkdir(parents=True, exist_ok=True)
        (src / "annotations" / f"{name}.mat").write_bytes(matfile.savemat({"S": s_map, "names": np.zeros((1, 1))}))
        write_list(src / "imageLists" / f"{split}.txt", [name])
    manifest = convert("coco-stuff", str(src), str(tmp_path / "out"), variant="10k")
    assert manifest.dataset == "coco-stuff10k" and set(manifest.splits) == {"train", "val"}
    out = stored(str(tmp_path / "out"), "val")[names["test"]]
    # 1-based ids: 0 unlabeled -> 255; 12 is unused -> 255; 92 (first stuff, 0-based 91) -> 80; 182 -> 170
    assert out.tolist() == [[255, 0, 10, 255], [11, 80, 170, 255]]


def test_mat_reader_on_files_written_by_scipy():
    """tests/data/*.mat were written by scipy.io.savemat 1.17 (not a project dependency)."""
    expected = np.load(DATA / "mat_expected.npz")
    data = matfile.loadmat((DATA / "cocostuff10k.mat").read_bytes())  # uncompressed, with a cell and a string
    assert np.array_equal(data["S"], expected["S"]) and data["S"].dtype == np.uint16
    assert data["captions"] == "a cat" and data["names"] == ["person", "sky"]
    sbd = matfile.loadmat((DATA / "sbd_cls.mat").read_bytes())  # compressed struct with a cell of sparse
    assert np.array_equal(sbd["GTcls"]["Segmentation"], expected["seg"])
    ctx = matfile.loadmat((DATA / "context_labelmap.mat").read_bytes())
    assert np.array_equal(ctx["LabelMap"], expected["L"])
    with pytest.raises(matfile.MatFileError, match="not a MAT-file"):
        matfile.loadmat(b"short")


def test_lip_official_and_flat_layouts(tmp_path):
    label = np.arange(20, dtype=np.uint8).reshape(4, 5)
    official = tmp_path / "LIP"
    for split in ("train", "val"):
        save_image(official / "TrainVal_images" / f"{split}_images" / "100034_483681.jpg", 4, 5, fmt="JPEG")
        save_label(official / "TrainVal_parsing_annotations" / f"{split}_segmentations" / "100034_483681.png", label)
    write_list(official / "train_id.txt", ["100034_483681"])
    manifest = convert("lip", str(official), str(tmp_path / "out"))
    assert manifest.dataset == "lip" and manifest.num_classes == 20
    assert manifest.flip_swap == [[14, 15], [16, 17], [18, 19]]
    assert np.array_equal(stored(str(tmp_path / "out"), "train")["100034_483681"], label)
    flat = tmp_path / "flat"
    save_image(flat / "val_images" / "a.jpg", 4, 5, fmt="JPEG")
    save_label(flat / "val_segmentations" / "a.png", label)
    convert("lip", str(flat), str(tmp_path / "out2"), splits=["val"])
    assert np.array_equal(stored(str(tmp_path / "out2"), "val")["a"], label)


def test_out_of_range_source_labels_are_named(tmp_path):
    src = tmp_path / "lip"
    save_image(src / "train_images" / "a.jpg", 2, 2, fmt="JPEG")
    save_label(src / "train_segmentations" / "a.png", np.array([[0, 21], [1, 2]], np.uint8))
    with pytest.raises(DataError, match=r"train sample 'a': label has values outside \[0, 20\) and 255: 21"):
        convert("lip", str(src), str(tmp_path / "out"), splits=["train"])
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_convert_limit_and_unknown_names(tmp_path):
    src = tmp_path / "lip"
    for i in range(3):
        save_image(src / "train_images" / f"{i}.jpg", 2, 2, fmt="JPEG")
        save_label(src / "train_segmentations" / f"{i}.png", np.zeros((2, 2), np.uint8))
    manifest = convert("lip", str(src), str(tmp_path / "out"), splits=["train"], limit=2)
    assert manifest.split("train").num_samples == 2
    with pytest.raises(DataError, match="unknown dataset 'kitti'"):
        convert("kitti", str(src), str(tmp_path / "o"))
    with pytest.raises(DataError, match="source directory not found"):
        convert("lip", str(tmp_path / "nope"), str(tmp_path / "o"))
    with pytest.raises(DataError, match="--sbd applies to voc-aug only"):
        commands.cmd_convert(argparse.Namespace(dataset="lip", src=str(src), dst=str(tmp_path / "o"), sbd="x"))


def test_every_card_resolves():
    for name in cards.CONVERTER_NAMES:
        for which in cards.variant_names(name):
            v = cards.variant(name, which)
            assert len(v.classes) == v.num_classes == len(v.palette)
            assert v.img_scale and v.crop_size
    produced = {cards.variant(n, w).dataset for n in cards.CONVERTER_NAMES for w in cards.variant_names(n)}
    from ocr_cluster.config import DATASETS

    assert produced | {"synthetic"} == set(DATASETS)
    assert cards.card_for_dataset("coco-stuff10k") == ("coco-stuff", "10k")
