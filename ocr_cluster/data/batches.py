"""A worker's training batches as torch tensors on its device, from its share of `pipeline.train_dataset`.

Ray Data's `iter_torch_batches` runs `TrainCollate` and the copy to the device on its fetch thread,
`prefetch_batches` ahead of the training step, so the training thread only receives batches. On a GPU
worker the host tensors are page-locked (the copy runs asynchronously), labels cross as uint8 and are
widened to int64 on the device, and with cluster.normalize_on `device` the uint8 crops are normalised there
(`transforms.normalize_batch`, the same values as the decode tasks' normalisation).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ocr_cluster.data.transforms import normalize_batch


class TrainCollate:
    """A training batch from Ray Data's numpy batch to host tensors, on Ray Data's fetch thread (not the training
    thread): the image as it comes (float32 [B, 3, H, W], or uint8 [B, H, W, 3] with its int32 valid_hw [B, 2]);
    labels int64 on CPU, and for a GPU uint8 (1/8 of the bytes to copy), in page-locked memory, which lets
    the copy to the device that Ray then starts from the same thread run asynchronously. Each array is copied
    once, out of the read-only object-store buffer. With `keys`, the sample keys as a uint8 tensor
    [B, longest key] of their UTF-8 bytes (a batch must hold tensors only to be moved)."""

    def __init__(self, device_type: str, keys: bool = False):
        self.on_gpu, self.keys = device_type != "cpu", keys

    def _tensor(self, array: np.ndarray, dtype):
        import torch

        out = torch.empty(array.shape, dtype=dtype, pin_memory=self.on_gpu)
        out.numpy()[...] = array  # the copy; on CPU it also widens the labels to int64
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        image = batch["image"]
        out = {"image": self._tensor(image, torch.uint8 if image.dtype == np.uint8 else torch.float32),
               "label": self._tensor(batch["label"], torch.uint8 if self.on_gpu else torch.int64)}
        if "valid_hw" in batch:
            out["valid_hw"] = self._tensor(batch["valid_hw"], torch.int32)
        if self.keys:
            encoded = np.array([str(key).encode() for key in batch["key"]], dtype=bytes)
            out["key"] = torch.from_numpy(encoded.view(np.uint8).reshape(len(encoded), encoded.itemsize).copy())
        return out


def decode_keys(encoded) -> list[str]:
    """The keys `TrainCollate` encoded (a uint8 tensor [B, L], on any device)."""
    return [bytes(row).rstrip(b"\0").decode() for row in encoded.cpu().numpy()]


def torch_batches(iterator, batch_size: int, *, device: Any = None, prefetch_batches: int = 1,
                  drop_last: bool = True, keys: bool = False,
                  normalize: tuple[tuple, tuple] | None = None) -> Iterator[dict[str, Any]]:
    """Training batches from a Ray DataIterator (get_dataset_shard('train')) or Dataset as torch tensors.

    image float32 [B, 3, H, W], label int64 [B, H, W] on `device`; with `keys`, key a list of str. Ray Data's
    `iter_torch_batches` makes the tensors (`TrainCollate`) and copies them to the device on its fetch thread,
    `prefetch_batches` ahead; a GPU's labels are widened to int64 there, on the device. The uint8 crops of
    `train_dataset(uint8=True)` are normalised on the device with `normalize` = (mean, std), RGB.
    """
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    device = torch.device(device or "cpu")
    collate = type("TrainCollate", (TrainCollate, NumpyBatchCollateFn), {})(device.type, keys=keys)
    for batch in iterator.iter_torch_batches(batch_size=batch_size, collate_fn=collate, device=device,
                                             prefetch_batches=prefetch_batches, drop_last=drop_last):
        image = batch["image"]
        if "valid_hw" in batch:
            if normalize is None:
                raise ValueError("uint8 crops (train_dataset(uint8=True)) need torch_batches(normalize=(mean, std))")
            # NCHW-contiguous as the decode tasks' batches: a channels-last input would take other convolution
            # kernels (other sums) unless cluster.channels_last asks for them (fastpath.training_input)
            image = normalize_batch(image, batch["valid_hw"], *normalize).contiguous()
        out = {"image": image, "label": batch["label"].long()}  # long(): a no-op on CPU
        if keys:
            out["key"] = decode_keys(batch["key"])
        yield out
