"""The training input: Ray Data over Parquet shards for TorchTrainer, and plain-Python iterators.

Training (Ray Data), in the worker group (train/loop.py's Trainer._train_stream: rank 0 builds the
stream from where the run stands, the ranks get its splits):

    manifest = open_dataset(cfg.data)                     # checks data.dataset against the shards
    epoch, consumed = stream_position(start_iter, cfg.data.batch_size, manifest)
    ds = train_dataset(cfg.data, seed=cfg.run.seed, start_epoch=epoch, skip=consumed,
                       num_epochs=epochs_for(cfg.schedule.iters, cfg.data.batch_size, manifest,
                                             start_epoch=epoch))
    splits = ds.streaming_split(world_size, equal=True)  # as Ray Train's DataConfig: equal shares

and in each worker (`per_worker = cfg.data.batch_size // world_size`):

    for batch in batches.torch_batches(splits[rank], per_worker, device=device):   # data/batches.py
        batch["image"]  # float32 [B, 3, H, W], normalised, H x W = data.crop_size
        batch["label"]  # int64 [B, H, W], train ids, 255 = ignore (padding included)
        batch["key"]    # list of sample keys (keys=True only)

Resources: read tasks take 0.25 CPU, decode tasks `num_cpus`
(1) each, and Ray Data only uses CPUs the trainer's workers leave free, so give the cluster more
CPUs than `num_workers x cpus_per_worker` (the test head has 4 logical CPUs for 2 workers).
The process that runs the stream's executor (streaming_split's SplitCoordinator) paces Ray Data's
scheduling loop while every operator waits for the consumer (pacing.py): unpaced it spins a core.

`train_dataset` is one stream of `num_epochs` epochs (make it longer than the run needs and stop
at the last iteration): for each epoch the shard order and the row order inside each shard are
shuffled from (seed, epoch); every sample's augmentation is drawn from (seed, epoch, key). Read
tasks read whole shards (checking size and SHA-256) and emit small blocks of *encoded* rows;
separate `map_batches` tasks decode and augment them, so only crops (and compressed originals)
ever reach the object store and decoding spreads over every CPU of the cluster.

Resume: a resumed run's stream starts where the checkpoint's iteration left the stream,
`stream_position(iteration, batch_size, manifest)` = (epoch, samples of it consumed), given as
`train_dataset(start_epoch=epoch, skip=consumed)`: the read tasks leave out the epoch's first
`consumed` samples of its order, so no sample is read twice and none is left out. Which worker
receives which sample is decided by Ray's streaming split: dynamically, unless the dataset's
context has `execution_options.preserve_order` (data.preserve_order), which makes the order and the
split deterministic; the *content* of each sample's crop is deterministic either way.

Evaluation reads whole images split across workers: `eval_dataset(cfg.data, rank=r, world_size=w)`
(Ray Data, built inside a worker) or `iter_eval(...)` (in-process) give worker r the contiguous
r-th w-th of the split (`eval_range`), so each worker reads only its own shards and each sample is
evaluated exactly once over all workers. Images are resized as
mmseg's test pipeline does (keep ratio to data.scale) unless `resize=False`; labels keep the
original resolution.

Without Ray (unit tests, local debugging, `num_workers=0`): `iter_train(cfg.data, seed=..,
rank=r, world_size=w, batch_size=b)` yields the same crops as the Ray path for the same (seed,
epoch, key), with worker r taking every w-th sample of each epoch's order.

Bad data raises `DataError` naming the shard and key (undecodable image or label, label values
outside [0, K) and 255, size mismatch) or the shard (missing, truncated, wrong checksum, not
Parquet). With data.skip_bad_samples the sample (or the shard's samples) is skipped instead,
logged as a warning and counted: `Stats` in-process, `SkipCounter` across Ray tasks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

# The plan's public names are re-exported: pipeline is the module callers import.
from ocr_cluster.data.plan import (COLUMNS, SkipCounter, Stats, block_rows_for, call_or_skip,  # noqa: F401
                                   epoch_at, epoch_plan, epochs_for, eval_params, eval_range, open_dataset,
                                   read_shard_or_skip, row_order, shard_rows, stream_position, train_params)
from ocr_cluster.data.shards import Manifest
from ocr_cluster.data.transforms import (EvalParams, TrainParams, eval_transform, sample_rng, train_crop_uint8,
                                         train_transform)

if TYPE_CHECKING:
    import ray.data

    from ocr_cluster.config import DataSection

# ---------------------------------------------------------------------------------------------
# Plain-Python iterators


def binary_views(column) -> list[np.ndarray]:
    """The values of an Arrow binary column as uint8 numpy views of its data buffer (no copies)."""
    out: list[np.ndarray] = []
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        bounds = np.frombuffer(offsets, np.int32)[chunk.offset:chunk.offset + len(chunk) + 1]
        values = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
        out += [values[a:b] for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
    return out


def iter_rows(manifest: Manifest, split: str, *, seed: int = 0, epochs: Iterable[int] = (0,), shuffle: bool = True,
              rank: int = 0, world_size: int = 1, contiguous: bool = False, verify: bool = True,
              skip_bad: bool = False,
              stats: Stats | None = None) -> Iterator[tuple[int, str, str, np.ndarray, np.ndarray]]:
    """(epoch, shard uri, key, image bytes, label bytes) of worker `rank`'s share, epoch after epoch.

    The share is every world_size-th sample of each epoch's order, or with `contiguous` (evaluation)
    the split indices in `eval_range`, whose shards alone are read. The bytes are uint8 numpy views
    into the shard's Arrow buffers (`.tobytes()` copies them out).
    """
    stats = stats if stats is not None else Stats()
    shards, offsets = manifest.split(split).shards, manifest.split(split).offsets()
    share = (rank, world_size) if contiguous else (0, 1)  # training reads every row, then takes every w-th
    for epoch in epochs:
        position = 0
        for index in epoch_plan(manifest, split, seed, epoch, shuffle):
            shard = shards[index]
            lo, hi = shard_rows(offsets, index, *share)
            if hi <= lo:
                continue
            table = read_shard_or_skip(manifest, shard, verify=verify, skip_bad=skip_bad, counter=stats)
            if table is None:
                continue
            uri = manifest.shard_uri(shard)
            keys = table.column("key").to_pylist()
            images, labels = binary_views(table.column("image")), binary_views(table.column("label"))
            for row in row_order(table.num_rows, seed, epoch, index, shuffle):
                if not lo <= row < hi:
                    continue
                if contiguous or position % world_size == rank:
                    yield epoch, uri, keys[row], images[row], labels[row]
                position += 1


def iter_train(data: DataSection, *, seed: int = 0, rank: int = 0, world_size: int = 1, start_epoch: int = 0,
               num_epochs: int | None = None, batch_size: int | None = None, split: str = "train",
               verify: bool = True, stats: Stats | None = None,
               manifest: Manifest | None = None) -> Iterator[dict[str, Any]]:
    """Augmented training samples (or batches of `batch_size`) of worker `rank`, without Ray.

    Endless unless `num_epochs` is given. Items are dicts of numpy arrays: image float32 [3,H,W]
    (batched: [B,3,H,W]), label uint8 [H,W], key str (batched: a list), epoch int.
    """
    manifest = manifest or open_dataset(data)
    params = train_params(data, manifest)
    stats = stats if stats is not None else Stats()
    epochs = range(start_epoch, start_epoch + num_epochs) if num_epochs is not None else _count(start_epoch)
    pending: list[dict[str, Any]] = []
    for epoch, uri, key, image, label in iter_rows(manifest, split, seed=seed, epochs=epochs, rank=rank,
                                                   world_size=world_size, verify=verify,
                                                   skip_bad=data.skip_bad_samples, stats=stats):
        rng, where = sample_rng(seed, epoch, key), f"shard {uri}: sample {key!r}"
        crop = call_or_skip(lambda: train_transform(image, label, params, rng, where=where),
                            skip_bad=data.skip_bad_samples, counter=stats)
        if crop is None:
            continue
        stats.samples += 1
        item = {"image": crop[0], "label": crop[1], "key": key, "epoch": epoch}
        if batch_size is None:
            yield item
            continue
        pending.append(item)
        if len(pending) == batch_size:
            yield _stack(pending)
            pending = []
    if pending:
        yield _stack(pending)


def iter_eval(data: DataSection, *, split: str = "val", rank: int = 0, world_size: int = 1, resize: bool = True,
              verify: bool = True, stats: Stats | None = None,
              manifest: Manifest | None = None) -> Iterator[dict[str, Any]]:
    """Whole evaluation samples of worker `rank` (the split indices in `eval_range`), one at a time, without Ray.

    Items: image float32 [3,h,w] (resized per mmseg's test pipeline unless resize=False), label
    uint8 [H,W] at the original size, key, height, width (the original size).
    """
    manifest = manifest or open_dataset(data)
    params = eval_params(data, manifest, resize)
    stats = stats if stats is not None else Stats()
    for _, uri, key, image, label in iter_rows(manifest, split, shuffle=False, rank=rank, world_size=world_size,
                                               contiguous=True, verify=verify, skip_bad=data.skip_bad_samples,
                                               stats=stats):
        where = f"shard {uri}: sample {key!r}"
        sample = call_or_skip(lambda: eval_transform(image, label, params, where=where),
                              skip_bad=data.skip_bad_samples, counter=stats)
        if sample is None:
            continue
        img, lab = sample
        stats.samples += 1
        yield {"image": img, "label": lab, "key": key, "height": lab.shape[0], "width": lab.shape[1]}


def _count(start: int) -> Iterator[int]:
    while True:
        yield start
        start += 1


def _stack(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"image": np.stack([i["image"] for i in items]), "label": np.stack([i["label"] for i in items]),
            "key": [i["key"] for i in items], "epoch": [i["epoch"] for i in items]}


# ---------------------------------------------------------------------------------------------
# Ray Data


class _ShardSource:
    """A Ray Data datasource: one read task per (epoch, shard), blocks of encoded rows.

    Subclassed from ray.data.Datasource on first use (keeps `import ray` out of module import).
    """

    def __init__(self, manifest: Manifest, split: str, *, epochs: list[int], seed: int, shuffle: bool,
                 rank: int, world_size: int, verify: bool, skip_bad: bool, counter: SkipCounter | None,
                 block_rows: int, skip: int = 0):
        self.manifest, self.split, self.epochs, self.seed, self.shuffle = manifest, split, epochs, seed, shuffle
        self.skip = skip  # leading samples of the first epoch's order left out (a resumed stream)
        self.rank, self.world_size, self.verify, self.skip_bad = rank, world_size, verify, skip_bad
        self.counter, self.block_rows = counter, block_rows
        self.offsets = manifest.split(split).offsets()

    def estimate_inmemory_data_size(self) -> int:
        return self.manifest.split(self.split).num_bytes * len(self.epochs) // max(1, self.world_size)

    def get_name(self) -> str:
        return "ReadShards"

    def num_tasks(self) -> int:
        per_epoch = sum(1 for i in range(len(self.offsets) - 1) if self._rows(i)[1] > self._rows(i)[0])
        return max(1, per_epoch * len(self.epochs))

    def _rows(self, index: int) -> tuple[int, int]:
        """[lo, hi) of shard `index`'s rows that belong to this worker (all of them when training)."""
        return shard_rows(self.offsets, index, self.rank, self.world_size)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list:
        from ray.data import ReadTask
        from ray.data.block import BlockMetadata

        from ocr_cluster.data.pacing import pace_idle_executor

        pace_idle_executor()  # the executor that asks for the read tasks runs in this process: see pacing.py
        shards = self.manifest.split(self.split).shards
        tasks = []
        for epoch in self.epochs:
            to_skip = self.skip if epoch == self.epochs[0] else 0
            for index in epoch_plan(self.manifest, self.split, self.seed, epoch, self.shuffle):
                shard = shards[index]
                lo, hi = self._rows(index)
                drop, to_skip = min(to_skip, hi - lo), to_skip - min(to_skip, hi - lo)
                if hi - lo - drop <= 0:
                    continue
                size = shard.num_bytes * (hi - lo - drop) // max(1, shard.num_samples)
                meta = BlockMetadata(num_rows=hi - lo - drop, size_bytes=size, exec_stats=None, input_files=None)
                args = (self.manifest, self.split, index, epoch, lo, hi, self.seed, self.shuffle, self.verify,
                        self.skip_bad, self.counter, self.block_rows, drop)
                tasks.append(ReadTask(lambda a=args: _read_task(*a), meta))
        return tasks


def _read_task(manifest: Manifest, split: str, index: int, epoch: int, lo: int, hi: int, seed: int, shuffle: bool,
               verify: bool, skip_bad: bool, counter, block_rows: int, drop: int = 0):
    """Shard `index`'s rows [lo, hi) in epoch `epoch`'s order, the first `drop` of them left out."""
    import pyarrow as pa

    shard = manifest.split(split).shards[index]
    table = read_shard_or_skip(manifest, shard, verify=verify, skip_bad=skip_bad, counter=counter)
    if table is None:
        return
    rows = np.arange(table.num_rows)
    rows = rows[row_order(len(rows), seed, epoch, index, shuffle)]
    rows = rows[(rows >= lo) & (rows < hi)][drop:]
    uri = manifest.shard_uri(shard)
    for start in range(0, len(rows), block_rows):  # one small copy per block, never the whole shard
        block = table.take(pa.array(rows[start:start + block_rows], type=pa.int64()))
        block = block.append_column("epoch", pa.array(np.full(block.num_rows, epoch, dtype=np.int32)))
        yield block.append_column("shard", pa.array([uri] * block.num_rows, type=pa.string()))


def _one_cpu() -> None:
    """A Ray task has one CPU: keep OpenCV from starting a thread per core."""
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


def _transform_rows(batch: dict[str, np.ndarray], transform, *, skip_bad: bool, counter):
    """(keys, outputs) of the rows `transform(i, where)` accepts; a bad row raises, or is counted and left out
    with skip_bad."""
    keys, outputs = [], []
    for i, key in enumerate(batch["key"]):
        where = f"shard {batch['shard'][i]}: sample {str(key)!r}"
        sample = call_or_skip(lambda: transform(i, where), skip_bad=skip_bad, counter=counter)
        if sample is not None:
            keys.append(str(key))
            outputs.append(sample)
    return keys, outputs


def _stacked(arrays: list[np.ndarray], shape: tuple, dtype) -> np.ndarray:
    return np.stack(arrays) if arrays else np.zeros((0, *shape), dtype)


def _train_batch(batch: dict[str, np.ndarray], *, params: TrainParams, seed: int, skip_bad: bool,
                 counter, uint8: bool = False) -> dict[str, np.ndarray]:
    """Decoded and augmented crops: float32 [B, 3, H, W] normalised, or with `uint8` the [B, H, W, 3] BGR crops
    before normalisation and each one's unpadded (h, w) as `valid_hw` (normalised on the device:
    transforms.normalize_batch, the same values)."""
    _one_cpu()
    transform_fn = train_crop_uint8 if uint8 else train_transform

    def transform(i: int, where: str):
        rng = sample_rng(seed, int(batch["epoch"][i]), str(batch["key"][i]))
        return transform_fn(batch["image"][i], batch["label"][i], params, rng, where=where)

    keys, outputs = _transform_rows(batch, transform, skip_bad=skip_bad, counter=counter)
    h, w = params.crop_hw
    out = {"key": np.array(keys, dtype=object), "label": _stacked([o[1] for o in outputs], (h, w), np.uint8)}
    if uint8:
        out["image"] = _stacked([o[0] for o in outputs], (h, w, 3), np.uint8)
        out["valid_hw"] = _stacked([np.array(o[2], np.int32) for o in outputs], (2,), np.int32)
    else:
        out["image"] = _stacked([o[0] for o in outputs], (3, h, w), np.float32)
    return out


def _eval_batch(batch: dict[str, np.ndarray], *, params: EvalParams, skip_bad: bool, counter) -> dict[str, Any]:
    _one_cpu()

    def transform(i: int, where: str):
        return eval_transform(batch["image"][i], batch["label"][i], params, where=where)

    keys, outputs = _transform_rows(batch, transform, skip_bad=skip_bad, counter=counter)
    images, labels = [o[0] for o in outputs], [o[1] for o in outputs]
    return {"key": np.array(keys, dtype=object), "image": _ragged(images, np.float32, 3),
            "label": _ragged(labels, np.uint8, 2), "height": np.array([lab.shape[0] for lab in labels], np.int32),
            "width": np.array([lab.shape[1] for lab in labels], np.int32)}


def _ragged(arrays: list[np.ndarray], dtype, ndim: int) -> np.ndarray:
    """One array per row, shapes may differ: a stacked array when they agree, else an object array."""
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    if not arrays:
        return np.zeros((0,) + (1,) * ndim, dtype)
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def _datasource(**kwargs):
    from ray.data import Datasource

    cls = type("ShardDatasource", (_ShardSource, Datasource), {})
    return cls(**kwargs)


def train_dataset(data: DataSection, *, seed: int = 0, start_epoch: int = 0, num_epochs: int = 1, skip: int = 0,
                  split: str = "train", verify: bool = True, skip_counter: SkipCounter | None = None,
                  manifest: Manifest | None = None, block_rows: int | None = None,
                  num_cpus: float = 1.0, uint8: bool = False) -> ray.data.Dataset:
    """A Ray Dataset of augmented crops for training; see the module doc.

    Columns: key (str), image float32 [3, H, W] normalised, label uint8 [H, W] (H x W = crop_size). With
    `uint8`: image uint8 [H, W, 3] BGR before normalisation and valid_hw int32 [2], the crop's unpadded size
    (a quarter of the bytes; `batches.torch_batches(normalize=...)` normalises them on the device, the same
    values).
    Epochs start_epoch .. start_epoch + num_epochs - 1, each reshuffled and re-augmented; the first `skip`
    samples of start_epoch's order left out (a resumed stream: `stream_position`).
    """
    import ray.data

    manifest = manifest or open_dataset(data)
    params = train_params(data, manifest)
    source = _datasource(manifest=manifest, split=split, epochs=list(range(start_epoch, start_epoch + num_epochs)),
                         seed=seed, shuffle=True, rank=0, world_size=1, verify=verify,
                         skip_bad=data.skip_bad_samples, counter=skip_counter,
                         block_rows=block_rows or block_rows_for(manifest, split), skip=skip)
    # Reading is I/O: a quarter CPU, so that it neither fuses with nor starves the decode tasks. One
    # output block count per read task keeps Ray from splitting blocks into one-row map tasks.
    ds = ray.data.read_datasource(source, num_cpus=0.25, override_num_blocks=source.num_tasks())
    return ds.map_batches(_train_batch, batch_size=None, batch_format="numpy", num_cpus=num_cpus,
                          fn_kwargs={"params": params, "seed": seed, "skip_bad": data.skip_bad_samples,
                                     "counter": skip_counter, "uint8": uint8})


def eval_dataset(data: DataSection, *, split: str = "val", rank: int = 0, world_size: int = 1, resize: bool = True,
                 verify: bool = True, skip_counter: SkipCounter | None = None, manifest: Manifest | None = None,
                 block_rows: int = 4, num_cpus: float = 1.0) -> ray.data.Dataset:
    """Worker `rank`'s share of a split (the indices in `eval_range`) as whole images, in split order.

    Columns: key, image float32 [3, h, w], label uint8 [H, W] (original size), height, width.
    Shapes differ between rows: iterate with batch_size=1 (`iter_batches(batch_size=1)`).
    """
    import ray.data

    manifest = manifest or open_dataset(data)
    params = eval_params(data, manifest, resize)
    source = _datasource(manifest=manifest, split=split, epochs=[0], seed=0, shuffle=False, rank=rank,
                         world_size=world_size, verify=verify, skip_bad=data.skip_bad_samples, counter=skip_counter,
                         block_rows=block_rows)
    ds = ray.data.read_datasource(source, num_cpus=0.25, override_num_blocks=source.num_tasks())
    return ds.map_batches(_eval_batch, batch_size=1, batch_format="numpy", num_cpus=num_cpus,
                          fn_kwargs={"params": params, "skip_bad": data.skip_bad_samples, "counter": skip_counter})
