"""Reading and writing safetensors files with numpy only, one tensor at a time.

Reading fetches one tensor at a time, so a tensor costs memory only while it is used; writing streams tensors to disk
after a header built from shapes alone. Both support bfloat16 (through ml_dtypes), which the `safetensors`
package's numpy backend does not. Format: 8-byte little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file (truncated, corrupted, or of another format)."""


class SafetensorsReader:
    """Lazy view of a safetensors file: `keys()`, `shape(key)`, `get(key)` (a read-only memory-mapped array)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: not a safetensors file (only {len(head)} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise SafetensorsError(f"{self.path}: corrupted safetensors header (declares {header_len} bytes, "
                                       f"file has {size})")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{self.path}: corrupted safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = header
        data_len = size - self._data_start
        for key, entry in header.items():
            dtype, shape, (begin, end) = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets", (0, -1))
            if dtype not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {key!r} has unsupported dtype {dtype!r}")
            if end - begin != DTYPES[dtype].itemsize * int(np.prod(shape, dtype=np.int64)) or end > data_len:
                raise SafetensorsError(f"{self.path}: tensor {key!r} (shape {tuple(shape)}, {dtype}) lies outside "
                                       f"the file's {data_len} data bytes: truncated or corrupted")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        """Read one tensor into memory. (A plain read rather than a memory map: mapped file pages would stay
        resident and count towards the process's memory until the whole file is closed.)"""
        entry = self._entries[key]
        shape = tuple(entry["shape"])
        dtype = DTYPES[entry["dtype"]]
        count = int(np.prod(shape, dtype=np.int64))
        begin, _ = entry["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            return np.fromfile(f, dtype=dtype.newbyteorder("<"), count=count).astype(dtype, copy=False).reshape(shape)


def write_safetensors(
    path: str | os.PathLike,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    get_tensor: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors named in `specs` (name, shape, dtype), fetching each from `get_tensor(name)` only when it is
    written, so at most one tensor is materialised at a time. Written to `path + ".tmp"` then renamed."""
    header, offset = {}, 0
    specs = list(specs)
    for name, shape, dtype in specs:
        nbytes = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format pads the header to a multiple of 8 bytes
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, shape, dtype in specs:
            tensor = np.ascontiguousarray(get_tensor(name), dtype=dtype)
            if tensor.shape != tuple(shape):
                raise ValueError(f"tensor {name!r} has shape {tensor.shape}, declared {tuple(shape)}")
            f.write(tensor.astype(tensor.dtype.newbyteorder("<"), copy=False).tobytes())
    os.replace(tmp, path)
