"""Test-time inference as mmseg does it: whole or slide windows, optional multi-scale + flip,
logits resized to the original label size, then argmax; and mmseg's fps measurement.

Multi-scale sizes follow mmseg 0.x's MultiScaleFlipAug (the seeds' ms+flip numbers come from 0.x): at
ratio r the ORIGINAL image is rescaled, keeping its ratio, into the test scale times r, i.e. r times the
test-resized size. mmseg 1.x's TestTimeAug instead scales the original size by r (the same only where
the test resize keeps the size, e.g. Cityscapes at 2048x1024). The view itself is a bilinear resample
of the (already test-resized, normalised) image, where 0.x resized the original uint8 image with cv2.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ocr_cluster.config import EvaluationSection, parse_size
from ocr_cluster.data.transforms import rescale_size
from ocr_cluster.train.metrics import IoUMetric


@dataclass
class InferenceSettings:
    mode: str = "whole"                      # whole | slide
    crop: tuple[int, int] = (512, 1024)      # slide window, H x W
    stride: tuple[int, int] = (341, 682)
    ms_ratios: tuple[float, ...] = ()        # empty = single scale
    flip: bool = False
    align_corners: bool = False
    scale: tuple[int, int] | None = None     # the data's test scale (data.scale), for the ms sizes

    @classmethod
    def from_config(cls, cfg: EvaluationSection, align_corners: bool, ms_flip: bool = False,
                    mode: str | None = None, scale: str | None = None) -> InferenceSettings:
        return cls(mode=mode or cfg.mode, crop=parse_size(cfg.slide_crop), stride=parse_size(cfg.slide_stride),
                   ms_ratios=tuple(cfg.ms_ratios) if ms_flip else (), flip=ms_flip, align_corners=align_corners,
                   scale=parse_size(scale) if scale else None)


def scaled_size(image_hw: tuple[int, int], out_hw: tuple[int, int], ratio: float,
                scale: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of the view at `ratio`, as mmseg 0.x: the original (out_hw) rescaled into (int(W*r), int(H*r))
    of the test scale with mmcv's rescale_size. Without a scale: the given image's size times r."""
    if scale is None:
        return int(image_hw[0] * ratio + 0.5), int(image_hw[1] * ratio + 0.5)
    w, h = rescale_size(out_hw[1], out_hw[0], (int(scale[0] * ratio), int(scale[1] * ratio)))
    return h, w


def _slide(model: torch.nn.Module, image: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """Average the logits of overlapping windows; the last window of a row/column is shifted back to fit."""
    _, _, h, w = image.shape
    ch, cw = min(settings.crop[0], h), min(settings.crop[1], w)
    sh, sw = settings.stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    logits = count = None
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, h - ch), min(c * sw, w - cw)
            out = model(image[:, :, y1:y1 + ch, x1:x1 + cw])
            if logits is None:
                logits = image.new_zeros(image.shape[0], out.shape[1], h, w)
                count = image.new_zeros(1, 1, h, w)
            logits[:, :, y1:y1 + ch, x1:x1 + cw] += out
            count[:, :, y1:y1 + ch, x1:x1 + cw] += 1
    return logits / count


def _logits(model: torch.nn.Module, image: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    return _slide(model, image, settings) if settings.mode == "slide" else model(image)


@torch.no_grad()
def predict(model: torch.nn.Module, image: torch.Tensor, out_size: tuple[int, int],
            settings: InferenceSettings) -> torch.Tensor:
    """Class map (B, H, W) at `out_size` for a normalised (B, 3, h, w) image; `model` in eval mode.

    Single scale: logits resized to out_size, argmax (mmseg whole/slide inference). Multi-scale + flip:
    softmax probabilities averaged over every ratio (sizes per `scaled_size`) and both flips, each view's
    logits flipped back and resized to out_size first (mmseg's SegTTAModel and 0.x aug_test alike).
    """
    if not settings.ms_ratios:
        return F.interpolate(_logits(model, image, settings).float(), size=out_size, mode="bilinear",
                             align_corners=settings.align_corners).argmax(1)
    probs = None
    for ratio in settings.ms_ratios:
        size = scaled_size(tuple(image.shape[-2:]), out_size, ratio, settings.scale)
        scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flip in ((False, True) if settings.flip else (False,)):
            x = scaled.flip(-1) if flip else scaled
            logits = _logits(model, x, settings).float()
            logits = logits.flip(-1) if flip else logits
            p = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=settings.align_corners).softmax(1)
            probs = p if probs is None else probs + p
    return probs.argmax(1)


def evaluate(model: torch.nn.Module, samples: Iterable[dict], metric: IoUMetric, settings: InferenceSettings,
             device: torch.device, autocast_dtype: torch.dtype | None = None) -> int:
    """Add every sample (dicts with image float32 [3,h,w] and label [H,W], as data.iter_eval yields) to
    `metric`; returns the number of images. Call metric.all_reduce() afterwards on every rank."""
    was_training = model.training
    model.eval()
    n = 0
    try:
        for sample in samples:
            image = torch.as_tensor(sample["image"]).unsqueeze(0).to(device)
            label = torch.as_tensor(sample["label"]).long()
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                pred = predict(model, image, tuple(label.shape[-2:]), settings)
            metric.update(pred[0].cpu(), label)
            n += 1
    finally:
        model.train(was_training)
    return n


@torch.no_grad()
def measure_fps(model: torch.nn.Module, images: list[torch.Tensor], device: torch.device, warmup: int = 5,
                autocast_dtype: torch.dtype | None = None, out_sizes: list[tuple[int, int]] | None = None,
                align_corners: bool = False) -> float | None:
    """mmseg's tools/benchmark.py: batch 1, whole inference, the first `warmup` images not timed. Timed as
    mmseg's: the copy to the device, the forward, the logits resized to the original size (`out_sizes`, the
    image's own by default), the argmax and the class map back on the host."""
    if len(images) <= warmup:
        return None
    was_training = model.training
    model.eval()
    elapsed = 0.0
    try:
        for i, image in enumerate(images):
            out_size = out_sizes[i] if out_sizes else tuple(image.shape[-2:])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            x = image.unsqueeze(0).to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(x)
            pred = F.interpolate(logits.float(), size=out_size, mode="bilinear", align_corners=align_corners)
            pred.argmax(1).cpu()  # the copy back waits for the device: no synchronize needed after it
            if i >= warmup:
                elapsed += time.perf_counter() - start
    finally:
        model.train(was_training)
    return (len(images) - warmup) / elapsed if elapsed > 0 else None
