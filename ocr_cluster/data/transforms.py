"""mmseg-parity training and evaluation transforms, as plain functions of numpy arrays and a Generator.

The training chain is mmseg 1.x's (configs/_base_/datasets/*.py; mmseg/datasets/transforms/transforms.py,
mmcv/transforms/processing.py, mmseg SegDataPreProcessor), with the same OpenCV calls, the same
random draws in the same order, and images kept in BGR order until normalisation, as mmseg does:

0. Load: the image with cv2.imdecode (BGR; EXIF orientation ignored so the pixels stay aligned with
   the label), the label PNG as stored (train ids, 255 = ignore).
1. RandomResize(scale=img_scale, ratio_range=(0.5, 2.0), keep_ratio=True): r ~ U[lo, hi);
   target = (int(W*r), int(H*r)); rescale keeping the aspect ratio so that the long edge fits the
   target's long edge and the short edge its short edge (mmcv.rescale_size). cv2.resize, image
   INTER_LINEAR, label INTER_NEAREST.
2. RandomCrop(crop_size, cat_max_ratio=0.75): offsets uniform in [0, margin]; up to 10 re-draws
   until the crop has more than one non-ignored class and the largest covers < cat_max_ratio of the
   non-ignored pixels (the 11th draw is kept unchecked, as in mmseg): `choose_crop`.
3. RandomFlip(prob=0.5), horizontal; datasets with left/right classes (LIP) swap them (`flip_swap`;
   mmseg's `swap_seg_labels`).
4. PhotoMetricDistortion: brightness +-32, contrast x[0.5, 1.5] (before or after the HSV steps, random
   order), saturation x[0.5, 1.5], hue +-18 (OpenCV's 0-180 scale); each with p = 0.5; uint8
   arithmetic and cv2 HSV round trips exactly as mmseg (data/photometric.py).
5. Normalize (SegDataPreProcessor): BGR -> RGB, (x - mean) / std on 0-255 values, float32 CHW.
6. Pad to crop_size at the bottom/right: image 0 (after normalisation, = the mean colour), label 255.

Only the crop-sized result leaves `train_transform`: the photometric and normalisation steps run on
the crop, brightness/contrast/normalisation are lookup tables (consecutive ones fused into one pass;
the photometric step's last table folded into the normalisation tables), and when the resized frame would be
much larger than the crop only the crop window is resampled (`augment`; labels stay exact, images
within one grey level; `TrainParams(exact_resize=True)` always resizes the whole frame). With a
`numpy.random.RandomState` behind `LegacyRandom`, the draws are those of mmseg's global numpy RNG,
which is how tests/test_data_transforms.py checks the chain against outputs recorded from mmseg
1.2.2 itself: bit-exact with exact_resize, within one grey level (before photometric distortion)
without.

Normalising on the GPU instead (an option, as mmseg's SegDataPreProcessor does): `train_crop_uint8`
gives the padded uint8 BGR crop and its valid size, `normalize_batch` (torch) the same float32 values as
`train_transform`, bit for bit, at a quarter of the bytes between the decode tasks and the trainer.

Randomness: the pipeline seeds one Generator per sample from (seed, epoch, key) (`sample_rng`), so
a sample's crop does not depend on which worker or task processes it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from ocr_cluster.data.constants import IGNORE_INDEX, MEAN_RGB, STD_RGB
from ocr_cluster.data.errors import DataError
from ocr_cluster.data.photometric import draw_photometric, photometric_steps

_IMREAD_COLOR = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


@dataclass(frozen=True)
class TrainParams:
    crop_hw: tuple[int, int]
    scale_wh: tuple[int, int]
    num_classes: int
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    mean: tuple[float, float, float] = MEAN_RGB
    std: tuple[float, float, float] = STD_RGB
    flip_swap: tuple[tuple[int, int], ...] = ()
    ignore_index: int = IGNORE_INDEX
    exact_resize: bool = False  # True: always resize the whole image (bit-exact with mmseg), see augment()


@dataclass(frozen=True)
class EvalParams:
    num_classes: int
    scale_wh: tuple[int, int] | None = None  # None = original resolution
    mean: tuple[float, float, float] = MEAN_RGB
    std: tuple[float, float, float] = STD_RGB


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The Generator of one sample in one epoch: a function of (seed, epoch, key) only."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF,
                                  int.from_bytes(digest, "little")])


class LegacyRandom:
    """A Generator-like view of a numpy RandomState (mmseg draws from np.random's global state)."""

    def __init__(self, state: np.random.RandomState):
        self.state = state

    def random(self) -> float:
        return self.state.random_sample()

    def integers(self, low: int, high: int) -> int:
        return self.state.randint(low, high)

    def uniform(self, low: float, high: float) -> float:
        return self.state.uniform(low, high)


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_image(data: bytes, *, where: str = "sample") -> np.ndarray:
    """Encoded image bytes -> HxWx3 uint8 BGR (cv2.imdecode, as mmseg's LoadImageFromFile)."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), _IMREAD_COLOR) if len(data) else None
    if img is None:
        raise DataError(f"{where}: image cannot be decoded ({len(data)} bytes, not a readable PNG/JPEG)")
    return img


def decode_label(data: bytes, num_classes: int, *, where: str = "sample") -> np.ndarray:
    """A stored label PNG -> HxW uint8 train ids, checked to be in [0, num_classes) or 255."""
    lab = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if len(data) else None
    if lab is None:
        raise DataError(f"{where}: label cannot be decoded ({len(data)} bytes, not a readable PNG)")
    if lab.ndim != 2 or lab.dtype != np.uint8:
        raise DataError(f"{where}: label PNG is {lab.dtype} with shape {lab.shape}, expected 8-bit greyscale")
    if cv2.countNonZero(cv2.LUT(lab, _bad_values_lut(num_classes))):
        values = np.flatnonzero(np.bincount(lab.ravel(), minlength=256))
        shown = [int(v) for v in values if v >= num_classes and v != IGNORE_INDEX]
        raise DataError(f"{where}: label has values outside [0, {num_classes}) and 255: "
                        f"{', '.join(map(str, shown[:8]))}")
    return lab


def decode_pair(image_bytes: bytes, label_bytes: bytes, num_classes: int, *,
                where: str = "sample") -> tuple[np.ndarray, np.ndarray]:
    """(BGR image, label), checked: decodable, same size, label values in [0, K) or 255."""
    img = decode_image(image_bytes, where=where)
    lab = decode_label(label_bytes, num_classes, where=where)
    if lab.shape != img.shape[:2]:
        raise DataError(f"{where}: label is {lab.shape[1]}x{lab.shape[0]} but the image is "
                        f"{img.shape[1]}x{img.shape[0]}")
    return img, lab


@functools.lru_cache(maxsize=64)
def _bad_values_lut(num_classes: int) -> np.ndarray:
    return np.array([0 if (v < num_classes or v == IGNORE_INDEX) else 1 for v in range(256)], np.uint8)


# ---------------------------------------------------------------------------------------------
# 1-3: geometry


def sample_target_scale(scale_wh: tuple[int, int], ratio_range: tuple[float, float], rng) -> tuple[int, int]:
    """mmcv RandomResize._random_sample_ratio: (int(W*r), int(H*r)) with r ~ U[lo, hi)."""
    lo, hi = ratio_range
    ratio = rng.random() * (hi - lo) + lo
    return int(scale_wh[0] * ratio), int(scale_wh[1] * ratio)


def rescale_size(width: int, height: int, target_wh: tuple[int, int]) -> tuple[int, int]:
    """mmcv.rescale_size with a (w, h) target: the largest size keeping the ratio inside the target."""
    long_edge, short_edge = max(target_wh), min(target_wh)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize(image: np.ndarray, label: np.ndarray | None, size_wh: tuple[int, int]):
    """mmcv.imresize with the cv2 backend: image bilinear, label nearest."""
    if (image.shape[1], image.shape[0]) != tuple(size_wh):
        image = cv2.resize(image, size_wh, interpolation=cv2.INTER_LINEAR)
        if label is not None:
            label = cv2.resize(label, size_wh, interpolation=cv2.INTER_NEAREST)
    return image, label


def crop_offsets(size_hw: tuple[int, int], crop_hw: tuple[int, int], rng) -> tuple[int, int]:
    """mmseg RandomCrop.generate_crop_bbox: (y0, x0) uniform in [0, max(size - crop, 0)]."""
    margin_h, margin_w = max(size_hw[0] - crop_hw[0], 0), max(size_hw[1] - crop_hw[1], 0)
    return int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))


def crop_ok(label_crop: np.ndarray, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX) -> bool:
    """mmseg's cat_max_ratio test: more than one non-ignored class, the largest under the ratio."""
    counts = cv2.calcHist([label_crop], [0], None, [256], [0, 256]).ravel()
    counts[ignore_index] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def choose_crop(size_hw: tuple[int, int], crop_hw: tuple[int, int], cat_max_ratio: float, rng,
                label_crop: Callable[[int, int], np.ndarray],
                ignore_index: int = IGNORE_INDEX) -> tuple[int, int, np.ndarray]:
    """mmseg RandomCrop's choice of window: (y0, x0, label_crop(y0, x0)) of a size_hw label.

    Up to 10 re-draws while the crop fails `crop_ok` (the 11th draw is kept unchecked, as in mmseg).
    """
    y0, x0 = crop_offsets(size_hw, crop_hw, rng)
    crop = label_crop(y0, x0)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            if crop_ok(crop, cat_max_ratio, ignore_index):
                break
            y0, x0 = crop_offsets(size_hw, crop_hw, rng)
            crop = label_crop(y0, x0)
    return y0, x0, crop


def random_crop(image: np.ndarray, label: np.ndarray, crop_hw: tuple[int, int], cat_max_ratio: float, rng,
                ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """Step 2 (views into the inputs); the crop is smaller than crop_hw where the image is."""
    def window(y0: int, x0: int) -> tuple[slice, slice]:
        return slice(y0, y0 + crop_hw[0]), slice(x0, x0 + crop_hw[1])

    y0, x0, label_crop = choose_crop(label.shape, crop_hw, cat_max_ratio, rng, lambda y, x: label[window(y, x)],
                                     ignore_index)
    return image[window(y0, x0)], label_crop


def swap_lut(pairs) -> np.ndarray | None:
    if not pairs:
        return None
    lut = np.arange(256, dtype=np.uint8)
    for a, b in pairs:
        lut[a], lut[b] = b, a
    return lut


def random_flip(image: np.ndarray, label: np.ndarray, prob: float, rng,
                swap_pairs=()) -> tuple[np.ndarray, np.ndarray]:
    """Step 3: horizontal flip with probability `prob`; `swap_pairs` exchange left/right classes."""
    if rng.random() < prob:
        image, label = cv2.flip(image, 1), cv2.flip(label, 1)
        lut = swap_lut(tuple(map(tuple, swap_pairs)))
        if lut is not None:
            label = cv2.LUT(label, lut)
    return image, label


# ---------------------------------------------------------------------------------------------
# 4: photometric distortion: data/photometric.py
# 5-6: normalise and pad


@functools.lru_cache(maxsize=16)
def normalize_luts(mean: tuple, std: tuple) -> tuple[np.ndarray, ...]:
    """Three 1x256 float32 tables, R, G, B: (v - mean[c]) / std[c] for every uint8 value v."""
    values = np.arange(256, dtype=np.float32)
    return tuple(((values - np.float32(m)) / np.float32(s)).reshape(1, 256) for m, s in zip(mean, std))


def normalize_image(image: np.ndarray, mean, std, first: np.ndarray | None = None) -> np.ndarray:
    """Step 5: HxWx3 uint8 BGR -> 3xHxW float32 RGB, (x - mean) / std (mmseg's bgr_to_rgb + Normalize).

    `first`: a uint8 table still to be applied to every channel before normalising (the photometric
    step's tail), folded into the float tables: the values are those of normalising LUT(image, first).
    """
    out = np.empty((3, *image.shape[:2]), np.float32)
    b, g, r = cv2.split(np.ascontiguousarray(image))
    for plane, channel, lut in zip(out, (r, g, b), normalize_luts(tuple(mean), tuple(std))):
        cv2.LUT(channel, lut if first is None else lut[:, first], dst=plane)
    return out


def pad(image: np.ndarray, label: np.ndarray, crop_hw: tuple[int, int],
        ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """Step 6: pad a 3xhxw image with 0 and an hxw label with 255 to crop_hw (bottom/right)."""
    h, w = label.shape
    if (h, w) == tuple(crop_hw):
        return image, np.ascontiguousarray(label)
    out_img = np.zeros((image.shape[0], *crop_hw), dtype=image.dtype)
    out_lab = np.full(crop_hw, ignore_index, dtype=label.dtype)
    out_img[:, :h, :w] = image
    out_lab[:h, :w] = label
    return out_img, out_lab


# ---------------------------------------------------------------------------------------------
# The chains


# Resizing the whole frame costs ~1 ns per output pixel, resampling just the crop window with
# cv2.warpAffine ~3 ns per crop pixel: the window is cheaper when the frame is > 3x the crop.
WINDOW_COST = 3.0


def nearest_index(start: int, count: int, src: int, dst: int) -> np.ndarray:
    """Source indices of dst pixels start..start+count-1 under cv2.resize INTER_NEAREST (src -> dst)."""
    inv = 1.0 / (dst / src)  # OpenCV: ifx = 1. / inv_scale_x, sx = cvFloor(x * ifx)
    return np.minimum(np.floor(np.arange(start, start + count) * inv).astype(np.intp), src - 1)


def window_resize(image: np.ndarray, size_wh: tuple[int, int], y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """The [y0:y0+h, x0:x0+w] window of cv2.resize(image, size_wh, INTER_LINEAR), resampling only it.

    Same sampling grid as cv2.resize (pixel centres, replicated border); OpenCV's warpAffine rounds its
    sub-pixel positions to 1/32 pixel, so values may differ from cv2.resize's by one grey level.
    """
    sx, sy = image.shape[1] / size_wh[0], image.shape[0] / size_wh[1]
    m = np.array([[sx, 0.0, (x0 + 0.5) * sx - 0.5], [0.0, sy, (y0 + 0.5) * sy - 0.5]])
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def augment(image: np.ndarray, label: np.ndarray, p: TrainParams, rng) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-4 on a decoded BGR image and its label: the uint8 crop (not yet padded) and its label.

    When the resized frame is much larger than the crop (and not p.exact_resize), only the crop window
    is resampled: the label by the exact INTER_NEAREST index map, the image by `window_resize` (within
    one grey level of the full resize). Same random draws, same crop, same label either way.
    """
    image, label, tail = augment_deferred(image, label, p, rng)
    if tail is not None:
        image = cv2.LUT(image, tail)
    return np.ascontiguousarray(image), label


def augment_deferred(image: np.ndarray, label: np.ndarray, p: TrainParams,
                     rng) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`augment`, leaving the photometric step's trailing lookup table unapplied: (image, label, table).

    The image may be a view into the resized frame; the label is contiguous.
    """
    height, width = label.shape
    new_w, new_h = rescale_size(width, height, sample_target_scale(p.scale_wh, p.ratio_range, rng))
    ch, cw = min(p.crop_hw[0], new_h), min(p.crop_hw[1], new_w)
    if p.exact_resize or (new_w, new_h) == (width, height) or new_w * new_h <= WINDOW_COST * ch * cw:
        image, label = resize(image, label, (new_w, new_h))
        image, label = random_crop(image, label, p.crop_hw, p.cat_max_ratio, rng, p.ignore_index)
    else:
        def label_window(y0: int, x0: int) -> np.ndarray:
            rows = nearest_index(y0, ch, height, new_h)
            return label.take(rows, axis=0).take(nearest_index(x0, cw, width, new_w), axis=1)

        y0, x0, label_crop = choose_crop((new_h, new_w), p.crop_hw, p.cat_max_ratio, rng, label_window,
                                         p.ignore_index)
        image, label = window_resize(image, (new_w, new_h), y0, x0, ch, cw), label_crop
    image, label = random_flip(image, label, p.flip_prob, rng, p.flip_swap)
    tail = None
    if p.photometric:
        image, tail = photometric_steps(image, draw_photometric(rng))
    return image, np.ascontiguousarray(label), tail


def train_transform(image_bytes: bytes, label_bytes: bytes, p: TrainParams, rng, *,
                    where: str = "sample") -> tuple[np.ndarray, np.ndarray]:
    """Encoded sample -> (3xHxW float32 normalised crop, HxW uint8 label crop), H x W = p.crop_hw."""
    image, label = decode_pair(image_bytes, label_bytes, p.num_classes, where=where)
    image, label, tail = augment_deferred(image, label, p, rng)
    return pad(normalize_image(image, p.mean, p.std, first=tail), label, p.crop_hw, p.ignore_index)


def train_crop_uint8(image_bytes: bytes, label_bytes: bytes, p: TrainParams, rng, *,
                     where: str = "sample") -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """`train_transform` without steps 5-6 on the image: (HxWx3 uint8 BGR crop padded with 0, HxW label padded
    with 255, (h, w) of the unpadded crop), H x W = p.crop_hw.

    For normalising on the GPU, as mmseg's SegDataPreProcessor does: `normalize_batch` turns a batch of these
    into the very float32 values `train_transform` gives, at a quarter of the bytes and without the CPU's
    normalisation pass. Same random draws, same crop.
    """
    image, label = decode_pair(image_bytes, label_bytes, p.num_classes, where=where)
    image, label = augment(image, label, p, rng)
    h, w = label.shape
    if (h, w) == tuple(p.crop_hw):
        return image, label, (h, w)
    out_img = np.zeros((*p.crop_hw, 3), np.uint8)
    out_lab = np.full(p.crop_hw, p.ignore_index, np.uint8)
    out_img[:h, :w], out_lab[:h, :w] = image, label
    return out_img, out_lab, (h, w)


def normalize_batch(images, valid_hw, mean, std):
    """A torch uint8 [B, H, W, 3] BGR batch of `train_crop_uint8` crops (on any device) -> float32 [B, 3, H, W]
    RGB, (x - mean) / std, 0 outside each crop's valid (h, w): bit-identical to `train_transform`'s images
    (float32 subtraction and division, as its tables and mmseg's SegDataPreProcessor compute them), laid out
    channels-last (the NHWC input's). `valid_hw`: [B, 2] ints, a tensor on the images' device (no host sync)
    or anything numpy reads.
    """
    import torch

    rgb = images.flip(-1).to(torch.float32)
    mean_t, std_t = _mean_std_on(tuple(map(float, mean)), tuple(map(float, std)), rgb.device)
    out = ((rgb - mean_t) / std_t).permute(0, 3, 1, 2)
    height, width = out.shape[-2:]
    valid = torch.as_tensor(valid_hw if isinstance(valid_hw, torch.Tensor) else np.asarray(valid_hw),
                            device=rgb.device).reshape(-1, 2)
    rows = torch.arange(height, device=rgb.device) < valid[:, :1]  # [B, H]
    cols = torch.arange(width, device=rgb.device) < valid[:, 1:]  # [B, W]
    inside = (rows[:, :, None] & cols[:, None, :])[:, None]  # [B, 1, H, W]
    return torch.where(inside, out, 0.0)  # exact zeros: a product with the mask would give -0.0 below the mean


@functools.lru_cache(maxsize=8)
def _mean_std_on(mean: tuple, std: tuple, device) -> tuple:
    """The normalisation constants on `device`, made once: copying them from the host for every batch would
    wait for the GPU's queue each time (a copy from pageable memory synchronises)."""
    import torch

    return (torch.tensor(mean, dtype=torch.float32, device=device),
            torch.tensor(std, dtype=torch.float32, device=device))


def eval_transform(image_bytes: bytes, label_bytes: bytes, p: EvalParams, *,
                   where: str = "sample") -> tuple[np.ndarray, np.ndarray]:
    """Encoded sample -> (3xhxw float32 normalised image, HxW uint8 label at the original size).

    With `p.scale_wh` the image is resized as mmseg's test pipeline does (Resize(scale, keep_ratio=True));
    the label keeps the original resolution (metrics are computed there).
    """
    image, label = decode_pair(image_bytes, label_bytes, p.num_classes, where=where)
    if p.scale_wh is not None:
        image, _ = resize(image, None, rescale_size(image.shape[1], image.shape[0], p.scale_wh))
    return normalize_image(image, p.mean, p.std), label
