"""A run's identity includes its dataset: data.fingerprint, from the manifest's shard checksums, is part of
the run id, so a dataset moved to another prefix keeps the id (and its completed row), and another dataset
against the same store gets a new id instead of "already completed"."""

from __future__ import annotations

import copy

import pytest

from ocr_cluster import config, storage
from ocr_cluster.data.shards import Manifest, ShardInfo, SplitInfo

# ---------------------------------------------------------------------------------------------
# The fingerprint and the resolver


def manifest(uri: str = "s3://a/data") -> Manifest:
    shards = [ShardInfo("train/part-00000.parquet", 8, 1000, "a" * 64, crc32="0000abcd"),
              ShardInfo("train/part-00001.parquet", 4, 600, "b" * 64, crc32="0000abce")]
    splits = {"train": SplitInfo(12, shards), "val": SplitInfo(2, [ShardInfo("val/part-00000.parquet", 2, 300,
                                                                             "c" * 64)])}
    out = Manifest(name="synthetic", dataset="synthetic", num_classes=3, classes=["a", "b", "c"],
                   palette=[[0, 0, 0]] * 3, splits=splits, created_at="2025-01-01T00:00:00+00:00")
    out.uri = uri
    return out


def test_fingerprint_is_stable_and_ignores_where_the_data_lives():
    first = manifest()
    assert len(first.fingerprint) == 17 and first.fingerprint[0] == "d" and int(first.fingerprint[1:], 16) >= 0
    assert manifest().fingerprint == first.fingerprint
    moved = Manifest.from_json(first.to_json(), uri="gs://elsewhere/prefix/data")
    assert moved.fingerprint == first.fingerprint
    rewritten = copy.deepcopy(first)
    rewritten.created_at, rewritten.created_by, rewritten.name = "2030-01-01T00:00:00+00:00", "x", "copy"
    assert rewritten.fingerprint == first.fingerprint  # when and by whom it was written is not the data


@pytest.mark.parametrize("change", [
    lambda m: setattr(m.splits["train"].shards[1], "sha256", "d" * 64),
    lambda m: setattr(m.splits["val"].shards[0], "num_bytes", 301),
    lambda m: setattr(m.splits["train"].shards[0], "num_samples", 9),
    lambda m: setattr(m.splits["train"].shards[0], "path", "train/part-00009.parquet"),
    lambda m: m.splits["train"].shards.pop(),
    lambda m: setattr(m, "classes", ["a", "b", "z"]),
])
def test_fingerprint_changes_with_the_data(change):
    other = manifest()
    change(other)
    assert other.fingerprint != manifest().fingerprint


def test_with_dataset_fills_in_the_fingerprint_and_refuses_another_pinned_one():
    cfg = config.load()
    resolved = config.with_dataset(cfg, "d0123456789abcdef")
    assert resolved.data.fingerprint == "d0123456789abcdef" and cfg.data.fingerprint == ""
    assert resolved.run_id != cfg.run_id != config.with_dataset(cfg, "dfedcba9876543210").run_id
    assert config.with_dataset(resolved, "d0123456789abcdef").run_id == resolved.run_id
    assert config.loads_yaml(resolved.to_yaml()).run_id == resolved.run_id  # rows and workers see the same id
    with pytest.raises(config.ConfigError) as info:
        config.with_dataset(resolved, "dfedcba9876543210", "s3://b/other")
    assert str(info.value) == ("data.fingerprint is d0123456789abcdef but the dataset at s3://b/other has "
                               "dfedcba9876543210")


def test_an_unresolved_config_keeps_its_old_id():
    """Old rows' config_yaml has no data.fingerprint: it loads, with the id it had (the empty default is
    left out of the hash)."""
    cfg = config.load()
    old = "\n".join(line for line in cfg.to_yaml().splitlines() if "fingerprint" not in line)
    assert "fingerprint" not in old and config.loads_yaml(old).run_id == cfg.run_id == config.run_id(cfg)


# ---------------------------------------------------------------------------------------------
# On the real services: the CLI and the driver


def synth(uri: str, seed: int) -> Manifest:
    from ocr_cluster.data.synth import SynthSpec, write_synthetic

    return write_synthetic(uri, SynthSpec(classes=3, num_train=8, num_val=2, size_hw=(64, 64), seed=seed))


def copy_dataset(src: str, dst: str) -> None:
    """A byte-identical copy of every object of the dataset at `src`, at `dst`."""
    fs, root = storage.filesystem(src)
    for path in storage.list_files(src):
        storage.write_bytes_atomic(storage.join(dst, path[len(root):].lstrip("/")), fs.cat_file(path))


def test_a_moved_dataset_keeps_its_run_and_another_dataset_gets_a_new_one(s3, cli):
    from ocr_cluster.results import row_from_config, write_run
    from ocr_cluster.train.driver import absolute_local_paths, preflight
    from ocr_cluster.train.results import completed_row

    root = s3.url("identity")
    first, other, moved = f"{root}/first", f"{root}/other", f"{root}/moved/first"
    synth(first, seed=0)
    synth(other, seed=1)  # the same recipe on another seed: other images, other checksums
    copy_dataset(first, moved)
    job = ["--set", f"storage.checkpoint_uri={root}/runs", "--set", f"results.store_uri={root}/results",
           "--set", "cluster.num_workers=1", "--set", "schedule.iters=2"]

    def on(uri: str, *args: str, module: str | None = None):
        return cli(*([] if module else ["train"]), *job, "--set", f"data.uri={uri}", *args, module=module)

    ids = {}
    for uri in (first, moved, other):
        result = on(uri, "--print-run-id")
        assert result.returncode == 0, result.stderr
        ids[uri] = result.stdout.strip()
    assert ids[moved] == ids[first] and ids[other] != ids[first], ids

    # A completed row for the first dataset's run, as the driver would have written it.
    printed = on(first, "--print-config")
    assert printed.returncode == 0, printed.stderr
    header, _, body = printed.stdout.partition("\n")
    resolved = config.loads_yaml(body)
    assert header == f"# run_id: {ids[first]}" and resolved.run_id == ids[first]
    write_run(resolved.results.store_uri, row_from_config(resolved, status="completed", miou=61.25))

    # The moved copy is the same run: the driver stops at its completed row (before Ray starts).
    again = on(moved, module="ocr_cluster.train")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"run {ids[first]} " in again.stdout and "is already completed: mIoU 61.25" in again.stdout

    # The other dataset is another run: the driver's own preflight resolves it to a new id, with no row.
    other_cfg = config.load(overrides=[*job[1::2], f"data.uri={other}"])
    start = preflight(absolute_local_paths(other_cfg))
    assert start.layout.run_id == start.config.run_id == ids[other] != ids[first]
    assert completed_row(start.config, start.layout.run_id) is None


def test_a_pinned_fingerprint_of_another_dataset_and_no_manifest_are_one_line(s3, cli):
    root = s3.url("pinned")
    fingerprint = synth(f"{root}/data", seed=2).fingerprint
    job = ["--set", f"data.uri={root}/data", "--set", f"storage.checkpoint_uri={root}/runs",
           "--set", f"results.store_uri={root}/results"]

    pinned = cli("train", *job, "--set", f"data.fingerprint={fingerprint}", "--print-run-id")
    assert pinned.returncode == 0, pinned.stderr
    expected = f"data.fingerprint is d0000000000000000 but the dataset at {root}/data has {fingerprint}"
    for args, module in ((["train", "--print-run-id"], None), ([], "ocr_cluster.train")):
        wrong = cli(*args, *job, "--set", "data.fingerprint=d0000000000000000", module=module)
        assert wrong.returncode == 2, wrong.stdout + wrong.stderr
        assert wrong.stderr.strip().splitlines() == [f"{module and 'python -m ' + module or 'ocr-cluster train'}"
                                                    f": error: {expected}"], wrong.stderr
    assert not storage.list_files(f"{root}/results")  # nothing written

    missing = cli("train", "--set", f"data.uri={root}/nothing", "--print-run-id")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [
        f"ocr-cluster train: error: no manifest at {root}/nothing; was the conversion interrupted? "
        f"(expected {root}/nothing/manifest.json)"], missing.stderr
