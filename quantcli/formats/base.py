"""What every reader returns: tensor descriptions and a lazy, memory-mapped way to load them."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from quantcli.errors import InputError, UsageError


class StringArray(Sequence):
    """A GGUF string array kept as the bytes it was read from (8-byte length, UTF-8 bytes, ...) and
    decoded on first use: copying metadata (what quantize does with a 262k-token vocabulary) then
    never builds the strings. Compares equal to a list or tuple of the same strings."""

    __slots__ = ("raw", "_n", "_items")

    def __init__(self, raw: bytes, count: int) -> None:
        self.raw, self._n = raw, count
        self._items: list[str] | None = None

    def _decoded(self) -> list[str]:
        if self._items is None:
            raw, pos, items = self.raw, 0, []
            unpack, append = struct.Struct("<Q").unpack_from, items.append
            for _ in range(self._n):
                (n,) = unpack(raw, pos)
                append(str(raw[pos + 8:pos + 8 + n], "utf-8", "surrogateescape"))
                pos += 8 + n
            self._items = items
        return self._items

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: Any) -> Any:
        return self._decoded()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringArray):
            return self.raw == other.raw
        if isinstance(other, (list, tuple)):
            return self._decoded() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"StringArray({self._n} strings)"


@dataclass(frozen=True)
class KV:
    """One metadata value with its GGUF type (arrays carry the element type too)."""

    type: int  # gguf.GGUFValueType
    value: Any  # str | int | float | bool | StringArray | list[str] | np.ndarray | list
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


def pread_exact(fd: int, offset: int, nbytes: int, path: Path, out: np.ndarray | None = None) -> np.ndarray:
    """`nbytes` at `offset` with pread: cheaper than faulting in mapped pages one by one, leaves no
    pages resident, and a file that shrank gives an error instead of SIGBUS. Into the front of `out`
    (a uint8 buffer that is reused across calls: a fresh buffer costs a page fault per 4 KB) or
    into a fresh buffer."""
    out = scratch_view(out, nbytes)
    view, pos = memoryview(out), offset
    while view:
        n = os.preadv(fd, [view], pos)
        if n <= 0:
            raise InputError(f"{path}: file is cut short at byte {pos} (changed while reading?)")
        view, pos = view[n:], pos + n
    return out


def scratch_view(out: np.ndarray | None, nbytes: int) -> np.ndarray:
    """The first `nbytes` of a reusable uint8 buffer, or a fresh buffer when it is absent or small."""
    if out is None or out.size < nbytes:
        return np.empty(nbytes, dtype=np.uint8)
    return out[:nbytes]


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

    def raw_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Stored bytes of rows [start, stop) (the tensor seen as (rows, row length)). Readers that
        copy put them into `out` when it is large enough (see `scratch_view`), so the result is valid
        only until `out` is reused."""
        row_bytes = self.info(name).row_bytes
        return self.raw(name)[start * row_bytes:stop * row_bytes]

    def load_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """float32 rows [start, stop) of the tensor seen as (rows, row length); F32 without a
        conversion (read into `out` where the reader copies, as `raw_rows`)."""
        from dataclasses import replace

        from quantcli.formats.dtypes import decode_to_f32

        info = self.info(name)
        cols = info.shape[-1] if info.shape else 1
        raw = self.raw_rows(name, start, stop, out)
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


def parse_override_kv(spec: str) -> tuple[str, KV]:
    """llama.cpp's KEY=TYPE:VALUE with TYPE int, float, bool or str."""
    key, sep, rest = spec.partition("=")
    kind, sep2, value = rest.partition(":")
    if not sep or not sep2 or not key:
        raise UsageError(f"--override-kv '{spec}' is not KEY=TYPE:VALUE", hint="e.g. general.name=str:my-model")
    try:
        if kind == "int":
            return key, KV(GGUFValueType.INT64, int(value))
        if kind == "float":
            return key, KV(GGUFValueType.FLOAT64, float(value))
        if kind == "bool":
            if value not in ("true", "false"):
                raise ValueError(value)
            return key, KV(GGUFValueType.BOOL, value == "true")
        if kind == "str":
            return key, KV(GGUFValueType.STRING, value)
    except ValueError:
        raise UsageError(f"--override-kv '{spec}': '{value}' is not a valid {kind}") from None
    raise UsageError(f"--override-kv '{spec}': unknown type '{kind}'", hint="use int, float, bool or str")
