"""Image and label files for the converters and the writer: sniffing, label decoding, PNG encoding.

Images are kept as the dataset's original encoded bytes (PNG or JPEG); labels are stored as
single-channel 8-bit PNGs of train ids (255 = ignore). Source labels are decoded with PIL, which
never converts a palette PNG to RGB: VOC's `SegmentationClass` PNGs are palette images whose
*indices* are the class ids. (Training decodes with OpenCV: see transforms.decode_pair.)
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ocr_cluster.data.constants import IGNORE_INDEX

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"BM", "bmp"),
          (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (b"RIFF", "webp"))

# A decompression bomb check that still admits very large aerial images.
Image.MAX_IMAGE_PIXELS = 40_000 * 40_000


def image_format(data: bytes) -> str:
    """'png', 'jpeg', ... from the first bytes; 'unknown' when none matches."""
    for magic, name in _MAGIC:
        if data[: len(magic)] == magic:
            return name
    return "unknown"


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the header alone (no pixel decoding)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.height, img.width


def label_array(img: Image.Image) -> np.ndarray:
    """Class ids of a label image: palette indices for 'P', values for 'L'/'I'/'I;16'."""
    if img.mode in ("P", "L"):
        return np.asarray(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(img).astype(np.int64)
    if img.mode == "1":
        return np.asarray(img).astype(np.uint8)
    raise ValueError(f"label image has mode {img.mode!r}; expected class ids in a 1-channel PNG "
                     "(colour-coded labels are not supported)")


def decode_label(data: bytes) -> np.ndarray:
    """HxW class ids of a source label file (uint8 for 8-bit PNGs, int64 for 16-bit ones)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return label_array(img)


def encode_label(label: np.ndarray, compress_level: int = 3) -> bytes:
    """uint8 HxW train ids -> 8-bit greyscale PNG bytes."""
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError("label values must fit in 0..255")
        label = label.astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(label)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(np.ascontiguousarray(image))
    if fmt == "png":
        pil.save(buf, format="PNG", compress_level=3)
    elif fmt == "jpeg":
        pil.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


def lut_from_map(mapping: dict[int, int], size: int = 256, default: int = IGNORE_INDEX) -> np.ndarray:
    """A lookup table: value -> mapping[value], every other value -> default."""
    lut = np.full(size, default, dtype=np.uint8)
    for src, dst in mapping.items():
        if 0 <= int(src) < size:
            lut[int(src)] = dst
    return lut


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 -> 255, v -> v - 1, and 254 (from 255) -> 255."""
    out = label.astype(np.int64) - 1
    out[label == 0] = IGNORE_INDEX
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out.astype(np.uint8) if out.max(initial=0) <= 255 else out
