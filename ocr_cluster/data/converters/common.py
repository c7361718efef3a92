"""What every converter shares: the sample description, label reading, and the conversion loop."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ocr_cluster.data import codec, matfile
from ocr_cluster.data.cards import Variant
from ocr_cluster.data.errors import DataError
from ocr_cluster.data.shards import DatasetWriter, Manifest


@dataclass
class SourceSample:
    """One sample in a source tree: its key, image file, and label file.

    `label_field` names the matrix inside a .mat label ('S', 'LabelMap', 'GTcls.Segmentation');
    `premap` turns source values into the card's source values (e.g. 459 -> 60 Context classes)
    before the variant's label_map / reduce_zero_label; `train_ids` marks a label that already
    holds train ids (an mmseg-converted `*_labelTrainIds.png`), which is stored as it is.
    """

    key: str
    image_path: str
    label_path: str
    label_field: str = ""
    premap: Callable[[np.ndarray], np.ndarray] | None = None
    train_ids: bool = False


@dataclass
class Encoded:
    key: str
    image: bytes
    label: bytes
    label_array: np.ndarray
    height: int
    width: int
    image_format: str


def layout_error(card: str, src: str | Path, problem: str, layout: str) -> DataError:
    flat = " ".join(line.strip() for line in layout.strip().splitlines())
    return DataError(f"{src} does not look like {card}: {problem}. Expected layout: {flat}")


def read_lines(path: Path) -> list[str]:
    with open(path) as handle:
        return [line.split()[0] for line in handle if line.strip()]


def read_label(sample: SourceSample) -> np.ndarray:
    path = sample.label_path
    with open(path, "rb") as handle:
        data = handle.read()
    if path.endswith(".mat"):
        value = matfile.loadmat(data)
        for part in (sample.label_field or "").split("."):
            if not isinstance(value, dict) or part not in value:
                raise ValueError(f"no variable {sample.label_field!r} in {path}")
            value = value[part]
        label = np.asarray(value)
        if label.ndim != 2:
            raise ValueError(f"{sample.label_field} in {path} has shape {label.shape}, expected 2-D")
        label = label.astype(np.int64)
    else:
        label = codec.decode_label(data)
    if sample.premap is not None:
        label = sample.premap(label)
    return label


def encode_sample(sample: SourceSample, variant: Variant, split: str) -> Encoded:
    where = f"{split} sample {sample.key!r}"
    try:
        with open(sample.image_path, "rb") as handle:
            image = handle.read()
        height, width = codec.image_size(image)
    except OSError as exc:
        raise DataError(f"{where}: cannot read image {sample.image_path} ({exc})") from None
    try:
        label = read_label(sample)
    except (OSError, ValueError, matfile.MatFileError) as exc:
        raise DataError(f"{where}: cannot read label {sample.label_path} ({exc})") from None
    train_ids = label if sample.train_ids else variant.to_train_ids(label)
    if train_ids.dtype != np.uint8:
        from ocr_cluster.data.shards import check_label

        check_label(train_ids, variant.num_classes, where=where)
    return Encoded(sample.key, image, codec.encode_label(train_ids), train_ids, height, width,
                   codec.image_format(image))


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn over items on `workers` threads, in order, with a bounded number in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers * 4:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_dataset(dst: str, variant: Variant, samples: dict[str, list[SourceSample]], *, source: str,
                  shard_mb: float, workers: int | None = None, overwrite: bool = False,
                  limit: int | None = None, progress: bool = False, extra: dict | None = None) -> Manifest:
    """Convert every sample of every split to shards at `dst`; returns the written manifest."""
    workers = workers or min(8, os.cpu_count() or 1)
    writer = DatasetWriter(dst, name=variant.dataset, dataset=variant.dataset, classes=variant.classes,
                           palette=variant.palette, num_classes=variant.num_classes, shard_mb=shard_mb,
                           overwrite=overwrite, img_scale=variant.img_scale, crop_size=variant.crop_size,
                           flip_swap=variant.flip_swap, source=source,
                           extra={"card": variant.card, "variant": variant.name, **(extra or {})})
    for split, items in samples.items():
        items = sorted(items, key=lambda s: s.key)[:limit] if limit else sorted(items, key=lambda s: s.key)
        start = time.monotonic()
        for i, enc in enumerate(ordered_map(lambda s, sp=split: encode_sample(s, variant, sp), items, workers)):
            writer.add(split, enc.key, enc.image, enc.label, label_array=enc.label_array, height=enc.height,
                       width=enc.width, image_format=enc.image_format)
            if progress and (i + 1) % 200 == 0:
                rate = (i + 1) / max(1e-9, time.monotonic() - start)
                print(f"  {split}: {i + 1}/{len(items)} ({rate:.0f}/s)", file=sys.stderr, flush=True)
    return writer.close()


def first_existing(*candidates: Path) -> Path | None:
    for path in candidates:
        if path.exists():
            return path
    return None
