"""Published numbers pinned to the seeds' tables, and the results index's staleness on the test S3 endpoint."""

from __future__ import annotations

import multiprocessing as mp
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ocr_cluster import config, storage
from ocr_cluster.results import compact, published, read_runs, row_from_config, write_run
from ocr_cluster.results import store as store_mod

JOBS = sorted(p for p in (Path(__file__).resolve().parents[1] / "jobs").glob("*/*.yaml") if p.parent.name != "_base_")
ANOTHER_NODE = mp.get_context("spawn")  # a fresh interpreter: its own s3fs instance and listing cache


# --------------------------------------------------------------------------------------------- published


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.stem)
def test_every_job_finds_exactly_one_published_row(job):
    run = row_from_config(config.load(str(job), []), status="completed", miou=0.0)
    hits = [pub for pub in published.load() if published.matches(run, pub)]
    assert hits, job.name
    assert published.find(run) is hits[0]
    # The first matching table decides, so it must not hold two rows for the job: mmseg's own README for every
    # job but OCRNet (w/ dropout), which only the openseg-group fork's variant table reports.
    assert [pub["source"] for pub in hits].count(hits[0]["source"]) == 1, (job.name, hits)
    assert hits[0]["source"] == ("openseg-mmseg" if "dropout" in job.name else "mmseg")


# Values read from the sources themselves, at least one per table: the seeds' READMEs (/work/shared/seeds: 000 =
# openseg-group/mmsegmentation, 001 = sssegmentation, 002 = mmseg 1.x, 004 = OCNet.pytorch) and, for the
# READMEs that are no seed, OCRNET_SPEC.md 8.3 (HRNet-OCR) and 8.4 (openseg MODEL_ZOO). The spec's 8.5 copy of
# sssegmentation differs from seed 001 (e.g. W48 Cityscapes 81.56 there, 81.44 in the seed): the seed is pinned.
# (source, fields that pick exactly one row, miou runs, ms+flip runs).
PINNED = [
    ("mmseg", dict(dataset="cityscapes", backbone="hrnetv2_w18_small", iters=40000), [76.61], [78.01]),  # 002
    ("mmseg", dict(dataset="cityscapes", backbone="hrnetv2_w18", iters=160000), [79.47], [80.91]),
    ("mmseg", dict(dataset="cityscapes", backbone="resnet101_d8", batch_size=16, iters=80000), [80.81], []),
    ("mmseg", dict(dataset="ade20k", backbone="hrnetv2_w48", iters=160000), [43.25], [44.88]),
    ("mmseg", dict(dataset="voc-aug", backbone="hrnetv2_w18", iters=40000), [74.98], [77.40]),
    ("mmseg-0.x", dict(dataset="cityscapes", backbone="hrnetv2_w18_small", iters=40000), [74.30], [75.95]),  # 000
    ("openseg-mmseg", dict(dataset="cityscapes", method="OCRNet (w/ dropout)", iters=80000), [81.15], []),
    ("openseg-mmseg", dict(dataset="cityscapes", method="OCRNet", backbone="resnet101_d8", batch_size=16,
                           iters=40000, mem_gb=None), [80.29, 80.65], []),
    ("openseg-mmseg", dict(dataset="cityscapes", method="OCRNet", backbone="resnet101_d8", batch_size=16,
                           iters=40000, mem_gb=8.8), [80.29, 80.30, 80.65], []),
    ("sssegmentation", dict(dataset="cityscapes", backbone="hrnetv2_w48"), [81.44], []),  # 001
    ("sssegmentation", dict(dataset="ade20k", backbone="hrnetv2_w18_small"), [38.04], []),
    ("OCNet", dict(dataset="ade20k"), [45.45], []),  # 004
    ("openseg", dict(dataset="cityscapes", method="OCR", variant=None), [79.63], []),  # spec 8.4
    ("openseg", dict(dataset="ade20k", backbone="hrnetv2_w48"), [44.62], [46.19]),
    ("HRNet-OCR", dict(dataset="cityscapes", split="val", method="HRNetV2-W48 + OCR"), [81.6], []),  # spec 8.3
    ("HRNet-OCR", dict(dataset="pascal-context-59", method="HRNetV2-W48 + OCR"), [], [56.2]),
]


@pytest.mark.parametrize("source, key, miou, msflip", PINNED, ids=lambda v: v if isinstance(v, str) else None)
def test_published_values_match_the_seed_tables(source, key, miou, msflip):
    hits = [r for r in published.load() if r["source"] == source and all(r[k] == v for k, v in key.items())]
    assert len(hits) == 1, hits
    assert (hits[0]["miou"], hits[0]["miou_msflip"]) == (miou, msflip)


def test_every_seed_table_has_pinned_values():
    assert {source for source, *_ in PINNED} == {r["source"] for r in published.load()}


# --------------------------------------------------------------------------------------------- index on S3


def cell(i: int) -> dict:
    cfg = config.load(None, ["data.dataset=cityscapes", "data.crop_size=512x1024", f"run.seed={i}"])
    return row_from_config(cfg, status="completed", miou=70.0 + i / 10)


def _write_elsewhere(store: str, i: int) -> None:
    write_run(store, cell(i))


def write_from_another_process(store: str, i: int) -> None:
    """A writer with its own s3fs instance and listing cache, as another node would be."""
    child = ANOTHER_NODE.Process(target=_write_elsewhere, args=(store, i))
    child.start()
    child.join(60)
    assert child.exitcode == 0


def mious(store: str) -> list[float]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return sorted(read_runs(store)["miou"].to_pylist())


@pytest.mark.s3
def test_s3_files_written_after_the_index_are_read(s3, monkeypatch):
    monkeypatch.setattr(store_mod, "AUTO_INDEX_MIN", 3)
    store = s3.url("index-after")
    for i in range(3):
        write_run(store, cell(i))
    assert mious(store) == [70.0, 70.1, 70.2]  # writes the index
    assert len(store_mod._index_files(*storage.filesystem(store))) == 1
    write_from_another_process(store, 5)       # this process's s3fs has the old listing cached
    assert mious(store) == [70.0, 70.1, 70.2, 70.5]


@pytest.mark.s3
def test_s3_compaction_while_a_reader_holds_the_old_index(s3, monkeypatch):
    monkeypatch.setattr(store_mod, "AUTO_INDEX_MIN", 2)
    store = s3.url("index-race")
    for i in range(3):
        write_run(store, cell(i))
    compact(store)
    write_from_another_process(store, 7)  # listed by the reader below, but in no index yet
    real = store_mod._index_files
    raced = []

    def listed_then_compacted(fs, root):
        names = real(fs, root)
        if not raced:  # the reader has chosen its index; other processes compact it away before it reads it
            raced.append(names[-1])
            for _ in range(store_mod.INDEXES_KEPT + 1):
                compact(store)
        return names

    monkeypatch.setattr(store_mod, "_index_files", listed_then_compacted)
    assert mious(store) == [70.0, 70.1, 70.2, 70.7]
    fs, root = storage.filesystem(store)
    assert raced and not fs.exists(raced[0])  # the race happened: the index it had listed was gone


@pytest.mark.s3
def test_s3_index_of_an_older_schema_does_not_hide_newer_columns(s3, monkeypatch):
    store = s3.url("index-old")
    uris = [write_run(store, cell(i) | {"fps": 10.0 + i}) for i in range(2)]
    fs, root = storage.filesystem(store)
    rels = [uri[len(f"s3://{root}"):].lstrip("/") for uri in uris]
    # An index as an older version wrote it: no fps column, batch_size int64, a schema_version of 0.
    old = pa.table({"schema_version": pa.array([0, 0], pa.int16()), "run_id": [cell(i)["run_id"] for i in range(2)],
                    "dataset": ["cityscapes"] * 2, "status": ["completed"] * 2, "miou": [70.0, 70.1],
                    "batch_size": pa.array([8, 8], pa.int64()), "file": rels})
    sink = pa.BufferOutputStream()
    pq.write_table(old, sink)
    storage.write_bytes_atomic(storage.join(store, store_mod.INDEX_DIR, "index-20990101T000000000000Z-old.parquet"),
                               sink.getvalue().to_pybytes())
    runs = {r["run_id"]: r for r in read_runs(store).to_pylist()}
    assert sorted(r["fps"] for r in runs.values()) == [10.0, 11.0]
    assert all(r["iters"] == cell(0)["iters"] for r in runs.values())
