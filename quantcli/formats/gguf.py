"""GGUF: a reader that validates the whole header before it trusts any of it, and the GGUF `Writer`.

The checks follow ggml's `gguf.cpp` (`gguf_init_from_file_impl`): magic, version, counts against the
bytes left, every string and array length against the bytes left, n_dims <= 4, known types, shape
products without overflow, rows divisible by the block size, power-of-two alignment, tensor offsets
aligned, contiguous in order and inside the file, no duplicate keys or tensor names. Only then is
the data memory-mapped, so a truncated file gives an error instead of SIGBUS.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from quantcli.errors import InputError, OutputError
from quantcli.formats.base import KV, ModelReader, StringArray, TensorInfo, pread_exact
from quantcli.formats.writer import TensorSpec, Writer

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
INT64_MAX = (1 << 63) - 1

# fixed-size scalar value types: (struct code, size)
_SCALARS: dict[int, tuple[str, int]] = {
    GGUFValueType.UINT8: ("B", 1), GGUFValueType.INT8: ("b", 1),
    GGUFValueType.UINT16: ("H", 2), GGUFValueType.INT16: ("h", 2),
    GGUFValueType.UINT32: ("I", 4), GGUFValueType.INT32: ("i", 4),
    GGUFValueType.FLOAT32: ("f", 4), GGUFValueType.BOOL: ("?", 1),
    GGUFValueType.UINT64: ("Q", 8), GGUFValueType.INT64: ("q", 8),
    GGUFValueType.FLOAT64: ("d", 8),
}
_NP_SCALARS = {t: np.dtype("<" + code) for t, (code, _) in _SCALARS.items() if code != "?"}
_NP_SCALARS[GGUFValueType.BOOL] = np.dtype("?")

# types ggml no longer accepts (Q4_2, Q4_3, Q4_0_4_4 ...): GGML_QUANT_SIZES lists only live ones
_KNOWN_TYPES = {int(t) for t in GGML_QUANT_SIZES}


def type_nbytes(qtype: GGMLQuantizationType, shape_ne: Iterable[int]) -> int:
    """Bytes of a tensor with GGUF-order shape `ne` (ne0 = row length)."""
    ne = list(shape_ne)
    block, size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in ne[1:]:
        n *= d
    return n * (ne[0] // block) * size if ne else size


class _Cursor:
    """Bounds-checked little-endian reads from the file's bytes."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path
        self.size = len(buf)

    def fail(self, what: str) -> InputError:
        return InputError(f"{self.path}: invalid GGUF: {what}")

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.left():
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos}, only {self.left()} left "
                            "(truncated or corrupt file)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, vtype: int, what: str) -> Any:
        code, size = _SCALARS[vtype]
        return struct.unpack("<" + code, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        if n > self.left():
            raise self.fail(f"{what} claims {n} bytes but only {self.left()} remain")
        return bytes(self.take(n, what)).decode("utf-8", errors="surrogateescape")


def _read_value(cur: _Cursor, vtype: int, key: str) -> KV:
    if vtype in _SCALARS:
        return KV(vtype, cur.scalar(vtype, f"value of '{key}'"))
    if vtype == GGUFValueType.STRING:
        return KV(vtype, cur.string(f"value of '{key}'"))
    if vtype != GGUFValueType.ARRAY:
        raise cur.fail(f"key '{key}' has unknown value type {vtype}")
    item = cur.u32(f"array type of '{key}'")
    count = cur.u64(f"array length of '{key}'")
    if item in _SCALARS:
        size = _SCALARS[item][1]
        if count > cur.left() // size:
            raise cur.fail(f"array '{key}' claims {count} items of {size} bytes, "
                           f"only {cur.left()} bytes remain")
        raw = cur.take(count * size, f"array '{key}'")
        arr = np.frombuffer(raw, dtype=_NP_SCALARS[item]).copy()
        return KV(vtype, arr, item)
    if item == GGUFValueType.STRING:
        if count > cur.left() // 8:  # each string has at least its 8-byte length
            raise cur.fail(f"array '{key}' claims {count} strings, only {cur.left()} bytes remain")
        start = cur.pos
        _skip_strings(cur, count, key)
        raw = bytes(cur.buf[start:cur.pos])
        return KV(vtype, StringArray(raw, count), item, raw=raw)
    raise cur.fail(f"array '{key}' has unsupported item type {item}")


_U64 = struct.Struct("<Q")


def _skip_strings(cur: _Cursor, count: int, key: str) -> None:
    """Check and step over `count` length-prefixed strings (the vocabulary: 262k entries for Gemma)
    without decoding them (`StringArray` does that when they are used): runs of short strings a
    window at a time (`_short_strings`), anything else one by one."""
    buf, pos, size = cur.buf, cur.pos, cur.size
    unpack = _U64.unpack_from
    left = count
    while left:
        if left >= _WINDOWED_MIN:
            n, pos = _short_strings(buf, pos, size, left)
            left -= n
            if n >= 64:
                continue
        for _ in range(min(left, 4096)):  # long strings, zeros inside strings, the tail, errors
            if pos + 8 > size:
                cur.pos = pos
                raise cur.fail(f"item of '{key}' runs past the end of the file (truncated or corrupt file)")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                cur.pos = pos
                raise cur.fail(f"item of '{key}' claims {n} bytes but only {size - pos} remain")
            pos += n
            left -= 1
    cur.pos = pos


_WINDOWED_MIN = 1024  # strings left before a windowed pass is worth its set-up


def _short_strings(buf: memoryview, pos: int, size: int, left: int) -> tuple[int, int]:
    """Step over the run of strings shorter than 256 bytes that starts at `pos`, looking at up to
    1 MB of the file at once: (strings stepped over, at most `left`; the position after them).

    A string's 8-byte length below 256 is a byte followed by seven zero bytes, so every position
    followed by seven zeros is a candidate start. Starting from `pos`, the run is the longest prefix
    of the candidates in which each string ends exactly where the next candidate begins: each of
    them is then a real start, by induction. A false candidate (seven zeros inside a string's bytes)
    only ends the run early; a string running past the end of the file is left out of it, for the
    one-by-one walk to report."""
    w = min(size - pos, 1 << 20, max(4096, 32 * left))
    if w < 8:
        return 0, pos
    a = np.frombuffer(buf, np.uint8, count=w, offset=pos)
    z = a == 0
    z2 = z[:-1] & z[1:]
    z4 = z2[:-2] & z2[2:]
    z7 = z4[:-3] & z4[3:]  # z7[i]: bytes i..i+6 are all zero
    starts = np.flatnonzero(z7[1:])  # lengths below 256 whose 8 bytes lie in the window
    if starts.size == 0 or starts[0] != 0:
        return 0, pos
    ends = starts + 8 + a[starts]
    linked = ends[:-1] == starts[1:]
    n = min(int(np.argmin(linked)) + 1 if not linked.all() else starts.size, left)
    if pos + int(ends[n - 1]) > size:
        n -= 1
    return n, pos + (int(ends[n - 1]) if n else 0)


class GGUFReader(ModelReader):
    format = "gguf"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._file: BinaryIO | None = None
        self._mmap: mmap.mmap | None = None
        try:
            self._file = open(self.path, "rb")
            size = os.fstat(self._file.fileno()).st_size
            if size == 0:
                raise InputError(f"{self.path}: empty file")
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse(memoryview(self._mmap), size)
        except BaseException:
            self.close()
            raise

    def _parse(self, buf: memoryview, file_size: int) -> None:
        cur = _Cursor(buf, self.path)
        magic = bytes(cur.take(4, "magic"))
        if magic != GGUF_MAGIC:
            raise cur.fail(f"bad magic {magic!r}, expected b'GGUF'")
        version = cur.u32("version")
        if version in (2, 3):
            pass
        elif version & 0xFFFF == 0 and version >> 16 in (2, 3):
            raise cur.fail("big-endian GGUF is not supported")
        else:
            raise cur.fail(f"unsupported version {version} (supported: 2, 3)")
        self.version = version
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # smallest possible entries: a KV is 8 (key len) + 4 (type) + 1; a tensor 8 + 4 + 8 + 4 + 8
        if n_kv > cur.left() // 13:
            raise cur.fail(f"metadata count {n_kv} cannot fit in the {cur.left()} bytes left "
                           "(truncated or corrupt file)")
        if n_tensors > cur.left() // 32:
            raise cur.fail(f"tensor count {n_tensors} cannot fit in the {cur.left()} bytes left "
                           "(truncated or corrupt file)")
        for _ in range(n_kv):
            key = cur.string("metadata key")
            vtype = cur.u32(f"type of '{key}'")
            if key in self.kv:
                raise cur.fail(f"duplicate metadata key '{key}'")
            self.kv[key] = _read_value(cur, vtype, key)
        alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.kv:
            kv = self.kv["general.alignment"]
            if kv.type != GGUFValueType.UINT32:
                raise cur.fail("general.alignment must be a uint32")
            alignment = kv.value
        if alignment == 0 or alignment & (alignment - 1):
            raise cur.fail(f"alignment {alignment} is not a power of two")
        self.alignment = alignment

        raw_infos = []
        names: set[str] = set()
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            if name in names:
                raise cur.fail(f"duplicate tensor name '{name}'")
            names.add(name)
            n_dims = cur.u32(f"n_dims of '{name}'")
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.fail(f"tensor '{name}' has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            ne = [cur.u64(f"shape of '{name}'") for _ in range(n_dims)]
            qtype_id = cur.u32(f"type of '{name}'")
            offset = cur.u64(f"offset of '{name}'")
            if qtype_id not in _KNOWN_TYPES:
                raise cur.fail(f"tensor '{name}' has unknown type {qtype_id}")
            qtype = GGMLQuantizationType(qtype_id)
            total = 1
            for d in ne:
                if d > INT64_MAX or (d and total > INT64_MAX // d):
                    raise cur.fail(f"tensor '{name}' shape {ne} overflows int64")
                total *= d
            block = GGML_QUANT_SIZES[qtype][0]
            if ne[0] % block:
                raise cur.fail(f"tensor '{name}' row length {ne[0]} is not a multiple of "
                               f"{qtype.name}'s block size {block}")
            raw_infos.append((name, ne, qtype, offset))

        data_start = -(-cur.pos // alignment) * alignment
        expected = 0
        for name, ne, qtype, offset in raw_infos:
            nbytes = type_nbytes(qtype, ne)
            if offset != expected:
                why = "is not aligned" if offset % alignment else "is not where the previous tensor ends"
                raise cur.fail(f"tensor '{name}' offset {offset} {why} (expected {expected})")
            if data_start + offset + nbytes > file_size:
                raise cur.fail(f"tensor '{name}' data ends at byte {data_start + offset + nbytes}, "
                               f"past the end of the file ({file_size} bytes): truncated")
            self.tensors[name] = TensorInfo(
                name=name, shape=tuple(int(d) for d in reversed(ne)), dtype=qtype.name,
                ggml_type=qtype, nbytes=nbytes, offset=data_start + offset,
            )
            expected += -(-nbytes // alignment) * alignment
        self.data_start = data_start

    def raw(self, name: str) -> np.ndarray:
        info = self.info(name)
        assert self._mmap is not None
        return np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def raw_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        info = self.info(name)
        assert self._file is not None
        return pread_exact(self._file.fileno(), info.offset + start * info.row_bytes,
                           (stop - start) * info.row_bytes, self.path, out)

    def release(self, name: str) -> None:
        info = self.info(name)
        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            page = mmap.PAGESIZE
            start = info.offset // page * page
            with contextlib.suppress(OSError, ValueError):
                self._mmap.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)

    def close(self) -> None:
        # views handed out keep the mapping alive; closing only drops our references
        self._mmap = None
        if self._file is not None:
            self._file.close()
            self._file = None


# -- writing -------------------------------------------------------------------------------------


def _pack_string(s: str) -> bytes:
    b = s.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(b)) + b


def _pack_value(kv: KV) -> bytes:
    if kv.type in _SCALARS:
        return struct.pack("<" + _SCALARS[kv.type][0], kv.value)
    if kv.type == GGUFValueType.STRING:
        return _pack_string(kv.value)
    if kv.type != GGUFValueType.ARRAY:
        raise ValueError(f"unknown GGUF value type {kv.type}")
    head = struct.pack("<IQ", kv.item_type, len(kv.value))
    if kv.raw is not None:  # unchanged since it was read: write its bytes back as they were
        return head + kv.raw
    if kv.item_type == GGUFValueType.STRING:
        return head + b"".join(_pack_string(s) for s in kv.value)
    return head + np.asarray(kv.value, dtype=_NP_SCALARS[kv.item_type]).tobytes()


def kv_of(value: Any) -> KV:
    """A KV for a plain python value (str, bool, int, float, list[str], numpy array)."""
    if isinstance(value, KV):
        return value
    if isinstance(value, bool):
        return KV(GGUFValueType.BOOL, value)
    if isinstance(value, int):
        return KV(GGUFValueType.UINT32 if 0 <= value < 2**32 else GGUFValueType.INT64, value)
    if isinstance(value, float):
        return KV(GGUFValueType.FLOAT32, value)
    if isinstance(value, str):
        return KV(GGUFValueType.STRING, value)
    if isinstance(value, np.ndarray):
        item = {np.dtype(v): k for k, v in _NP_SCALARS.items()}[value.dtype.newbyteorder("<")
                                                                  if value.dtype.itemsize > 1
                                                                  else value.dtype]
        return KV(GGUFValueType.ARRAY, value, item)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return KV(GGUFValueType.ARRAY, list(value), GGUFValueType.STRING)
        if all(isinstance(v, bool) for v in value):
            return KV(GGUFValueType.ARRAY, np.array(value, dtype="?"), GGUFValueType.BOOL)
        if all(isinstance(v, int) for v in value):
            return KV(GGUFValueType.ARRAY, np.array(value, dtype="<i4"), GGUFValueType.INT32)
        return KV(GGUFValueType.ARRAY, np.array(value, dtype="<f4"), GGUFValueType.FLOAT32)
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


def gguf_layout(metadata: dict[str, Any], tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType]],
                alignment: int = DEFAULT_ALIGNMENT) -> tuple[bytes, list[tuple[int, int]], int]:
    """A GGUF v3 file's header (padded to the alignment), each tensor's (offset from the data start,
    byte count), and the data section's size."""
    meta = {k: kv_of(v) for k, v in metadata.items()}
    if alignment != DEFAULT_ALIGNMENT:
        meta["general.alignment"] = KV(GGUFValueType.UINT32, alignment)
    else:
        meta.pop("general.alignment", None)
    parts = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(tensors), len(meta))]
    for key, kv in meta.items():
        parts += [_pack_string(key), struct.pack("<I", kv.type), _pack_value(kv)]
    layout = []
    offset = 0
    for name, shape, qtype in tensors:
        ne = [int(d) for d in reversed(shape)]
        nbytes = type_nbytes(qtype, ne)
        parts += [_pack_string(name), struct.pack("<I", len(ne)),
                  struct.pack(f"<{len(ne)}Q", *ne), struct.pack("<IQ", int(qtype), offset)]
        layout.append((offset, nbytes))
        offset += -(-nbytes // alignment) * alignment
    header = b"".join(parts)
    return header + b"\0" * (-len(header) % alignment), layout, offset


class GGUFFile(Writer, format="gguf"):
    """A GGUF v3 file through the `Writer` protocol: header, then each tensor at its aligned offset."""

    def layout(self, metadata: dict[str, Any], tensors: list[TensorSpec]) -> tuple[bytes, list[tuple[int, int]]]:
        header, layout, _ = gguf_layout(metadata, [(t.name, t.shape, _ggml_type(t, self.path)) for t in tensors],
                                        self.alignment)
        return header, layout

    def padded(self, nbytes: int) -> int:
        return -(-nbytes // self.alignment) * self.alignment


def _ggml_type(spec: TensorSpec, path: Path) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[spec.type]
    except KeyError:
        raise OutputError(f"{path}: tensor '{spec.name}' has dtype {spec.type}, which GGUF cannot store") from None
