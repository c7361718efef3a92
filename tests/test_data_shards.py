"""Shard format, manifest, atomic writes, checksums, synthetic data and `data inspect`, locally and on S3."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ocr_cluster import storage
from ocr_cluster.config import ConfigError
from ocr_cluster.data import DataError, codec, commands
from ocr_cluster.data.inspect import report
from ocr_cluster.data.shards import DatasetWriter, read_manifest, read_shard
from ocr_cluster.data.synth import SynthSpec, render, write_synthetic

SMALL = SynthSpec(classes=5, num_train=12, num_val=4, size_hw=(64, 96), seed=3)


def _writer(uri: str, **kwargs) -> DatasetWriter:
    return DatasetWriter(uri, name="toy", dataset="synthetic", classes=["a", "b", "c"],
                         palette=[[0, 0, 0], [1, 1, 1], [2, 2, 2]], **kwargs)


def _add(writer: DatasetWriter, split: str, key: str, label: np.ndarray, image: bytes | None = None) -> None:
    h, w = label.shape
    img = image if image is not None else codec.encode_image(np.full((h, w, 3), 7, np.uint8))
    writer.add(split, key, img, codec.encode_label(label), label_array=label, height=h, width=w,
               image_format=codec.image_format(img))


def test_writer_cuts_shards_and_manifest_describes_them(tmp_path):
    writer = _writer(str(tmp_path / "ds"), shard_mb=0.0001)  # ~100 bytes: a shard every sample or two
    for i in range(5):
        _add(writer, "train", f"k{i}", np.full((8, 8), i % 3, np.uint8))
    _add(writer, "val", "v0", np.array([[0, 255], [1, 2]], np.uint8))
    manifest = writer.close()
    train = manifest.split("train")
    assert train.num_samples == 5 and len(train.shards) >= 3
    assert sum(s.num_samples for s in train.shards) == 5
    assert train.class_pixels == [2 * 64, 2 * 64, 64] and train.ignore_pixels == 0
    assert manifest.split("val").class_pixels == [1, 1, 1] and manifest.split("val").ignore_pixels == 1
    again = read_manifest(str(tmp_path / "ds"))
    assert again == manifest
    for shard in train.shards:
        path = tmp_path / "ds" / shard.path
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard.sha256
        table = pq.read_table(path)  # plain pyarrow reads the shards
        assert table.column_names == ["key", "image", "label", "height", "width", "image_format"]
    keys = [k for s in train.shards for k in read_shard(again, s).column("key").to_pylist()]
    assert keys == [f"k{i}" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["manifest.json", "train", "val"]


def test_writer_rejects_bad_labels_duplicates_and_size_mismatch(tmp_path):
    writer = _writer(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"train sample 'x': label has values outside \[0, 3\) and 255: 3, 7"):
        _add(writer, "train", "x", np.array([[0, 3], [7, 255]], np.uint8))
    _add(writer, "train", "y", np.zeros((2, 2), np.uint8))
    with pytest.raises(DataError, match="train sample 'y': duplicate key"):
        _add(writer, "train", "y", np.zeros((2, 2), np.uint8))
    img = codec.encode_image(np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(DataError, match="label is 2x2 .* but the image is 3x3"):
        writer.add("train", "z", img, codec.encode_label(np.zeros((2, 2), np.uint8)),
                   label_array=np.zeros((2, 2), np.uint8), height=3, width=3, image_format="png")


def test_no_manifest_means_no_dataset(tmp_path):
    writer = _writer(str(tmp_path / "ds"))
    _add(writer, "train", "a", np.zeros((4, 4), np.uint8))
    writer._flush("train", writer._splits["train"])  # shards written, "interrupted" before close()
    assert list((tmp_path / "ds" / "train").glob("*.parquet"))
    with pytest.raises(DataError, match=r"no manifest at .*ds; was the conversion interrupted\?"):
        read_manifest(str(tmp_path / "ds"))


def test_overwrite_is_explicit_and_removes_stale_shards(tmp_path):
    uri = str(tmp_path / "ds")
    writer = _writer(uri, shard_mb=0.0001)
    for i in range(4):
        _add(writer, "train", f"k{i}", np.full((8, 8), 1, np.uint8))
    first = writer.close()
    assert len(first.split("train").shards) == 4
    with pytest.raises(DataError, match="a dataset already exists at .*; pass --overwrite"):
        _writer(uri)
    writer = _writer(uri, overwrite=True)
    assert not (tmp_path / "ds" / "manifest.json").exists()  # readers see no dataset while it is rewritten
    _add(writer, "train", "only", np.full((8, 8), 2, np.uint8))
    second = writer.close()
    assert [s.path for s in second.split("train").shards] == ["train/part-00000.parquet"]
    assert sorted(p.name for p in (tmp_path / "ds" / "train").iterdir()) == ["part-00000.parquet"]


def test_truncated_and_corrupt_shards_are_named(tmp_path):
    uri = str(tmp_path / "ds")
    writer = _writer(uri)
    _add(writer, "train", "a", np.zeros((4, 4), np.uint8))
    manifest = writer.close()
    shard = manifest.split("train").shards[0]
    path = tmp_path / "ds" / shard.path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"shard {uri}/train/part-00000.parquet is truncated: \d+ bytes, "
                                        rf"the manifest says {len(data)}"):
        read_shard(manifest, shard)
    path.write_bytes(data[:-20] + bytes(20))  # same length, different bytes
    with pytest.raises(DataError, match=r"shard .*part-00000.parquet has the wrong checksum"):
        read_shard(manifest, shard)
    with pytest.raises(DataError, match="is not a readable Parquet file"):
        read_shard(manifest, shard, verify=False)
    path.unlink()
    with pytest.raises(DataError, match="is listed in the manifest but missing"):
        read_shard(manifest, shard)


def test_synthetic_is_deterministic_for_a_seed(tmp_path):
    a = write_synthetic(str(tmp_path / "a"), SMALL)
    b = write_synthetic(str(tmp_path / "b"), SMALL, workers=1)
    assert [s.sha256 for s in a.split("train").shards] == [s.sha256 for s in b.split("train").shards]
    other = write_synthetic(str(tmp_path / "c"), SynthSpec(**{**SMALL.__dict__, "seed": 4}))
    assert other.split("train").shards[0].sha256 != a.split("train").shards[0].sha256
    # a sample does not depend on how many are generated
    image, label = render(SMALL, "train", 3)
    big = SynthSpec(**{**SMALL.__dict__, "num_train": 100})
    image2, label2 = render(big, "train", 3)
    assert np.array_equal(image, image2) and np.array_equal(label, label2)
    assert a.num_classes == 5 and a.classes[0] == "background" and len(a.palette) == 5
    assert a.split("train").num_samples == 12 and a.split("val").num_samples == 4


def test_synthetic_has_every_class_and_some_ignore():
    spec = SynthSpec(classes=6, size_hw=(128, 128))
    counts = np.zeros(256, np.int64)
    for i in range(40):
        counts += np.bincount(render(spec, "train", i)[1].ravel(), minlength=256)
    assert all(counts[:6] > 0) and counts[255] > 0 and counts[6:255].sum() == 0
    objects = counts[1:6] / counts[:6].sum()
    assert objects.min() > 0.02  # every object class is a real share of the pixels


def test_cli_handlers_synth_and_inspect(tmp_path, capsys):
    uri = str(tmp_path / "syn")
    args = argparse.Namespace(dst=uri, classes=4, num_train=6, num_val=2, size="48x64", seed=1, image_format="png",
                              shard_mb=256.0, overwrite=False)
    assert commands.cmd_synth(args) == 0
    assert "wrote synthetic (4 classes)" in capsys.readouterr().out
    with pytest.raises(DataError, match="already exists"):
        commands.cmd_synth(args)
    assert commands.cmd_inspect(argparse.Namespace(uri=uri, json=True, verify=True)) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["dataset"] == "synthetic" and rep["num_classes"] == 4 and rep["verified"]
    assert rep["splits"]["train"]["samples"] == 6 and rep["splits"]["val"]["samples"] == 2
    assert rep["splits"]["train"]["height"] == {"min": 48, "max": 48}
    assert rep["splits"]["train"]["width"] == {"min": 64, "max": 64}
    assert set(rep["splits"]["train"]["class_pixels"]) == set(rep["classes"])
    assert commands.cmd_inspect(argparse.Namespace(uri=uri, json=False, verify=False)) == 0
    text = capsys.readouterr().out
    assert "train: 6 samples in 1 shards" in text and "class pixels: background" in text
    with pytest.raises(ConfigError, match="bad --size 'big': expected HxW"):
        commands.cmd_synth(argparse.Namespace(dst=str(tmp_path / "x"), size="big"))
    with pytest.raises(DataError, match="--classes must be 2..32"):
        commands.cmd_synth(argparse.Namespace(dst=str(tmp_path / "x"), classes=1))


@pytest.mark.parametrize("action, argv, expected, missing", [
    ("convert", ["cityscapes", "/src", "/dst", "--variant", "59", "--splits", "train", "--limit", "3"],
     {"dataset": "cityscapes", "src": "/src", "dst": "/dst", "variant": "59", "splits": "train", "limit": 3,
      "shard_mb": 256.0, "overwrite": False, "sbd": None}, ["cityscapes", "/src"]),
    ("synth", ["/dst", "--classes", "8", "--size", "32x32", "--format", "jpeg", "--shard-mb", "0.5"],
     {"dst": "/dst", "classes": 8, "size": "32x32", "image_format": "jpeg", "shard_mb": 0.5, "num_train": 256,
      "seed": 0}, []),
    ("inspect", ["/uri", "--json", "--verify"], {"uri": "/uri", "json": True, "verify": True}, []),
])
def test_add_arguments_builds_each_action(action, argv, expected, missing, capsys):
    parser = argparse.ArgumentParser(prog=f"data {action}")
    commands.add_arguments(action, parser)
    args = vars(parser.parse_args(argv))
    assert {key: args[key] for key in expected} == expected
    assert callable(getattr(commands, f"cmd_{action}"))  # the handler cli.py wires to the action
    with pytest.raises(SystemExit):
        parser.parse_args(missing)
    assert "the following arguments are required" in capsys.readouterr().err


def test_add_arguments_refuses_unknown_datasets_and_actions(capsys):
    parser = argparse.ArgumentParser(prog="data convert")
    commands.add_arguments("convert", parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["cityscape", "/src", "/dst"])
    assert "invalid choice: 'cityscape'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown data action 'nope'"):
        commands.add_arguments("nope", argparse.ArgumentParser())


@pytest.mark.s3
def test_synth_and_inspect_on_s3(s3, capsys):
    uri = s3.url("synth")
    args = argparse.Namespace(dst=uri, classes=5, num_train=8, num_val=4, size="64x64", seed=0, image_format="png",
                              shard_mb=0.05, overwrite=False)
    assert commands.cmd_synth(args) == 0
    capsys.readouterr()
    fs, path = storage.filesystem(uri)
    assert fs.exists(f"{path}/manifest.json")
    assert commands.cmd_inspect(argparse.Namespace(uri=uri, json=True, verify=True)) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["uri"] == uri and rep["splits"]["train"]["samples"] == 8
    assert rep["splits"]["train"]["shards"] > 1  # 50 kB shards
    # a corrupt object on S3 is named too
    manifest = read_manifest(uri)
    shard = manifest.split("val").shards[0]
    data = storage.read_bytes(manifest.shard_uri(shard))
    storage.write_bytes_atomic(manifest.shard_uri(shard), data[:100])
    with pytest.raises(DataError, match=rf"shard {uri}/val/part-00000.parquet is truncated"):
        report(uri, verify=True)


def test_inspect_refuses_a_uri_without_manifest(tmp_path):
    with pytest.raises(DataError, match="no manifest at"):
        report(str(tmp_path))


def test_manifest_is_json_with_the_promised_fields(tmp_path):
    write_synthetic(str(tmp_path / "s"), SMALL)
    data = json.loads(Path(tmp_path / "s" / "manifest.json").read_text())
    for key in ("name", "dataset", "num_classes", "classes", "palette", "splits", "format", "format_version"):
        assert key in data
    shard = data["splits"]["train"]["shards"][0]
    assert set(shard) >= {"path", "num_samples", "num_bytes", "sha256"}
    assert data["splits"]["train"]["num_samples"] == 12
