"""storage.py on local paths and on the real S3 endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ocr_cluster import storage
from ocr_cluster.storage import StorageError


def test_schemes():
    assert storage.scheme("/tmp/x") == "file"
    assert storage.scheme("file:///tmp/x") == "file"
    assert storage.scheme("s3://bucket/x") == "s3"
    assert storage.scheme("gs://bucket/x") == "gs"
    with pytest.raises(StorageError, match=r"unsupported URL scheme 'ftp://'.*use s3://, gs://, file://"):
        storage.scheme("ftp://host/x")
    with pytest.raises(StorageError, match="names no bucket"):
        storage.filesystem("s3:///just/a/path")


def test_local_paths_resolve(tmp_path):
    fs, path = storage.filesystem(f"file://{tmp_path}/a")
    assert path == f"{tmp_path}/a"
    afs, apath = storage.arrow_filesystem(str(tmp_path / "a"))
    assert apath == f"{tmp_path}/a" and afs.type_name == "local"


def test_atomic_write_local_replaces_whole_file(tmp_path):
    target = tmp_path / "deep" / "dir" / "obj.bin"
    storage.write_bytes_atomic(str(target), b"first")
    storage.write_bytes_atomic(f"file://{target}", b"second version")
    assert target.read_bytes() == b"second version"
    assert sorted(p.name for p in target.parent.iterdir()) == ["obj.bin"]  # no temp file left


def test_failed_local_write_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "obj.bin"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes_atomic(str(target), b"x" * 1000)
    assert list(tmp_path.iterdir()) == []


def test_read_missing_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(str(tmp_path / "absent"))


@pytest.mark.s3
def test_parquet_round_trip_on_s3(s3):
    root = s3.url("parquet")
    table = pa.table({"key": ["a", "b", "c"], "miou": [77.72, 80.58, 81.35]})
    fs, path = storage.arrow_filesystem(storage.join(root, "runs", "part-0.parquet"))
    assert not path.startswith("s3://") and path.startswith(s3.bucket + "/")
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    # the same object through fsspec, and listed
    assert storage.exists(storage.join(root, "runs", "part-0.parquet"))
    assert storage.list_files(root, ".parquet") == [path]


@pytest.mark.s3
def test_atomic_write_and_read_on_s3(s3):
    url = storage.join(s3.url("atomic"), "obj.bin")
    storage.write_bytes_atomic(url, b"payload")
    storage.write_bytes_atomic(url, b"payload 2")
    assert storage.read_bytes(url) == b"payload 2"
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(url + ".missing")


@pytest.mark.s3
def test_s3_endpoint_comes_from_the_environment(s3, monkeypatch):
    fs, _ = storage.filesystem(f"s3://{s3.bucket}/x")
    assert fs.client_kwargs.get("endpoint_url") == s3.endpoint_url
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # the S3-specific variable wins
    fs, _ = storage.filesystem(f"s3://{s3.bucket}/x")
    assert fs.client_kwargs.get("endpoint_url") == "http://127.0.0.1:9"
