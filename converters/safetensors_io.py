"""Minimal streaming safetensors reader/writer on numpy memmaps (bf16 via ml_dtypes).

Reading maps the file and hands out one tensor at a time, so loading a model never holds two
copies of it on the host; writing streams tensors into place after a header computed up front.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from unsloth_jax.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """Lazy access to one .safetensors file: `.keys()`, `.shape(name)`, `.get(name)` (a memmap view)."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise ValueError(f"header length {header_len} exceeds file size {size}")
                header = json.loads(f.read(header_len))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: safetensors file is missing; re-download or re-save the checkpoint.") from None
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({e}); the file is corrupt or "
                                  f"truncated: re-download or re-save the checkpoint.") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + header_len
        self._size = size
        for name, e in header.items():
            end = e["data_offsets"][1]
            if self._data_start + end > size:
                raise CheckpointError(f"{path}: tensor {name!r} ends at byte {self._data_start + end} but the file "
                                      f"has {size} bytes; the file is truncated: re-download it.")
        self._mm = None

    def keys(self):
        return list(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def shape(self, name) -> tuple:
        return tuple(self._entries[name]["shape"])

    def get(self, name) -> np.ndarray:
        e = self._entries[name]
        dtype = DTYPES.get(e["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}.")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = e["data_offsets"]
        raw = self._mm[self._data_start + start: self._data_start + end]
        return raw.view(dtype).reshape(e["shape"])


def write_safetensors(path: str, tensors: Iterable[tuple[str, tuple, np.dtype]],
                      produce: Callable[[str], np.ndarray], metadata: dict | None = None) -> None:
    """Write tensors given as (name, shape, dtype) specs; `produce(name)` returns each array when its
    turn comes, so only one tensor is materialised at a time. Written to path.tmp then renamed."""
    specs = list(tensors)
    header, offset = {}, 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align tensor data to 8 bytes
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            arr = np.ascontiguousarray(produce(name), dtype=dtype)
            if tuple(arr.shape) != tuple(shape):
                raise ValueError(f"{name}: produced shape {arr.shape}, declared {shape}")
            f.write(arr.tobytes())
    os.replace(tmp, path)
