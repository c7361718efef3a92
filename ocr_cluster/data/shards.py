"""The shard format: Parquet files of encoded samples plus one JSON manifest per dataset.

    URI/manifest.json
    URI/<split>/part-00000.parquet, part-00001.parquet, ...

Each shard row is one sample:

    key           string   unique within its split (e.g. 'aachen_000000_000019')
    image         binary   the original encoded image bytes (PNG or JPEG), never re-encoded
    label         binary   8-bit greyscale PNG of train ids, 255 = ignore
    height, width int32    the image size (the label has the same size)
    image_format  string   'png', 'jpeg', ...

The manifest (`Manifest`) holds the dataset's name, classes, palette, splits, sample and shard
counts, per-shard sizes and checksums (SHA-256 and CRC-32), the class pixel histogram and the image
size range. Its `fingerprint` (from the shards' checksums) goes into a run's id as data.fingerprint.

Atomicity: every shard is written whole with `storage.write_bytes_atomic` (one PUT on object
stores, temp file + rename locally) and the manifest is written last, so a reader sees either a
complete dataset or "no manifest". Overwriting a dataset first deletes its manifest. Readers only
read the shards the manifest lists and check each one's size and checksum before parsing it: the
CRC-32 on every read (7 GB/s, so training pays ~1 % for it), the SHA-256 with `verify="sha256"`
(`ocr-cluster data inspect --verify`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import posixpath
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ocr_cluster import __version__, storage
from ocr_cluster.data.constants import IGNORE_INDEX
from ocr_cluster.data.errors import DataError, DataUnreachable

FORMAT = "ocr_cluster.shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_SHARD_MB = 256
# Row groups are kept small so that other readers (pyarrow datasets, DuckDB) can stream a shard.
ROW_GROUP_BYTES = 32 * 1024 * 1024

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("image", pa.binary()),
    ("label", pa.binary()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("image_format", pa.string()),
])


@dataclass
class ShardInfo:
    path: str  # relative to the dataset root, e.g. 'train/part-00000.parquet'
    num_samples: int
    num_bytes: int
    sha256: str
    first_key: str = ""
    last_key: str = ""
    crc32: str = ""  # 8 hex digits of zlib.crc32; checked on every read


@dataclass
class SplitInfo:
    num_samples: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    class_pixels: list[int] = field(default_factory=list)  # per train id, len == num_classes
    ignore_pixels: int = 0
    height_range: list[int] = field(default_factory=lambda: [0, 0])
    width_range: list[int] = field(default_factory=lambda: [0, 0])
    image_formats: dict[str, int] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(s.num_bytes for s in self.shards)

    def offsets(self) -> list[int]:
        """The split index of each shard's first sample, then the split's size: [0, n0, n0 + n1, ...]."""
        return list(itertools.accumulate((s.num_samples for s in self.shards), initial=0))


@dataclass
class Manifest:
    name: str
    dataset: str  # one of ocr_cluster.config.DATASETS
    num_classes: int
    classes: list[str]
    palette: list[list[int]]
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    ignore_index: int = IGNORE_INDEX
    img_scale: list[int] | None = None  # WxH, the card's mmseg img_scale
    crop_size: list[int] | None = None  # HxW, the card's training crop
    flip_swap: list[list[int]] = field(default_factory=list)  # label pairs exchanged by a horizontal flip
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    created_by: str = f"ocr_cluster {__version__}"
    created_at: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    uri: str = field(default="", compare=False)  # where it was read from; not stored

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("uri")
        return json.dumps(data, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, uri: str = "") -> Manifest:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise DataError(f"{uri or 'manifest'}: not an ocr_cluster shard manifest (format={data.get('format')!r})")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise DataError(f"{uri}: shard format version {data['format_version']} is newer than this "
                            f"ocr_cluster reads ({FORMAT_VERSION}); upgrade ocr_cluster")
        splits = {}
        for name, split in data.pop("splits", {}).items():
            shards = [ShardInfo(**s) for s in split.pop("shards", [])]
            splits[name] = SplitInfo(shards=shards, **split)
        known = {f for f in cls.__dataclass_fields__ if f != "uri"}
        manifest = cls(splits=splits, **{k: v for k, v in data.items() if k in known})
        manifest.uri = uri
        return manifest

    @property
    def fingerprint(self) -> str:
        """'d' and 16 hex digits naming the data, not where it lives: per split, each shard's relative path,
        size, sample count and SHA-256, plus the classes. A copy at another bucket or prefix keeps it. (The
        letter keeps YAML from reading it as a number, e.g. 1234e5.)"""
        splits = {name: [[s.path, s.num_bytes, s.num_samples, s.sha256] for s in split.shards]
                  for name, split in self.splits.items()}
        payload = json.dumps({"num_classes": self.num_classes, "classes": self.classes, "splits": splits},
                             sort_keys=True, separators=(",", ":"))
        return "d" + hashlib.sha256(payload.encode()).hexdigest()[:16]

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            have = ", ".join(sorted(self.splits)) or "none"
            raise DataError(f"dataset at {self.uri or self.name} has no split {name!r} (splits: {have})")
        return self.splits[name]

    def shard_uri(self, shard: ShardInfo) -> str:
        return storage.join(self.uri, shard.path)


def manifest_uri(uri: str) -> str:
    return storage.join(uri, MANIFEST_NAME)


def read_manifest(uri: str) -> Manifest:
    """The manifest of the dataset at `uri`; a DataError when there is none."""
    target = manifest_uri(uri)
    try:
        text = storage.read_bytes(target).decode()
    except storage.StorageError:
        raise DataError(f"no manifest at {uri}; was the conversion interrupted? "
                        f"(expected {target})") from None
    except Exception as exc:  # noqa: BLE001 - credentials, endpoint down (botocore's errors are no OSError)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise DataUnreachable(f"cannot read the dataset at {uri}: {type(exc).__name__}: {first}") from None
    try:
        return Manifest.from_json(text, uri=str(uri).rstrip("/"))
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise DataError(f"{target} is not a valid manifest ({exc})") from None


# ---------------------------------------------------------------------------------------------
# Reading and validating


def read_shard_bytes(manifest: Manifest, shard: ShardInfo, *, verify: bool | str = True) -> bytes:
    """The shard's bytes after checking its size and checksum.

    verify: True (or "crc32") checks the CRC-32 (the SHA-256 for manifests without one), "sha256"
    the SHA-256, False only the size.
    """
    uri = manifest.shard_uri(shard)
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError:
        raise DataError(f"shard {uri} is listed in the manifest but missing") from None
    if len(data) != shard.num_bytes:
        raise _size_error(uri, len(data), shard.num_bytes)
    if verify:
        kind = "sha256" if verify == "sha256" or not shard.crc32 else "crc32"
        expected = shard.sha256 if kind == "sha256" else shard.crc32
        digest = hashlib.sha256(data).hexdigest() if kind == "sha256" else crc32_hex(data)
        if digest != expected:
            raise DataError(f"shard {uri} has the wrong checksum ({kind} {digest[:16]}, the manifest says "
                            f"{expected[:16]}); it is corrupt or was replaced")
    return data


def _size_error(uri: str, size: int, expected: int) -> DataError:
    what = "truncated" if size < expected else "longer than the manifest says"
    return DataError(f"shard {uri} is {what}: {size} bytes, the manifest says {expected}")


def check_shard_sizes(manifest: Manifest) -> None:
    """Every shard the manifest lists is there with the size it lists: one listing per shard directory
    (a split's), no read. A DataError names the first shard that is missing or has another size."""
    fs, root = storage.filesystem(manifest.uri)
    by_dir: dict[str, list[ShardInfo]] = {}
    for split in manifest.splits.values():
        for shard in split.shards:
            by_dir.setdefault(posixpath.dirname(shard.path), []).append(shard)
    for directory, shards in by_dir.items():
        try:
            listing = fs.ls(posixpath.join(root, directory) if directory else root, detail=True)
        except FileNotFoundError:
            listing = []
        sizes = {posixpath.basename(entry["name"].rstrip("/")): entry.get("size") for entry in listing}
        for shard in shards:
            size = sizes.get(posixpath.basename(shard.path))
            if size is None:
                raise DataError(f"shard {manifest.shard_uri(shard)} is listed in the manifest but missing")
            if int(size) != shard.num_bytes:
                raise _size_error(manifest.shard_uri(shard), int(size), shard.num_bytes)


def crc32_hex(data: bytes) -> str:
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def read_shard(manifest: Manifest, shard: ShardInfo, *, verify: bool | str = True,
               columns: list[str] | None = None) -> pa.Table:
    """One shard as an Arrow table, checked against the manifest (size, checksum, row count)."""
    data = read_shard_bytes(manifest, shard, verify=verify)
    uri = manifest.shard_uri(shard)
    try:
        table = storage.parquet_table(data, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"shard {uri} is not a readable Parquet file ({exc})") from None
    if table.num_rows != shard.num_samples:
        raise DataError(f"shard {uri} has {table.num_rows} rows, the manifest says {shard.num_samples}")
    return table


def bad_label_values(label: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> list[int]:
    """Values of `label` outside [0, num_classes) and not ignore_index (empty when all are fine)."""
    if label.dtype == np.uint8 and label.size:
        top = int(label.max())
        if top < num_classes:
            return []
        counts = np.bincount(label.ravel(), minlength=256)
        return [v for v in np.flatnonzero(counts).tolist() if v >= num_classes and v != ignore_index]
    values = np.unique(label)
    return [int(v) for v in values if (v < 0 or v >= num_classes) and v != ignore_index]


def check_label(label: np.ndarray, num_classes: int, *, where: str) -> None:
    bad = bad_label_values(label, num_classes)
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
        raise DataError(f"{where}: label has values outside [0, {num_classes}) and 255: {shown}")


# ---------------------------------------------------------------------------------------------
# Writing


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


class _SplitBuffer:
    def __init__(self) -> None:
        self.rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        self.nbytes = 0
        self.keys: set[str] = set()
        self.info = SplitInfo()
        self.counts = np.zeros(256, dtype=np.int64)
        self.heights: list[int] = []
        self.widths: list[int] = []


class DatasetWriter:
    """Writes one dataset: `add` samples (any split, any order within a split), then `close`.

    Shards are cut at `shard_mb` of encoded bytes. `close` writes the manifest last and removes
    shards of an older dataset at the same URI that the new manifest does not list.
    """

    def __init__(self, uri: str, *, name: str, dataset: str, classes: list[str], palette: list[list[int]],
                 num_classes: int | None = None, shard_mb: float = DEFAULT_SHARD_MB, overwrite: bool = False,
                 img_scale: list[int] | None = None, crop_size: list[int] | None = None,
                 flip_swap: list[list[int]] | None = None, source: str = "", extra: dict | None = None):
        self.uri = str(uri).rstrip("/")
        self.num_classes = int(num_classes if num_classes is not None else len(classes))
        if len(classes) != self.num_classes:
            raise DataError(f"{len(classes)} class names for {self.num_classes} classes")
        if shard_mb <= 0:
            raise DataError(f"shard size must be > 0 MB, got {shard_mb}")
        self.shard_bytes = int(shard_mb * 1024 * 1024)
        self.manifest = Manifest(name=name, dataset=dataset, num_classes=self.num_classes, classes=list(classes),
                                 palette=[list(map(int, p)) for p in palette], img_scale=img_scale,
                                 crop_size=crop_size, flip_swap=[list(p) for p in (flip_swap or [])],
                                 source=source, extra=dict(extra or {}))
        self.manifest.uri = self.uri
        self._splits: dict[str, _SplitBuffer] = {}
        self._closed = False
        if storage.exists(manifest_uri(self.uri)):
            if not overwrite:
                raise DataError(f"a dataset already exists at {self.uri}; pass --overwrite to replace it")
            fs, path = storage.filesystem(manifest_uri(self.uri))
            fs.rm(path)  # readers now see "no manifest" until the new one is complete

    def add(self, split: str, key: str, image: bytes, label: bytes, *, label_array: np.ndarray,
            height: int, width: int, image_format: str) -> None:
        """One sample. `label_array` is the decoded `label` (for validation and statistics)."""
        if self._closed:
            raise RuntimeError("writer is closed")
        buf = self._splits.setdefault(split, _SplitBuffer())
        where = f"{split} sample {key!r}"
        if key in buf.keys:
            raise DataError(f"{where}: duplicate key")
        if label_array.shape[:2] != (height, width):
            raise DataError(f"{where}: label is {label_array.shape[1]}x{label_array.shape[0]} (WxH) but the image "
                            f"is {width}x{height}")
        if label_array.dtype != np.uint8:
            check_label(label_array, self.num_classes, where=where)
            label_array = label_array.astype(np.uint8)
        counts = np.bincount(label_array.ravel(), minlength=256)
        bad = [v for v in np.flatnonzero(counts[self.num_classes:]).tolist()
               if v + self.num_classes != IGNORE_INDEX]
        if bad:
            check_label(label_array, self.num_classes, where=where)
        buf.keys.add(key)
        buf.counts += counts
        buf.heights.append(int(height))
        buf.widths.append(int(width))
        buf.info.image_formats[image_format] = buf.info.image_formats.get(image_format, 0) + 1
        for column, value in (("key", key), ("image", image), ("label", label), ("height", int(height)),
                              ("width", int(width)), ("image_format", image_format)):
            buf.rows[column].append(value)
        buf.nbytes += len(image) + len(label) + len(key) + 16
        if buf.nbytes >= self.shard_bytes:
            self._flush(split, buf)

    def _flush(self, split: str, buf: _SplitBuffer) -> None:
        n = len(buf.rows["key"])
        if not n:
            return
        table = pa.table(buf.rows, schema=SCHEMA)
        rows_per_group = max(1, min(n, int(ROW_GROUP_BYTES / max(1, buf.nbytes / n))))
        sink = pa.BufferOutputStream()
        # Images and labels are already compressed; only the small columns get zstd.
        pq.write_table(table, sink, row_group_size=rows_per_group, use_dictionary=False,
                       compression={"key": "zstd", "image": "none", "label": "none", "height": "zstd",
                                    "width": "zstd", "image_format": "zstd"})
        data = sink.getvalue().to_pybytes()
        rel = posixpath.join(split, f"part-{len(buf.info.shards):05d}.parquet")
        storage.write_bytes_atomic(storage.join(self.uri, rel), data)
        buf.info.shards.append(ShardInfo(path=rel, num_samples=n, num_bytes=len(data),
                                         sha256=hashlib.sha256(data).hexdigest(), crc32=crc32_hex(data),
                                         first_key=buf.rows["key"][0], last_key=buf.rows["key"][-1]))
        buf.info.num_samples += n
        buf.rows = {name: [] for name in SCHEMA.names}
        buf.nbytes = 0

    def close(self) -> Manifest:
        """Flush the last shards, write the manifest, delete stale shards. Returns the manifest."""
        if self._closed:
            return self.manifest
        for split, buf in self._splits.items():
            self._flush(split, buf)
            info = buf.info
            info.class_pixels = buf.counts[: self.num_classes].tolist()
            info.ignore_pixels = int(buf.counts[IGNORE_INDEX])
            info.height_range = [min(buf.heights), max(buf.heights)]
            info.width_range = [min(buf.widths), max(buf.widths)]
            self.manifest.splits[split] = info
        if not self.manifest.splits:
            raise DataError("no samples were written; nothing matched the expected layout")
        self.manifest.created_at = _now()
        storage.write_bytes_atomic(manifest_uri(self.uri), self.manifest.to_json().encode())
        self._closed = True
        self._remove_stale()
        return self.manifest

    def _remove_stale(self) -> None:
        listed = {s.path for split in self.manifest.splits.values() for s in split.shards}
        fs, root = storage.filesystem(self.uri)
        for path in storage.list_files(self.uri, ".parquet"):
            rel = posixpath.relpath(path, root)
            if rel not in listed and rel.count("/") == 1 and posixpath.basename(rel).startswith("part-"):
                fs.rm(path)
