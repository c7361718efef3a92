"""A small reader for MATLAB level-5 MAT-files (the format scipy.io.loadmat reads), numpy only.

Three official label releases ship as .mat: SBD (`cls/<id>.mat`, struct GTcls with a uint8
`Segmentation`), COCO-Stuff 10k (`annotations/<name>.mat`, matrix `S`) and PASCAL-Context
(`trainval/<id>.mat`, matrix `LabelMap`). This reader covers what they use: numeric and logical
matrices, char arrays, structs, cells, sparse matrices (read as (row, col, value) triples),
zlib-compressed elements, either byte order. MATLAB 7.3 files are HDF5 and are not supported.

    loadmat(data) -> {name: value}; a struct is a dict of fields (a struct array: a list of dicts),
    a cell is a list, a numeric matrix an ndarray in MATLAB's shape (column-major read).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np

MI_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8",
            16: "u1", 17: "u2", 18: "u4"}
MI_MATRIX, MI_COMPRESSED = 14, 15
MX_CELL, MX_STRUCT, MX_OBJECT, MX_CHAR, MX_SPARSE = 1, 2, 3, 4, 5
MX_NUMERIC = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
FLAG_COMPLEX, FLAG_LOGICAL = 0x800, 0x200


class MatFileError(ValueError):
    """Not a level-5 MAT-file this reader understands."""


class _Reader:
    def __init__(self, data: bytes, endian: str):
        self.data = data
        self.e = endian

    def tag(self, pos: int) -> tuple[int, int, int, int]:
        """(type, nbytes, data_start, next_element_pos) of the element at `pos`."""
        first, second = struct.unpack_from(self.e + "II", self.data, pos)
        if first >> 16:  # small data element: type and size packed into the first 4 bytes
            return first & 0xFFFF, first >> 16, pos + 4, pos + 8
        end = pos + 8 + second
        if first != MI_COMPRESSED:
            end += (-second) % 8
        return first, second, pos + 8, end

    def element(self, pos: int) -> tuple[Any, int]:
        value, end, _name = self.variable(pos)
        return value, end

    def variable(self, pos: int) -> tuple[Any, int, str]:
        """(value, next_element_pos, name); the name is '' for anything but a named matrix."""
        mtype, nbytes, start, end = self.tag(pos)
        if mtype == MI_COMPRESSED:
            try:
                inner = _Reader(zlib.decompress(self.data[start:start + nbytes]), self.e)
            except zlib.error as exc:
                raise MatFileError(f"corrupt compressed element ({exc})") from None
            value, _, name = inner.variable(0)
            return value, end, name
        if mtype == MI_MATRIX:
            if not nbytes:
                return None, end, ""
            name, value = self.matrix(start)
            return value, end, name
        if mtype not in MI_TYPES:
            raise MatFileError(f"unsupported MAT data type {mtype}")
        dtype = np.dtype(self.e + MI_TYPES[mtype])
        return np.frombuffer(self.data, dtype=dtype, count=nbytes // dtype.itemsize, offset=start), end, ""

    def matrix(self, pos: int) -> tuple[str, Any]:
        name, value = "", None
        try:
            name, value = self._matrix(pos)
        except (struct.error, IndexError) as exc:
            raise MatFileError(f"truncated or corrupt MAT-file ({exc})") from None
        return name, value

    def _matrix(self, pos: int) -> tuple[str, Any]:
        flags, pos = self.element(pos)
        dims, pos = self.element(pos)
        name, pos = self.element(pos)
        cls, is_complex, is_logical = int(flags[0]) & 0xFF, bool(flags[0] & FLAG_COMPLEX), bool(flags[0] & FLAG_LOGICAL)
        shape = tuple(int(d) for d in dims)
        count = int(np.prod(shape)) if shape else 0
        name = bytes(name).decode("latin-1") if name is not None else ""
        return name, self._value(pos, cls, shape, count, is_complex, is_logical)

    def _value(self, pos: int, cls: int, shape: tuple, count: int, is_complex: bool, is_logical: bool) -> Any:
        if cls in MX_NUMERIC:
            real, pos = self.element(pos)
            arr = np.asarray(real).astype(MX_NUMERIC[cls], copy=False)
            if is_complex:
                imag, pos = self.element(pos)
                arr = arr + 1j * np.asarray(imag)
            arr = arr.reshape(shape, order="F")
            return arr.astype(bool) if is_logical else arr
        if cls == MX_CHAR:
            chars, pos = self.element(pos)
            codes = np.asarray(chars)
            if not count:
                return ""
            if len(shape) == 2 and shape[0] == 1:
                return "".join(map(chr, codes))
            rows = codes.reshape(shape, order="F").reshape(shape[0], -1)
            return ["".join(map(chr, row)) for row in rows]
        if cls == MX_CELL:
            items = []
            for _ in range(count):
                item, pos = self.element(pos)
                items.append(item)
            return items
        if cls in (MX_STRUCT, MX_OBJECT):
            if cls == MX_OBJECT:
                _classname, pos = self.element(pos)
            name_len, pos = self.element(pos)
            names_raw, pos = self.element(pos)
            width = int(name_len[0])
            raw = bytes(names_raw)
            fields = [raw[i:i + width].split(b"\0", 1)[0].decode("latin-1") for i in range(0, len(raw), width)]
            records = []
            for _ in range(count):
                record = {}
                for field in fields:
                    record[field], pos = self.element(pos)
                records.append(record)
            return records[0] if count == 1 else records
        if cls == MX_SPARSE:
            ir, pos = self.element(pos)
            jc, pos = self.element(pos)
            values, pos = self.element(pos)
            cols = np.repeat(np.arange(len(jc) - 1), np.diff(np.asarray(jc, dtype=np.int64)))
            rows = np.asarray(ir, dtype=np.int64)[: len(cols)]
            return {"shape": shape, "rows": rows, "cols": cols, "values": np.asarray(values)[: len(cols)]}
        raise MatFileError(f"unsupported MATLAB class {cls}")


def loadmat(data: bytes) -> dict[str, Any]:
    """Every top-level variable of a level-5 MAT-file, by name."""
    if len(data) < 128:
        raise MatFileError("not a MAT-file (shorter than its 128-byte header)")
    if data[:6] == b"\x89HDF\r\n" or data[512:516] == b"\x89HDF":
        raise MatFileError("MATLAB 7.3 (HDF5) MAT-files are not supported")
    indicator = data[126:128]
    if indicator == b"IM":
        endian = "<"
    elif indicator == b"MI":
        endian = ">"
    else:
        raise MatFileError("not a level-5 MAT-file (no endian indicator at byte 126)")
    reader = _Reader(data, endian)
    out: dict[str, Any] = {}
    pos = 128
    while pos + 8 <= len(data):
        try:
            value, pos, name = reader.variable(pos)
        except struct.error as exc:
            raise MatFileError(f"truncated or corrupt MAT-file ({exc})") from None
        if name:
            out[name] = value
    return out


def savemat(variables: dict[str, np.ndarray], compress: bool = True) -> bytes:
    """Write numeric matrices (and dicts of them, as 1x1 structs) as a level-5 MAT-file.

    Enough for tests and small fixtures; not a general writer.
    """
    text = b"MATLAB 5.0 MAT-file, written by ocr_cluster".ljust(116, b" ")
    header = text + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    body = b""
    for name, value in variables.items():
        element = _matrix_element(name, value)
        if compress:
            packed = zlib.compress(element)
            body += struct.pack("<II", MI_COMPRESSED, len(packed)) + packed
        else:
            body += element
    return header + body


_NP_TO_MX = {"f8": (6, 9), "f4": (7, 7), "i1": (8, 1), "u1": (9, 2), "i2": (10, 3), "u2": (11, 4), "i4": (12, 5),
             "u4": (13, 6), "i8": (14, 12), "u8": (15, 13)}


def _sub(mtype: int, payload: bytes) -> bytes:
    return struct.pack("<II", mtype, len(payload)) + payload + b"\0" * ((-len(payload)) % 8)


def _matrix_element(name: str, value: Any) -> bytes:
    if isinstance(value, dict):
        fields = list(value)
        width = max(len(f) for f in fields) + 1
        payload = _sub(6, struct.pack("<II", MX_STRUCT, 0)) + _sub(5, struct.pack("<ii", 1, 1)) + _sub(1, name.encode())
        payload += struct.pack("<HHi", 5, 4, width)  # small element: miINT32, 4 bytes
        payload += _sub(1, b"".join(f.encode().ljust(width, b"\0") for f in fields))
        for field in fields:
            payload += _matrix_element("", value[field])
        return struct.pack("<II", MI_MATRIX, len(payload)) + payload
    arr = np.asarray(value)
    if arr.ndim < 2:
        arr = arr.reshape(1, -1)
    mx, mi = _NP_TO_MX[arr.dtype.str[1:]]
    payload = _sub(6, struct.pack("<II", mx, 0)) + _sub(5, struct.pack(f"<{arr.ndim}i", *arr.shape))
    payload += _sub(1, name.encode()) + _sub(mi, arr.astype(arr.dtype.newbyteorder("<")).tobytes(order="F"))
    return struct.pack("<II", MI_MATRIX, len(payload)) + payload
