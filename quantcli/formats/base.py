"""What every reader returns: tensor descriptions and a lazy, memory-mapped way to load them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from quantcli.errors import InputError


@dataclass(frozen=True)
class KV:
    """One metadata value with its GGUF type (arrays carry the element type too)."""

    type: int  # gguf.GGUFValueType
    value: Any  # str | int | float | bool | list[str] | np.ndarray | list
    item_type: int | None = None  # for arrays
    raw: bytes | None = field(default=None, repr=False, compare=False)  # a string array's bytes as read


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as stored: numpy-order shape (last axis = one row), storage type, where its bytes are."""

    name: str
    shape: tuple[int, ...]  # numpy order: (..., rows, cols); GGUF's ne is this reversed
    dtype: str  # GGML type name ("Q4_K", "F32", "BF16") or a safetensors-only dtype ("U8", "BOOL")
    ggml_type: GGMLQuantizationType | None  # None for dtypes GGML has no type for
    nbytes: int
    offset: int  # absolute byte offset in its file

    @property
    def n_params(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def gguf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (the tensor seen as (rows, row length))."""
        cols = self.shape[-1] if self.shape else 1
        return self.nbytes // max(self.n_params // max(cols, 1), 1)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.n_params if self.n_params else 0.0


def pread_exact(fd: int, offset: int, nbytes: int, path: Path) -> np.ndarray:
    """`nbytes` at `offset` into a fresh buffer with pread: cheaper than faulting in mapped pages
    one by one, leaves no pages resident, and a file that shrank gives an error instead of SIGBUS."""
    out = np.empty(nbytes, dtype=np.uint8)
    view, pos = memoryview(out), offset
    while view:
        n = os.preadv(fd, [view], pos)
        if n <= 0:
            raise InputError(f"{path}: file is cut short at byte {pos} (changed while reading?)")
        view, pos = view[n:], pos + n
    return out


class ModelReader:
    """Base of the readers. Lists tensors without loading data; loads one tensor at a time."""

    format: str = ""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.kv: dict[str, KV] = {}
        self.tensors: dict[str, TensorInfo] = {}

    # -- per format ----------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes as a read-only uint8 view (memory-mapped)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # -- shared --------------------------------------------------------------------------------
    def __enter__(self) -> "ModelReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError(f"{self.path}: no tensor named '{name}'") from None

    def meta(self, key: str, default: Any = None) -> Any:
        kv = self.kv.get(key)
        return default if kv is None else kv.value

    @property
    def architecture(self) -> str | None:
        return self.meta("general.architecture")

    def load_f32(self, name: str, copy: bool = True) -> np.ndarray:
        """Decode one tensor to float32 in its numpy-order shape. With copy=False an F32 tensor is
        returned as a read-only view of the memory map (no copy; callers must not write to it)."""
        from quantcli.formats.dtypes import decode_to_f32

        info = self.info(name)
        if not copy and info.dtype == "F32":
            return self.raw(name).view("<f4").reshape(info.shape)
        return decode_to_f32(self.raw(name), info, self.path)

    def raw_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Stored bytes of rows [start, stop) (the tensor seen as (rows, row length))."""
        row_bytes = self.info(name).row_bytes
        return self.raw(name)[start * row_bytes:stop * row_bytes]

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """float32 rows [start, stop) of the tensor seen as (rows, row length); F32 without a copy."""
        from dataclasses import replace

        from quantcli.formats.dtypes import decode_to_f32

        info = self.info(name)
        cols = info.shape[-1] if info.shape else 1
        raw = self.raw_rows(name, start, stop)
        if info.dtype == "F32":
            return raw.view("<f4").reshape(stop - start, cols)
        part = replace(info, shape=(stop - start, cols), nbytes=raw.size)
        return decode_to_f32(raw, part, self.path)

    def release(self, name: str) -> None:
        """Let the OS drop the tensor's mapped pages from this process (after reading it)."""

    def summary(self) -> dict[str, Any]:
        """Architecture, layer count, context and vocabulary size, where the file says them."""
        arch = self.architecture
        tokens = self.meta("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else self.meta(f"{arch}.vocab_size")
        return {
            "architecture": arch,
            "name": self.meta("general.name"),
            "layers": self.meta(f"{arch}.block_count"),
            "context_length": self.meta(f"{arch}.context_length"),
            "embedding_length": self.meta(f"{arch}.embedding_length"),
            "vocab_size": vocab,
            "file_type": self.meta("general.file_type"),
        }
