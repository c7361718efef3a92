"""The input pipeline: plain-Python iterators, and Ray Data on the test Ray head over shards on the S3 endpoint.

The Ray tests connect to the shared head (`ray_cluster`) with the S3 endpoint's variables in the job's
runtime env, so that read and decode tasks reach the moto server too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ocr_cluster.config import DataSection
from ocr_cluster.data import DataError, batches, codec, pipeline
from ocr_cluster.data.shards import DatasetWriter, read_manifest
from ocr_cluster.data.synth import SynthSpec, write_synthetic

SPEC = SynthSpec(classes=5, num_train=16, num_val=6, size_hw=(48, 64), seed=0)


def _data(uri: str, **kwargs) -> DataSection:
    return DataSection(**{"dataset": "synthetic", "uri": uri, "crop_size": "32x32", "scale": "64x48", **kwargs})


@pytest.fixture(scope="module")
def local_synth(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("synth") / "ds")
    write_synthetic(uri, SPEC, shard_mb=0.05)  # several shards per split
    return uri


def _bad_dataset(uri: str, *, bad_image: str | None = None, bad_label: str | None = None, n: int = 6) -> None:
    writer = DatasetWriter(uri, name="synthetic", dataset="synthetic", classes=["a", "b", "c"],
                           palette=[[0, 0, 0]] * 3)
    for i in range(n):
        key = f"s{i}"
        label = np.full((16, 16), i % 3, np.uint8)
        label[:8] = (i + 1) % 3
        image = codec.encode_image(np.full((16, 16, 3), 40 * i, np.uint8))
        label_png = codec.encode_label(label)
        if key == bad_image:
            image = b"\xff\xd8\xff\xe0 this is not a JPEG"
        if key == bad_label:
            label_png = codec.encode_label(np.where(label == 1, 7, label).astype(np.uint8))
        writer.add("train", key, image, label_png, label_array=label, height=16, width=16,
                   image_format="png")
    writer.close()


# ---------------------------------------------------------------------------------------------
# Without Ray


def test_iter_train_is_deterministic_per_seed_epoch_and_rank(local_synth):
    data = _data(local_synth)
    first = list(pipeline.iter_train(data, seed=7, num_epochs=2))
    again = list(pipeline.iter_train(data, seed=7, num_epochs=2))
    assert [i["key"] for i in first] == [i["key"] for i in again]
    assert all(np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
               for a, b in zip(first, again))
    epoch0 = [i for i in first if i["epoch"] == 0]
    epoch1 = [i for i in first if i["epoch"] == 1]
    assert sorted(i["key"] for i in epoch0) == sorted(i["key"] for i in epoch1) == [f"train_{i:06d}" for i in range(16)]
    assert [i["key"] for i in epoch0] != [i["key"] for i in epoch1]  # reshuffled per epoch
    by_key = {i["key"]: i for i in epoch1}
    assert not any(np.array_equal(i["image"], by_key[i["key"]]["image"]) for i in epoch0)  # re-augmented
    other_seed = list(pipeline.iter_train(data, seed=8, num_epochs=1))
    assert [i["key"] for i in other_seed] != [i["key"] for i in epoch0]
    # two workers split each epoch; each item is the same crop the single worker got
    ranks = [list(pipeline.iter_train(data, seed=7, num_epochs=1, rank=r, world_size=2)) for r in (0, 1)]
    keys = [[i["key"] for i in items] for items in ranks]
    assert len(keys[0]) == len(keys[1]) == 8 and not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(i["key"] for i in epoch0)
    single = {i["key"]: i for i in epoch0}
    assert all(np.array_equal(i["image"], single[i["key"]]["image"]) for i in ranks[1])
    # a resumed stream (start_epoch) is the same stream from that epoch on
    resumed = list(pipeline.iter_train(data, seed=7, start_epoch=1, num_epochs=1))
    assert [i["key"] for i in resumed] == [i["key"] for i in epoch1]


def test_iter_train_batches_and_endless_stream(local_synth):
    stream = pipeline.iter_train(_data(local_synth), seed=0, batch_size=5)  # no num_epochs: endless
    batches = [next(stream) for _ in range(8)]  # 40 samples = 2.5 epochs
    assert batches[0]["image"].shape == (5, 3, 32, 32) and batches[0]["image"].dtype == np.float32
    assert batches[0]["label"].shape == (5, 32, 32) and batches[0]["label"].dtype == np.uint8
    assert [e for b in batches for e in b["epoch"]][-1] == 2
    labels = np.concatenate([b["label"] for b in batches])
    assert set(np.unique(labels)) <= set(range(5)) | {255}


def test_iter_eval_reads_each_whole_image_once(local_synth):
    data = _data(local_synth)
    shares = [list(pipeline.iter_eval(data, rank=r, world_size=4)) for r in range(4)]
    keys = sorted(i["key"] for share in shares for i in share)
    assert keys == [f"val_{i:06d}" for i in range(6)]
    assert [len(s) for s in shares] == [1, 2, 1, 2]  # contiguous ranges: [0, 1), [1, 3), [3, 4), [4, 6)
    assert [i["key"] for i in shares[1]] == ["val_000001", "val_000002"]
    item = shares[0][0]
    assert item["label"].shape == (48, 64) and item["image"].shape == (3, 48, 64)
    assert (item["height"], item["width"]) == (48, 64)
    small = list(pipeline.iter_eval(_data(local_synth, scale="32x24")))[0]
    assert small["image"].shape == (3, 24, 32) and small["label"].shape == (48, 64)


def test_eval_workers_read_only_their_own_shards(tmp_path):
    uri = str(tmp_path / "ds")
    write_synthetic(uri, SynthSpec(classes=3, num_train=1, num_val=4, size_hw=(32, 32)), shard_mb=0.001)
    manifest = read_manifest(uri)
    assert len(manifest.split("val").shards) == 4  # one sample per shard
    last = Path(uri) / manifest.split("val").shards[-1].path
    last.write_bytes(last.read_bytes()[:-10])
    assert [i["key"] for i in pipeline.iter_eval(_data(uri), rank=0, world_size=2)] == ["val_000000", "val_000001"]
    with pytest.raises(DataError, match="part-00003.parquet is truncated"):
        list(pipeline.iter_eval(_data(uri), rank=1, world_size=2))


def test_dataset_name_and_split_are_checked(local_synth, tmp_path):
    with pytest.raises(DataError, match=r"data.dataset is 'cityscapes' but the shards at .* hold 'synthetic'"):
        next(pipeline.iter_train(DataSection(dataset="cityscapes", uri=local_synth)))
    with pytest.raises(DataError, match=r"has no split 'test' \(splits: train, val\)"):
        next(pipeline.iter_eval(_data(local_synth), split="test"))
    with pytest.raises(DataError, match="no manifest at"):
        next(pipeline.iter_train(_data(str(tmp_path))))


def test_epochs_for_and_epoch_at(local_synth):
    manifest = read_manifest(local_synth)  # 16 training samples
    assert pipeline.epochs_for(10, 8, manifest) == 6  # 80 samples = 5 epochs, + 1 spare
    assert pipeline.epoch_at(10, 8, manifest) == 5
    assert pipeline.epochs_for(10, 8, manifest, start_epoch=3) == 3


def test_bad_image_is_one_error_naming_shard_and_key(tmp_path):
    uri = str(tmp_path / "bad")
    _bad_dataset(uri, bad_image="s3")
    with pytest.raises(DataError, match=rf"^shard {uri}/train/part-00000.parquet: sample 's3': "
                                        r"image cannot be decoded"):
        list(pipeline.iter_train(_data(uri), num_epochs=1))
    stats = pipeline.Stats()
    items = list(pipeline.iter_train(_data(uri, skip_bad_samples=True), num_epochs=1, stats=stats))
    assert len(items) == 5 and stats.skipped == 1 and stats.samples == 5 and "'s3'" in stats.messages[0]


def test_bad_label_values_are_one_error_naming_shard_and_key(tmp_path):
    uri = str(tmp_path / "bad")
    _bad_dataset(uri, bad_label="s1")
    with pytest.raises(DataError, match=r"part-00000.parquet: sample 's1': label has values outside \[0, 3\) "
                                        r"and 255: 7$"):
        list(pipeline.iter_eval(_data(uri), split="train"))
    stats = pipeline.Stats()
    assert len(list(pipeline.iter_eval(_data(uri, skip_bad_samples=True), split="train", stats=stats))) == 5
    assert stats.skipped == 1


def test_truncated_or_corrupt_shard_is_named_or_skipped_whole(tmp_path):
    uri = str(tmp_path / "bad")
    _bad_dataset(uri)
    shard = Path(uri) / "train" / "part-00000.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(DataError, match=rf"shard {uri}/train/part-00000.parquet is truncated"):
        list(pipeline.iter_train(_data(uri), num_epochs=1))
    stats = pipeline.Stats()
    assert list(pipeline.iter_train(_data(uri, skip_bad_samples=True), num_epochs=1, stats=stats)) == []
    assert stats.skipped == 6 and "truncated" in stats.messages[0]
    shard.write_bytes(data[:200] + bytes([data[200] ^ 1]) + data[201:])
    with pytest.raises(DataError, match="has the wrong checksum"):
        list(pipeline.iter_train(_data(uri), num_epochs=1))


# ---------------------------------------------------------------------------------------------
# Ray Data (the shared test head) over shards on the S3 endpoint


@pytest.fixture(scope="module")
def ray_s3(ray_cluster, _s3_service):
    import ray

    ray.init(address=ray_cluster.address, runtime_env={"env_vars": dict(_s3_service.env)},
             log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture
def s3_synth(s3) -> str:
    uri = s3.url("pipeline")
    write_synthetic(uri, SPEC, shard_mb=0.05)
    return uri


@pytest.mark.ray
@pytest.mark.s3
def test_ray_train_dataset_from_s3_matches_the_plain_iterator(ray_s3, s3_synth):
    data = _data(s3_synth)
    ds = pipeline.train_dataset(data, seed=3, start_epoch=1, num_epochs=2)
    rows = ds.take_all()
    assert len(rows) == 32
    assert rows[0]["image"].shape == (3, 32, 32) and rows[0]["image"].dtype == np.float32
    assert rows[0]["label"].shape == (32, 32) and rows[0]["label"].dtype == np.uint8
    assert sorted(r["key"] for r in rows) == sorted([f"train_{i:06d}" for i in range(16)] * 2)
    plain = {(i["epoch"], i["key"]): i for i in pipeline.iter_train(data, seed=3, start_epoch=1, num_epochs=2)}
    got = {}
    for r in rows:  # which epoch a row came from: the plain crop it equals
        matches = [e for e in (1, 2) if np.array_equal(r["image"], plain[(e, r["key"])]["image"])]
        assert len(matches) == 1 and np.array_equal(r["label"], plain[(matches[0], r["key"])]["label"])
        got[(matches[0], r["key"])] = True
    assert len(got) == 32


def test_train_collate_makes_writable_tensors_once_with_int64_labels_on_cpu_and_keys_on_request():
    import warnings

    import torch

    images = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    labels = np.array([[[0, 1, 255, 3, 4]] * 4, [[4, 3, 2, 1, 0]] * 4], np.uint8)
    for array in (images, labels):
        array.flags.writeable = False  # as batches from the object store are
    batch = {"image": images, "label": labels, "key": np.array(["train_000001", "straße_7"], dtype=object)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only array
        out = batches.TrainCollate("cpu", keys=True)(batch)
    assert out["image"].dtype == torch.float32 and torch.equal(out["image"], torch.from_numpy(images.copy()))
    assert out["label"].dtype == torch.int64 and out["label"].tolist() == labels.tolist()
    assert not out["image"].is_pinned()  # pinned memory only for a GPU
    out["image"].add_(1)  # the tensors own their memory: the batch is untouched
    assert np.array_equal(images, batch["image"])
    assert batches.decode_keys(out["key"]) == ["train_000001", "straße_7"]
    assert set(batches.TrainCollate("cpu")(batch)) == {"image", "label"}  # no keys unless asked
    crops = {"image": np.zeros((2, 4, 5, 3), np.uint8), "label": labels, "key": batch["key"],
             "valid_hw": np.array([[4, 5], [3, 2]], np.int32)}
    out = batches.TrainCollate("cpu")(crops)  # uint8 crops for the device's normalisation: as they come
    assert (out["image"].dtype, out["valid_hw"].dtype) == (torch.uint8, torch.int32)
    assert out["valid_hw"].tolist() == [[4, 5], [3, 2]]


@pytest.mark.ray
@pytest.mark.s3
def test_torch_batches_from_ray_data_equal_the_rows_with_int64_labels(ray_s3, s3_synth):
    import torch

    data = _data(s3_synth)
    plain = {i["key"]: i for i in pipeline.iter_train(data, seed=3, start_epoch=1, num_epochs=1)}
    ds = pipeline.train_dataset(data, seed=3, start_epoch=1, num_epochs=1)
    seen = []
    for batch in batches.torch_batches(ds, 4, keys=True):
        assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].dtype == torch.int64
        for key, image, label in zip(batch["key"], batch["image"], batch["label"]):
            assert np.array_equal(image.numpy(), plain[key]["image"])
            assert np.array_equal(label.numpy(), plain[key]["label"].astype(np.int64))
        seen += batch["key"]
    assert sorted(seen) == sorted(plain)
    assert all(set(batch) == {"image", "label"} for batch in batches.torch_batches(ds, 8))
    # uint8 crops (cluster.normalize_on: device), normalised by torch_batches: the same tensors to the bit,
    # padded crops included (scale 64x48 at ratio < 0.67 resizes below the 32x32 crop)
    uint8 = pipeline.train_dataset(data, seed=3, start_epoch=1, num_epochs=1, uint8=True)
    row = uint8.take(1)[0]
    assert row["image"].dtype == np.uint8 and row["image"].shape == (32, 32, 3) and row["valid_hw"].shape == (2,)
    with pytest.raises(ValueError, match="normalize"):
        next(iter(batches.torch_batches(uint8, 4)))
    padded, seen = 0, []
    for batch in batches.torch_batches(uint8, 4, keys=True, normalize=(data.mean, data.std)):
        assert batch["image"].dtype == torch.float32 and batch["image"].is_contiguous()  # NCHW, as decoded
        assert batch["label"].dtype == torch.int64
        for key, image, label in zip(batch["key"], batch["image"], batch["label"]):
            assert np.array_equal(image.numpy(), plain[key]["image"]), key
            assert np.array_equal(label.numpy(), plain[key]["label"].astype(np.int64)), key
            padded += bool((label == 255).all(dim=0).any() or (label == 255).all(dim=1).any())
        seen += batch["key"]
    assert sorted(seen) == sorted(plain) and padded > 0


@pytest.mark.ray
@pytest.mark.s3
def test_ray_eval_dataset_splits_whole_images_across_workers(ray_s3, s3_synth):
    data = _data(s3_synth)
    keys = []
    for rank in range(2):
        for batch in pipeline.eval_dataset(data, rank=rank, world_size=2).iter_batches(batch_size=1,
                                                                                      batch_format="numpy"):
            assert batch["image"].shape == (1, 3, 48, 64) and batch["label"].shape == (1, 48, 64)
            keys.append((rank, str(batch["key"][0])))
    assert sorted(k for _, k in keys) == [f"val_{i:06d}" for i in range(6)]
    assert {k for r, k in keys if r == 0} == {f"val_{i:06d}" for i in (0, 1, 2)}


@pytest.mark.ray
def test_ray_bad_data_names_shard_and_key_or_is_counted(ray_s3, tmp_path):
    uri = str(tmp_path / "bad")
    _bad_dataset(uri, bad_image="s2")
    with pytest.raises(Exception, match=r"part-00000.parquet: sample 's2': image cannot be decoded") as info:
        pipeline.train_dataset(_data(uri)).take_all()
    assert isinstance(info.value, DataError) or "DataError" in str(info.value)
    counter = pipeline.SkipCounter()
    rows = pipeline.train_dataset(_data(uri, skip_bad_samples=True), skip_counter=counter).take_all()
    assert len(rows) == 5 and counter.total() == 1 and "'s2'" in counter.messages()[0]


@pytest.mark.ray
@pytest.mark.s3
def test_torch_trainer_workers_get_distinct_samples_from_s3(ray_s3, s3_synth, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    out_dir = tmp_path / "seen"
    out_dir.mkdir()

    def train_fn(config):
        import ray.train as rt

        from ocr_cluster.data.batches import torch_batches

        ctx = rt.get_context()
        keys, shapes = [], set()
        for batch in torch_batches(rt.get_dataset_shard("train"), batch_size=4, keys=True):
            keys += batch["key"]
            shapes.add((tuple(batch["image"].shape), str(batch["image"].dtype), str(batch["label"].dtype)))
        Path(config["out"], f"rank{ctx.get_world_rank()}.json").write_text(
            json.dumps({"keys": keys, "shapes": sorted(map(list, shapes))}))
        rt.report({"n": len(keys)})

    trainer = TorchTrainer(
        train_fn, train_loop_config={"out": str(out_dir)},
        datasets={"train": pipeline.train_dataset(_data(s3_synth), seed=1)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "runs"), name="data-distinct"))
    trainer.fit()
    seen = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    keys0, keys1 = seen[0]["keys"], seen[1]["keys"]
    assert len(keys0) == len(keys1) == 8
    assert not set(keys0) & set(keys1)
    assert sorted(keys0 + keys1) == [f"train_{i:06d}" for i in range(16)]
    assert seen[0]["shapes"] == [[[4, 3, 32, 32], "torch.float32", "torch.int64"]]
