"""A small GGUF parser: metadata and tensor table read with `struct`, tensor bytes memory-mapped.

gguf's own `GGUFReader` builds a numpy view for every vocabulary entry and takes seconds on a 49k-token
vocabulary; this reads the same file in a fraction of that. Tensors are handed to `gguf.quants.dequantize`
as the uint8 rows it expects.

File layout (little-endian): magic "GGUF", version u32, tensor_count u64, kv_count u64, then kv_count
(key, type, value) entries, then tensor_count (name, n_dims, dims[n_dims] u64, ggml_type u32, offset u64)
entries, then the tensor data, aligned to `general.alignment` (default 32).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF metadata value types -> struct format of the fixed-size ones
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_TYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    pass


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # PyTorch order (slowest dimension first)
    ggml_type: int
    data: np.ndarray  # uint8 rows: [*shape[:-1], bytes per row], memory-mapped

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.ggml_type).name

    def dequantize(self, rows_per_chunk: int = 2048) -> np.ndarray:
        """float32 array of `shape`, dequantized a few rows at a time: gguf's numpy dequantizers build
        temporaries several times the tensor's size, which would dominate peak memory on the embedding."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        qtype = GGMLQuantizationType(self.ggml_type)
        rows = self.data.reshape(-1, self.data.shape[-1])
        out = np.empty((rows.shape[0], self.shape[-1]), dtype=np.float32)
        for start in range(0, rows.shape[0], rows_per_chunk):
            out[start : start + rows_per_chunk] = dequantize(rows[start : start + rows_per_chunk], qtype)
        return out.reshape(self.shape)


class GGUFFile:
    def __init__(self, path: Path) -> None:
        self._blob = np.memmap(path, dtype=np.uint8, mode="r")
        self._buf = memoryview(self._blob)
        self._pos = 0
        if bytes(self._take(4)) != b"GGUF":
            raise GGUFFormatError("not a GGUF file (bad magic)")
        version = self._scalar(4)
        if version not in (2, 3):
            raise GGUFFormatError(f"unsupported GGUF version {version}")
        tensor_count, kv_count = self._scalar(10), self._scalar(10)
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string()
            self.metadata[key] = self._value(self._scalar(4))
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            dims = [self._scalar(10) for _ in range(self._scalar(4))]
            infos.append((name, tuple(reversed(dims)), self._scalar(4), self._scalar(10)))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = [self._tensor(data_start, *info) for info in infos]

    def _take(self, n: int) -> memoryview:
        if self._pos + n > len(self._buf):
            raise GGUFFormatError("file ends in the middle of its header (truncated)")
        view = self._buf[self._pos : self._pos + n]
        self._pos += n
        return view

    def _scalar(self, value_type: int) -> Any:
        fmt = _SCALAR_FORMATS[value_type]
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        return bytes(self._take(self._scalar(10))).decode("utf-8", errors="replace")

    def _value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self._string()
        if value_type == _ARRAY:
            item_type, count = self._scalar(4), self._scalar(10)
            if item_type == _STRING:
                return [self._string() for _ in range(count)]
            if item_type in _NUMPY_TYPES:
                dtype = np.dtype(_NUMPY_TYPES[item_type])
                return np.frombuffer(self._take(count * dtype.itemsize), dtype=dtype).tolist()
            return [self._value(item_type) for _ in range(count)]
        if value_type not in _SCALAR_FORMATS:
            raise GGUFFormatError(f"unknown metadata value type {value_type}")
        return self._scalar(value_type)

    def _tensor(self, data_start: int, name: str, shape: tuple[int, ...], ggml_type: int, offset: int) -> GGUFTensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"tensor {name} has unknown ggml type {ggml_type}") from None
        row_bytes = shape[-1] // block_size * type_size
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        start = data_start + offset
        end = start + rows * row_bytes
        if end > len(self._blob):
            raise GGUFFormatError(f"tensor {name} extends past the end of the file (truncated)")
        data = self._blob[start:end].reshape(*shape[:-1], row_bytes)
        return GGUFTensor(name, shape, ggml_type, data)
