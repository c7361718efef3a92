"""Sharded datasets in object storage: Parquet shards, converters, synthetic data, transforms, Ray Data.

Layout of one dataset at a URI (s3://, gs://, file:// or a path):

    URI/manifest.json                  written last: a reader refuses a URI without it
    URI/<split>/part-00000.parquet     columns key, image, label, height, width, image_format

Modules (import the one you need; this package itself imports nothing heavy):

- `shards`     writer, manifest, checksums, shard reading and validation
- `cards`      the dataset cards in datasets/*.yaml (classes, palettes, label maps, layouts)
- `converters` official layouts -> shards (cityscapes, ade20k, voc-aug, pascal-context, coco-stuff, lip)
- `synth`      the learnable synthetic dataset
- `transforms` mmseg-parity training/eval transforms as plain functions (OpenCV, as mmseg)
- `pipeline`   the training input: Ray Data datasets for TorchTrainer and plain-Python iterators
- `batches`    a worker's training batches as torch tensors on its device (Ray Data's fetch thread)
- `photometric` mmseg's PhotoMetricDistortion (lookup tables, draws), step 4 of `transforms`
- `inspect`    counts, class histogram, size range and shard sizes of a dataset
- `commands`   handlers of `ocr-cluster data convert|synth|inspect`

Entry points for the training loop (see `pipeline`'s docstring):

    from ocr_cluster.data import batches, pipeline
    manifest = pipeline.open_dataset(cfg.data)               # num_classes, classes, palette
    ds = pipeline.train_dataset(cfg.data, seed=..., start_epoch=..., num_epochs=...)
    for batch in batches.torch_batches(ray.train.get_dataset_shard("train"), per_worker_batch): ...
    for item in pipeline.iter_eval(cfg.data, rank=r, world_size=w): ...    # or eval_dataset(...)

Every bad input raises `DataError` (a ValueError) with a one-line message naming the shard and key.
"""

from ocr_cluster.data.errors import DataError

__all__ = ["DataError"]
