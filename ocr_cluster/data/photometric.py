"""Step 4 of the training chain (data/transforms.py): mmseg's PhotoMetricDistortion on uint8 BGR arrays.

Brightness +-32, contrast x[0.5, 1.5] (before or after the HSV steps, random order), saturation x[0.5, 1.5],
hue +-18 (OpenCV's 0-180 scale), each with p = 0.5, drawn in mmseg's order. mmseg's convert() (float,
clip, truncate to uint8) is a 256-entry lookup table per step, so consecutive brightness/contrast steps
fuse into one table, and the HSV steps are the same cv2 round trips as mmseg's: the same bytes out.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

_IDENTITY = np.arange(256, dtype=np.float32)


def convert_lut(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg PhotoMetricDistortion.convert as a table: clip(v * alpha + beta, 0, 255) -> uint8."""
    return np.clip(_IDENTITY * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


@dataclass
class PhotometricDraw:
    """The random choices of one PhotoMetricDistortion call (None = that step does not fire)."""

    brightness: float | None
    contrast_first: bool
    contrast: float | None
    saturation: float | None
    hue: int | None  # on OpenCV's 0-180 scale


def draw_photometric(rng, brightness_delta: int = 32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                     hue_delta: int = 18) -> PhotometricDraw:
    """mmseg's draws, in its order: brightness, mode, [contrast], saturation, hue, [contrast]."""
    brightness = rng.uniform(-brightness_delta, brightness_delta) if rng.integers(0, 2) else None
    contrast_first = bool(rng.integers(0, 2))  # mmseg: mode == 1 -> contrast first
    contrast = None
    if contrast_first and rng.integers(0, 2):
        contrast = rng.uniform(*contrast_range)
    saturation = rng.uniform(*saturation_range) if rng.integers(0, 2) else None
    hue = int(rng.integers(-hue_delta, hue_delta)) if rng.integers(0, 2) else None
    if not contrast_first and rng.integers(0, 2):
        contrast = rng.uniform(*contrast_range)
    return PhotometricDraw(brightness, contrast_first, contrast, saturation, hue)


@functools.lru_cache(maxsize=512)
def _hue_lut(delta: int) -> np.ndarray:
    return ((np.arange(256) + delta) % 180).astype(np.uint8)  # HSV hue < 180 in OpenCV's uint8 HSV


def compose_luts(first: np.ndarray | None, then: np.ndarray | None) -> np.ndarray | None:
    """The table of `then` applied after `first` (None = identity): one pass instead of two, same values."""
    if first is None or then is None:
        return then if first is None else first
    return then[first]


def photometric_steps(image: np.ndarray, draw: PhotometricDraw) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply one draw except its trailing lookup-table step: (image, that table or None).

    mmseg's order: brightness, [contrast], saturation (HSV round trip), hue (HSV round trip), [contrast].
    Brightness and contrast are per-value tables, so consecutive ones fold into one table, and the last
    one need not touch the image here at all: `train_transform` folds it into the normalisation tables
    (a table of a table gives the same values). Without an HSV step every table folds into the tail.
    """
    before = convert_lut(beta=draw.brightness) if draw.brightness is not None else None
    contrast = convert_lut(alpha=draw.contrast) if draw.contrast is not None else None
    if draw.contrast_first:
        before = compose_luts(before, contrast)
    after = None if draw.contrast_first else contrast
    if draw.saturation is None and draw.hue is None:
        return image, compose_luts(before, after)
    if before is not None:
        image = cv2.LUT(image, before)
    if draw.saturation is not None:
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        image = cv2.cvtColor(cv2.LUT(hsv, _channel_lut(1, convert_lut(alpha=draw.saturation)), dst=hsv),
                             cv2.COLOR_HSV2BGR)
    if draw.hue is not None:
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        image = cv2.cvtColor(cv2.LUT(hsv, _channel_lut(0, _hue_lut(draw.hue)), dst=hsv), cv2.COLOR_HSV2BGR)
    return image, after


def _channel_lut(channel: int, table: np.ndarray) -> np.ndarray:
    """A 3-channel cv2.LUT table: `table` on one channel, identity on the others (no plane copies)."""
    out = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    out[:, channel] = table
    return out.reshape(256, 1, 3)


def apply_photometric(image: np.ndarray, draw: PhotometricDraw) -> np.ndarray:
    """Apply one draw to an HxWx3 uint8 BGR image (mmseg's steps; consecutive tables fused exactly)."""
    image, tail = photometric_steps(image, draw)
    return image if tail is None else cv2.LUT(image, tail)
