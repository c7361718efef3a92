"""What each worker reads, in which order, with which parameters: the plan behind data.pipeline.

- parameters of the train and eval transforms from the config and the dataset's manifest;
- the order of samples: shards, then rows inside a shard, shuffled per (seed, epoch);
- which val images each of `world_size` workers evaluates;
- accounting of skipped bad samples (`Stats` in-process, `SkipCounter` across Ray tasks).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ocr_cluster.config import parse_size
from ocr_cluster.data.errors import DataError
from ocr_cluster.data.shards import Manifest, ShardInfo, read_manifest, read_shard
from ocr_cluster.data.transforms import EvalParams, TrainParams

if TYPE_CHECKING:
    from ocr_cluster.config import DataSection

log = logging.getLogger(__name__)

COLUMNS = ["key", "image", "label"]
BLOCK_BYTES = 4 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Parameters from the config and the manifest


def open_dataset(data: DataSection) -> Manifest:
    """The manifest at data.uri, checked against data.dataset."""
    manifest = read_manifest(data.uri)
    if manifest.dataset != data.dataset:
        raise DataError(f"data.dataset is {data.dataset!r} but the shards at {data.uri} hold {manifest.dataset!r}")
    return manifest


def train_params(data: DataSection, manifest: Manifest) -> TrainParams:
    return TrainParams(crop_hw=parse_size(data.crop_size), scale_wh=parse_size(data.scale), num_classes=manifest.num_classes,
                       ratio_range=(float(data.ratio_range[0]), float(data.ratio_range[1])),
                       cat_max_ratio=float(data.cat_max_ratio), flip_prob=float(data.flip_prob),
                       photometric=bool(data.photometric), mean=tuple(map(float, data.mean)),
                       std=tuple(map(float, data.std)),
                       flip_swap=tuple(tuple(map(int, p)) for p in manifest.flip_swap))


def eval_params(data: DataSection, manifest: Manifest, resize: bool = True) -> EvalParams:
    return EvalParams(num_classes=manifest.num_classes, scale_wh=parse_size(data.scale) if resize else None,
                      mean=tuple(map(float, data.mean)), std=tuple(map(float, data.std)))


def epochs_for(iters: int, global_batch: int, manifest: Manifest, split: str = "train", start_epoch: int = 0) -> int:
    """Epochs a run of `iters` iterations consumes from `start_epoch`, plus one spare."""
    n = max(1, manifest.split(split).num_samples)
    return max(1, math.ceil(iters * global_batch / n) - start_epoch + 1)


def epoch_at(iteration: int, global_batch: int, manifest: Manifest, split: str = "train") -> int:
    """The epoch that iteration `iteration` falls in."""
    return stream_position(iteration, global_batch, manifest, split)[0]


def stream_position(iteration: int, global_batch: int, manifest: Manifest, split: str = "train") -> tuple[int, int]:
    """Where the training stream stands after `iteration` iterations: (epoch, samples of that epoch's order
    already consumed). A resumed stream starts there, so that it goes on with the samples the uninterrupted
    run would have read next (exactly so without bad samples skipped: those are not counted)."""
    return divmod(iteration * global_batch, max(1, manifest.split(split).num_samples))


# ---------------------------------------------------------------------------------------------
# Order of samples: shards, then rows, shuffled per (seed, epoch)


def epoch_plan(manifest: Manifest, split: str, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard indices in the order epoch `epoch` reads them."""
    shards = manifest.split(split).shards
    order = list(range(len(shards)))
    if shuffle:
        np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0x5A4D]).shuffle(order)
    return order


def row_order(num_rows: int, seed: int, epoch: int, shard_index: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_rows)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0x524F57, shard_index])
    return rng.permutation(num_rows)


def block_rows_for(manifest: Manifest, split: str) -> int:
    """Rows per encoded block: about BLOCK_BYTES of encoded samples, 4 to 64 rows."""
    info = manifest.split(split)
    avg = info.num_bytes / max(1, info.num_samples)
    return int(min(64, max(4, BLOCK_BYTES // max(1, avg))))


# ---------------------------------------------------------------------------------------------
# Bad data accounting


@dataclass
class Stats:
    """Counts of an in-process iterator (skipped samples when data.skip_bad_samples is on)."""

    samples: int = 0
    skipped: int = 0
    messages: list[str] = field(default_factory=list)

    def add(self, message: str, count: int = 1) -> None:
        self.skipped += count
        if len(self.messages) < 100:
            self.messages.append(message)
        log.warning("skipping bad data (%d skipped so far): %s", self.skipped, message)


class SkipCounter:
    """Counts samples skipped by Ray tasks; pass to train_dataset/eval_dataset, read `total()`.

    Backed by a small Ray actor (0 CPUs) owned by the process that creates it.
    """

    def __init__(self) -> None:
        import ray

        self._actor = ray.remote(num_cpus=0)(_CounterActor).remote()

    def add(self, message: str, count: int = 1) -> None:
        import ray

        log.warning("skipping bad data: %s", message)
        ray.get(self._actor.add.remote(message, count))  # counted before the task's output is seen

    def total(self) -> int:
        import ray

        return ray.get(self._actor.total.remote())

    def distinct(self) -> int:
        """Like total(), but a bad sample (or shard) met again, in a later epoch, counts once."""
        import ray

        return ray.get(self._actor.distinct.remote())

    def messages(self) -> list[str]:
        import ray

        return ray.get(self._actor.messages.remote())


class _CounterActor:
    def __init__(self) -> None:
        self.count, self.msgs = 0, []
        self.by_message: dict[str, int] = {}  # a skip's message names its shard and sample, not the epoch

    def add(self, message: str, count: int) -> None:
        self.count += count
        self.by_message.setdefault(message, count)
        if len(self.msgs) < 100:
            self.msgs.append(message)

    def total(self) -> int:
        return self.count

    def distinct(self) -> int:
        return sum(self.by_message.values())

    def messages(self) -> list[str]:
        return list(self.msgs)


def call_or_skip(call: Callable[[], Any], *, skip_bad: bool, counter: Stats | SkipCounter | None, count: int = 1,
                 note: str = "") -> Any:
    """`call()`, whose DataError is raised again, or with skip_bad counted as `count` skipped samples
    on `counter` (None: only logged) and answered with None."""
    try:
        return call()
    except DataError as exc:
        if not skip_bad:
            raise
        if counter is None:
            log.warning("skipping bad data: %s%s", exc, note)
        else:
            counter.add(f"{exc}{note}", count)
        return None


def read_shard_or_skip(manifest: Manifest, shard: ShardInfo, *, verify: bool, skip_bad: bool, counter) -> Any:
    """The shard's table, or None with its samples counted as skipped when it is bad and skip_bad is set."""
    return call_or_skip(lambda: read_shard(manifest, shard, verify=verify, columns=COLUMNS), skip_bad=skip_bad,
                        counter=counter, count=shard.num_samples, note=f" (its {shard.num_samples} samples skipped)")


def eval_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the split indices evaluated by worker `rank` (sizes differ by at most one)."""
    return rank * num_samples // world_size, (rank + 1) * num_samples // world_size


def shard_rows(offsets: list[int], index: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of shard `index`'s rows inside worker `rank`'s `eval_range` (none when hi <= lo).

    `offsets` is the split's `SplitInfo.offsets()`; rank 0 of 1 gets every row.
    """
    start, stop = eval_range(offsets[-1], rank, world_size)
    return max(start, offsets[index]) - offsets[index], min(stop, offsets[index + 1]) - offsets[index]
