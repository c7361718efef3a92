"""Filesystems from URLs: s3://, gs://, file:// and plain paths.

Credentials and endpoints come from the environment, never from config files:
- S3: the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
  AWS_DEFAULT_REGION, AWS_PROFILE) and AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for S3-compatible stores
  (MinIO, Ceph, moto).
- GCS: gcsfs's usual sources (GOOGLE_APPLICATION_CREDENTIALS, gcloud, metadata server); needs
  the `gcs` extra.

pyarrow's native S3 filesystem ignores AWS_ENDPOINT_URL, so the pyarrow filesystem for s3:// wraps
the same s3fs instance (Ray's `storage_filesystem` and pyarrow datasets use it).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ocr_cluster.errors import UserInputError

REMOTE_SCHEMES = ("s3", "gs")
# The userinfo of a URL: `user@`, or `user:password@` where an unencoded password may hold '/' (AWS secrets do).
_USERINFO = re.compile(r"\b([a-zA-Z][\w+.-]*://)[^\s/@:'\"]*(?::[^\s@'\"]*)?@")


class StorageError(UserInputError):
    """A URL that cannot be used; the message is one line meant for the user."""


def scheme(url: str) -> str:
    """'s3', 'gs' or 'file'."""
    parsed = urlparse(str(url))
    if parsed.scheme in ("", "file"):
        return "file"
    if parsed.scheme in ("s3", "s3a"):
        return "s3"
    if parsed.scheme in ("gs", "gcs"):
        return "gs"
    raise StorageError(f"unsupported URL scheme '{parsed.scheme}://' in {url!r}; use s3://, gs://, file:// or a path")


def redact(text: str) -> str:
    """`text` with the userinfo of every URL in it masked: s3://KEY:SECRET@host/bucket -> s3://***@host/bucket."""
    return _USERINFO.sub(r"\1***@", text)


def is_remote(url: str) -> bool:
    return scheme(url) in REMOTE_SCHEMES


def local_path(url: str) -> str:
    """Absolute local path of a file:// URL or plain path."""
    text = str(url)
    if text.startswith("file://"):
        text = urlparse(text).path
    return os.path.abspath(os.path.expanduser(text))


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _bucket_path(url: str) -> str:
    parsed = urlparse(str(url))
    if not parsed.netloc:
        raise StorageError(f"URL {url!r} names no bucket; expected {parsed.scheme}://bucket/prefix")
    return f"{parsed.netloc}{parsed.path}".rstrip("/")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path within it."""
    kind = scheme(url)
    if kind == "file":
        return fsspec.filesystem("file"), local_path(url)
    if kind == "s3":
        endpoint = s3_endpoint()
        # A fresh instance per call would lose s3fs's connection pool; fsspec caches by arguments.
        fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint} if endpoint else {})
        return fs, _bucket_path(url)
    try:
        fs = fsspec.filesystem("gs")
    except ImportError:
        raise StorageError("gs:// URLs need gcsfs: pip install 'ocr_cluster[gcs]'") from None
    return fs, _bucket_path(url)


def arrow_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `url` and the path within it (for Ray storage_filesystem, pyarrow datasets)."""
    if scheme(url) == "file":
        return pafs.LocalFileSystem(), local_path(url)
    fs, path = filesystem(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(url: str, *parts: str) -> str:
    out = str(url).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"not found: {url}") from None


def parquet_table(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file's bytes as a table, read on this thread.

    pq.read_table starts Arrow's C++ thread pools; a short CLI process that started them can abort
    at exit tearing them down ("terminate called without an active exception", apache/arrow#34314),
    and for the small files read here the pools buy nothing.
    """
    return pq.ParquetFile(pa.BufferReader(data)).read(columns=columns, use_threads=False)


def write_bytes_atomic(url: str, data: bytes) -> str:
    """Write `data` so that readers see the whole object or nothing.

    Local paths: a temporary file in the same directory, fsync, then rename over the target.
    Object stores: one PUT (or one multipart upload, completed all at once for big objects);
    neither exposes a partial object.
    """
    if scheme(url) == "file":
        target = Path(local_path(url))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return str(target)
    fs, path = filesystem(url)
    fs.pipe_file(path, data)
    return url


def list_files(url: str, suffix: str = "") -> list[str]:
    """Every file below `url` (recursively) whose name ends with `suffix`, as paths within the filesystem."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(p for p in fs.find(path) if p.endswith(suffix) and not Path(p).name.startswith("."))
