r"""A small reader of GGUF files (llama.cpp's model format): metadata and dequantized tensors.

Why a reader of our own rather than the ``gguf`` package: the format is a short header of typed
key/value pairs and tensor descriptors followed by aligned tensor data, and the block formats
that small published models use dequantize in a few lines of torch. The ``gguf`` package is
numpy-based and would be a dependency of the model loader for ~150 lines of parsing; with this
reader ``load_pretrained("smollm2")`` needs torch and ``tokenizers`` only.

Layout (GGUF version 2 and 3, little-endian)::

    "GGUF" | version u32 | tensor count u64 | key/value count u64
    key/value pairs:  key (u64 length + utf-8) | value type u32 | value
    tensor infos:     name | n_dims u32 | dims u64 x n_dims (innermost first) | type u32 | offset u64
    padding to general.alignment (32 by default), then the tensor data, each at its offset

Block formats dequantized here (``ggml`` type ids; 32 values per block)::

    F32 (0), F16 (1), BF16 (30)        plain values
    Q4_0 (2)   f16 d, 16 bytes of nibbles          x = (q - 8) * d
    Q4_1 (3)   f16 d, f16 m, 16 bytes of nibbles   x = q * d + m
    Q8_0 (8)   f16 d, 32 int8                      x = q * d

Within a 4-bit block the low nibbles of the 16 bytes are values 0..15 and the high nibbles
values 16..31. A tensor of GGUF dims ``(ne0, ne1)`` is the torch shape ``(ne1, ne0)``.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["GGMLType", "GGUFError", "GGUFFile", "GGUFTensorInfo", "dequantize", "read_gguf"]

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
BLOCK = 32  # values per quantized block


class GGUFError(ValueError):
    """A file that is not GGUF, is truncated, or holds a format this reader does not handle."""


class GGMLType:
    """The ``ggml`` tensor type ids this reader dequantizes (see the module docstring)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8
    BF16 = 30

    NAMES: ClassVar[dict[int, str]] = {
        0: "F32",
        1: "F16",
        2: "Q4_0",
        3: "Q4_1",
        8: "Q8_0",
        30: "BF16",
    }


# Bytes per block of 32 values (plain types: bytes per value, block of 1).
_BLOCK_BYTES = {GGMLType.Q4_0: 18, GGMLType.Q4_1: 20, GGMLType.Q8_0: 34}
_PLAIN_BYTES = {GGMLType.F32: 4, GGMLType.F16: 2, GGMLType.BF16: 2}
_PLAIN_DTYPES = {
    GGMLType.F32: torch.float32,
    GGMLType.F16: torch.float16,
    GGMLType.BF16: torch.bfloat16,
}

# Metadata value types: id -> (struct format, size) for the fixed-size ones.
_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's descriptor: ``shape`` in torch order (outermost first), its ``ggml`` type
    and the byte offset of its data from the start of the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        if self.ggml_type in _PLAIN_BYTES:
            return self.numel * _PLAIN_BYTES[self.ggml_type]
        return self.numel // BLOCK * _BLOCK_BYTES[self.ggml_type]

    @property
    def type_name(self) -> str:
        return GGMLType.NAMES.get(self.ggml_type, f"ggml type {self.ggml_type}")


class _Cursor:
    """Sequential little-endian reads from a buffer, with errors that say where the file ended."""

    def __init__(self, data: mmap.mmap | bytes, file: Path) -> None:
        self.data, self.pos, self.file = data, 0, file

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise GGUFError(f"{self.file}: truncated (needs byte {end}, has {len(self.data)})")
        chunk = self.data[self.pos : end]
        self.pos = end
        return bytes(chunk)

    def scalar(self, kind: int) -> Any:
        fmt, size = _SCALARS[kind]
        return struct.unpack(fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.scalar(10)
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(kind)
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.scalar(4), self.scalar(10)
            if item_kind in _SCALARS:  # one unpack for the whole array (vocabularies are long)
                fmt, size = _SCALARS[item_kind]
                raw = self.take(size * count)
                return list(struct.unpack(f"<{count}{fmt[1]}", raw))
            return [self.value(item_kind) for _ in range(count)]
        raise GGUFError(f"{self.file}: unknown metadata value type {kind} at byte {self.pos}")


class GGUFFile:
    """An open GGUF file: :attr:`metadata`, :attr:`tensors` (descriptors) and
    :meth:`tensor` (one tensor, dequantized). The file is memory-mapped, so only the tensors
    asked for are read.

    Attributes:
        path: the file.
        version: the GGUF version (2 or 3).
        metadata: every key/value pair (``general.architecture``, ``llama.block_count``,
            ``tokenizer.ggml.tokens``, ...); arrays are lists.
        tensors: the descriptors by name, in file order.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as error:
            raise GGUFError(f"{self.path}: cannot be opened ({error})") from None
        cursor = _Cursor(self._map, self.path)
        if cursor.take(4) != MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (no 'GGUF' magic at the start)")
        self.version = cursor.scalar(4)
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} (this reader reads 2 and 3)")
        n_tensors, n_kv = cursor.scalar(10), cursor.scalar(10)
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cursor.string()
            self.metadata[key] = cursor.value(cursor.scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = cursor.string()
            dims = [cursor.scalar(10) for _ in range(cursor.scalar(4))]
            ggml_type, offset = cursor.scalar(4), cursor.scalar(10)
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-cursor.pos // alignment) * alignment
        self.tensors = {
            name: GGUFTensorInfo(name, shape, kind, start + offset)
            for name, shape, kind, offset in infos
        }

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The tensor ``name``, dequantized to ``dtype``, in torch shape order.

        Raises:
            KeyError: no tensor of that name; GGUFError: a format not handled, or a truncated file.
        """
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        info = self.tensors[name]
        if info.ggml_type not in _PLAIN_BYTES and info.ggml_type not in _BLOCK_BYTES:
            raise GGUFError(
                f"{self.path}: tensor {name!r} is {info.type_name}; this reader dequantizes "
                f"{', '.join(GGMLType.NAMES.values())}"
            )
        if info.ggml_type in _BLOCK_BYTES and info.numel % BLOCK:
            raise GGUFError(
                f"{self.path}: tensor {name!r} of {info.numel} values is not whole blocks of {BLOCK}"
            )
        end = info.offset + info.nbytes
        if end > len(self._map):
            raise GGUFError(f"{self.path}: truncated in tensor {name!r} (needs byte {end})")
        raw = torch.frombuffer(bytearray(self._map[info.offset : end]), dtype=torch.uint8)
        return dequantize(raw, info.ggml_type, info.shape).to(dtype)

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open a GGUF file (see :class:`GGUFFile`)."""
    return GGUFFile(path)


# --- dequantization -------------------------------------------------------------------------


def _scales(blocks: Tensor, start: int) -> Tensor:
    """The f16 at bytes ``start, start + 1`` of every block, as float32 ``(nb, 1)``."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """``(nb, 16)`` bytes -> ``(nb, 32)`` values 0..15: low nibbles first, then high nibbles."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1).float()


def _q4_0(blocks: Tensor) -> Tensor:
    return (_nibbles(blocks[:, 2:]) - 8.0) * _scales(blocks, 0)


def _q4_1(blocks: Tensor) -> Tensor:
    return _nibbles(blocks[:, 4:]) * _scales(blocks, 0) + _scales(blocks, 2)


def _q8_0(blocks: Tensor) -> Tensor:
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _scales(blocks, 0)


_DEQUANT: dict[int, Callable[[Tensor], Tensor]] = {
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q8_0: _q8_0,
}


def dequantize(raw: Tensor, ggml_type: int, shape: tuple[int, ...]) -> Tensor:
    """Values of ``shape`` from the uint8 bytes ``raw`` of one tensor of ``ggml_type``.

    Returns float32 for the block formats, the stored dtype for F32/F16/BF16.

    Raises:
        GGUFError: an unknown type, or a byte count that does not match the shape.
    """
    numel = 1
    for s in shape:
        numel *= s
    if ggml_type in _PLAIN_DTYPES:
        expected = numel * _PLAIN_BYTES[ggml_type]
    elif ggml_type in _DEQUANT:
        expected = numel // BLOCK * _BLOCK_BYTES[ggml_type]
    else:
        raise GGUFError(f"cannot dequantize ggml type {ggml_type}")
    if raw.dtype != torch.uint8 or raw.numel() != expected:
        raise GGUFError(
            f"{GGMLType.NAMES.get(ggml_type, ggml_type)} tensor of shape {shape} needs "
            f"{expected} bytes; got {raw.numel()} ({raw.dtype})"
        )
    if ggml_type in _PLAIN_DTYPES:
        return raw.view(_PLAIN_DTYPES[ggml_type]).reshape(shape)
    blocks = raw.reshape(-1, _BLOCK_BYTES[ggml_type])  # (numel / 32, bytes per block)
    return _DEQUANT[ggml_type](blocks).reshape(shape)
