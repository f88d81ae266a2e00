"""The output side of the format registry: plan a file's layout, write tensors' bytes, publish it.

    with create_writer("gguf", out, metadata, [TensorSpec(name, shape, "Q4_K"), ...]) as w:
        w.write(name, data)                          # a whole tensor, in any order
        w.write_rows(name, start, rows_bytes)        # or rows [start, ...) of it, from any thread
        w.finish(final_metadata)                     # header (same length), fsync, atomic rename

Every format lays its file out up front (`layout`: the header and each tensor's offset and size),
so tensors are written at fixed offsets with `pwrite` — in any order, by several threads, and into
a partial file that a re-run can continue (`partial=`). Until `finish` nothing appears under the
output's name; after an error the temporary file is removed (a `partial` one is kept for the
resume). `formats/atomic.py` does the fsyncs and the rename. A new format is one subclass:

    class MyFormat(Writer, format="myformat"):
        def layout(self, metadata, tensors) -> tuple[bytes, list[tuple[int, int]]]: ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from quantcli.errors import OutputError, UsageError
from quantcli.formats.atomic import create_temp, describe, publish, remove_temp, start_writeback
from quantcli.registry import register

_WRITERS: dict[str, type["Writer"]] = {}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as it will be stored: numpy-order shape, and a GGML type name (or, for
    safetensors, one of its integer dtypes, copied as they are)."""

    name: str
    shape: tuple[int, ...]
    type: str


@dataclass(frozen=True)
class Slot:
    """Where a tensor's bytes go: `nbytes` at absolute `offset`, then `pad` zero bytes."""

    spec: TensorSpec
    offset: int
    nbytes: int
    pad: int

    @property
    def rows(self) -> int:
        cols = self.spec.shape[-1] if self.spec.shape else 1
        n = int(np.prod(self.spec.shape, dtype=np.int64)) if self.spec.shape else 1
        return n // max(cols, 1)

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(self.rows, 1)


class Writer:
    """Base of the output formats (see the module's docstring)."""

    format: ClassVar[str]

    def __init_subclass__(cls, format: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if format is None:
            return
        register(_WRITERS, format, cls, "output format")
        cls.format = format

    def __init__(self, path: Path, metadata: dict[str, Any], tensors: list[TensorSpec], *,
                 partial: Path | None = None, alignment: int = 32, durable: bool = True) -> None:
        self.path = Path(path)
        self.alignment = alignment
        self.durable = durable
        self.tensors = list(tensors)
        self.header, layout = self.layout(metadata, self.tensors)
        self.slots: dict[str, Slot] = {}
        end = len(self.header)
        for spec, (offset, nbytes) in zip(self.tensors, layout):
            if spec.name in self.slots:
                raise UsageError(f"{self.path}: tensor '{spec.name}' is listed twice")
            pad = self.padded(nbytes) - nbytes
            self.slots[spec.name] = Slot(spec, len(self.header) + offset, nbytes, pad)
            end = max(end, len(self.header) + offset + nbytes + pad)
        self.size = end
        self._partial = Path(partial) if partial is not None else None
        if self._partial is not None:
            self.file = self._partial
            self.fd = self._io(lambda: os.open(self._partial, os.O_RDWR | os.O_CREAT, 0o666))
        else:
            self.fd, tmp = create_temp(self.path)
            self.file = Path(tmp)
        try:
            self._io(lambda: os.ftruncate(self.fd, self.size))
        except BaseException:  # an error or Ctrl-C before the caller holds the writer: nobody else can
            self.abort()
            raise

    # -- per format --------------------------------------------------------------------------------
    def layout(self, metadata: dict[str, Any], tensors: list[TensorSpec]) -> tuple[bytes, list[tuple[int, int]]]:
        """The header and, per tensor, (offset after the header, byte count)."""
        raise NotImplementedError

    def padded(self, nbytes: int) -> int:
        """Bytes a tensor of `nbytes` occupies, with the padding that follows it."""
        return nbytes

    # -- writing -----------------------------------------------------------------------------------
    def slot(self, name: str) -> Slot:
        try:
            return self.slots[name]
        except KeyError:
            raise OutputError(f"{self.path}: tensor '{name}' is not in the output's layout") from None

    def write(self, name: str, data: np.ndarray) -> tuple[np.ndarray, ...]:
        """A whole tensor's bytes (and its padding)."""
        raw = _bytes_of(data)
        slot = self.slot(name)
        if raw.size != slot.nbytes:
            raise OutputError(f"{self.path}: tensor '{name}' has {raw.size} bytes, its type needs {slot.nbytes}")
        return self.write_at(slot.offset, raw, slot.pad)

    def write_rows(self, name: str, start: int, data: np.ndarray) -> tuple[np.ndarray, ...]:
        """Rows [start, start + n) of a tensor (seen as rows of `row_bytes`); the tensor's last rows
        also write its padding. Returns the bytes written, in file order (for hashing)."""
        raw = _bytes_of(data)
        slot = self.slot(name)
        offset = slot.offset + start * slot.row_bytes
        end = offset + raw.size
        if start < 0 or raw.size % max(slot.row_bytes, 1) or end > slot.offset + slot.nbytes:
            raise OutputError(f"{self.path}: tensor '{name}': {raw.size} bytes at row {start} do not "
                              f"fit its {slot.rows} rows of {slot.row_bytes} bytes")
        return self.write_at(offset, raw, slot.pad if end == slot.offset + slot.nbytes else 0)

    def write_at(self, offset: int, raw: np.ndarray, pad: int = 0) -> tuple[np.ndarray, ...]:
        written: tuple[np.ndarray, ...] = (raw,)
        pwrite_all(self.fd, raw, offset)
        if pad:
            written = (raw, np.zeros(pad, np.uint8))
            pwrite_all(self.fd, written[1], offset + raw.size)
        if self.durable:
            start_writeback(self.fd, offset, raw.size + pad)  # so the final fsync has little left to do
        return written

    def read(self, offset: int, nbytes: int) -> bytes:
        """Bytes already in the file (a resumed run checks its earlier work with this)."""
        return os.pread(self.fd, nbytes, offset)

    def finish(self, metadata: dict[str, Any] | None = None) -> Path:
        """Write the header (from `metadata` when given: it must lay out exactly as the first),
        fsync, and publish the file under the output's name."""
        header = self.header
        if metadata is not None:
            header, _ = self.layout(metadata, self.tensors)
            if len(header) != len(self.header):
                raise OutputError(f"{self.path}: internal error: the header's length changed "
                                  f"({len(self.header)} -> {len(header)} bytes)")
        fd, self.fd = self.fd, -1
        try:
            pwrite_all(fd, header, 0)
            if self.durable:
                os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            self._fail(exc)
        os.close(fd)
        publish(self.file, self.path, self.durable)
        return self.path

    def abort(self) -> None:
        """Close; remove the temporary file (a `partial` one stays for the resume)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._partial is None:
            remove_temp(str(self.file))

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if kind is not None or self.fd >= 0:
            self.abort()
        if isinstance(exc, OSError):  # a write of ours failed: disk full, quota, I/O error
            self._fail(exc)

    # -- errors ------------------------------------------------------------------------------------
    def _io(self, call: Any) -> Any:
        try:
            return call()
        except OSError as exc:
            if getattr(self, "fd", -1) >= 0:
                self.abort()
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        hint = None
        if self._partial is not None and describe(exc) in ("disk full", "disk quota exceeded"):
            hint = "free space and run the same command again: finished layers are kept"
        raise OutputError(f"{self.path}: write failed: {describe(exc)}", hint) from None


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _bytes_of(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def writer_formats() -> list[str]:
    _load()
    return sorted(_WRITERS)


def create_writer(fmt: str, path: Path, metadata: dict[str, Any], tensors: list[TensorSpec],
                  **options: Any) -> Writer:
    """A writer for `fmt` ('gguf', 'safetensors'); see `Writer` for the options."""
    _load()
    try:
        cls = _WRITERS[fmt]
    except KeyError:
        raise UsageError(f"unknown output format '{fmt}'; use {' or '.join(sorted(_WRITERS))}") from None
    return cls(path, metadata, tensors, **options)


def _load() -> None:
    import quantcli.formats.gguf  # noqa: F401  (registers "gguf")
    import quantcli.formats.safetensors  # noqa: F401  (registers "safetensors")
