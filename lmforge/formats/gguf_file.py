"""GGUF files' headers, read without torch: `GGUFFile`, metadata and memory-mapped tensors, for the
readers in gguf.py, or only the leading metadata keys for what `lmforge models` shows of a file."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The GGUF architectures we read and write: `general.architecture`, as llama.cpp names them.
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "phi3", "gpt2")

VALUE_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray  # float32/float16 values, or rows of raw block bytes for quantised types


class GGUFFile:
    """A GGUF file's metadata and tensors (memory-mapped).

    Our own parser of the header: the `gguf` package's reader builds a numpy view per
    vocabulary entry and takes ~5 s on a 49k-token vocabulary; this takes ~0.1 s.
    """

    def __init__(self, path: Path, stop_after: set[str] | None = None):
        """`stop_after`: read the metadata only as far as the last of these keys, and no tensors. What
        `lmforge models` shows (`general.architecture`, `general.file_type`) comes before the vocabulary in
        llama.cpp's and Ollama's files, and the vocabulary is most of the time (0.3 s for 49k tokens)."""
        self.path = path
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        self._raw = raw
        self._buffer = memoryview(raw)
        self._offset = 0
        if bytes(self._buffer[:4]) != b"GGUF":
            raise ValueError("bad magic bytes (not a GGUF file)")
        self._offset = 4
        version, tensor_count, field_count = self._read("<I"), self._read("<Q"), self._read("<Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        self.fields = {}
        for _ in range(field_count):
            if stop_after is not None and stop_after <= self.fields.keys():
                break
            key = self._read_string()
            self.fields[key] = self._read_value(self._read("<I"))
        self.tensors = []
        if stop_after is not None:
            return
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        infos = []
        for _ in range(tensor_count):
            name = self._read_string()
            dims = tuple(self._read("<Q") for _ in range(self._read("<I")))
            infos.append((name, dims, GGMLQuantizationType(self._read("<I")), self._read("<Q")))
        alignment = int(self.fields.get("general.alignment", 32))
        data_start = -(-self._offset // alignment) * alignment
        for name, dims, tensor_type, offset in infos:
            block, block_bytes = GGML_QUANT_SIZES[tensor_type]
            elements = int(np.prod(dims))
            start = data_start + offset
            size = elements // block * block_bytes
            if start + size > len(raw):
                raise ValueError(f"tensor {name} ends past the end of the file")
            if tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                dtype = np.float32 if tensor_type == GGMLQuantizationType.F32 else np.float16
                data = raw[start : start + size].view(dtype).reshape(tuple(reversed(dims)))
            else:
                data = raw[start : start + size].reshape(*reversed(dims[1:]), dims[0] // block * block_bytes)
            self.tensors.append(GGUFTensor(name, dims, tensor_type, data))

    def release(self, tensor: GGUFTensor) -> None:
        """Drop a tensor's pages from this process's resident memory once it has been copied out; the
        file still backs them, so reading the tensor again stays correct. Loading then peaks at about
        the model's size instead of the model plus the whole file."""
        mapping = getattr(self._raw, "_mmap", None)
        if mapping is None or not hasattr(mmap, "MADV_DONTNEED") or tensor.data.nbytes == 0:
            return
        start = tensor.data.ctypes.data - self._raw.ctypes.data
        begin = start // mmap.PAGESIZE * mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, begin, start + tensor.data.nbytes - begin)

    def _read(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self._buffer, self._offset)
        self._offset += struct.calcsize(fmt)
        return value

    def _read_string(self) -> str:
        length = self._read("<Q")
        text = bytes(self._buffer[self._offset : self._offset + length]).decode("utf-8", errors="replace")
        self._offset += length
        return text

    def _read_value(self, value_type: int):
        if value_type == STRING:
            return self._read_string()
        if value_type == ARRAY:
            item_type, count = self._read("<I"), self._read("<Q")
            if item_type in VALUE_FORMATS:
                fmt = VALUE_FORMATS[item_type]
                values = list(struct.unpack_from(f"<{count}{fmt[1]}", self._buffer, self._offset))
                self._offset += count * struct.calcsize(fmt)
                return values
            return [self._read_value(item_type) for _ in range(count)]
        if value_type not in VALUE_FORMATS:
            raise ValueError(f"unknown metadata value type {value_type}")
        return self._read(VALUE_FORMATS[value_type])
