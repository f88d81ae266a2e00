"""safetensors files and Hugging Face model directories (single or sharded), validated before use.

File layout: u64 little-endian header length N, N bytes of JSON, then the data. The header must be a
JSON object of `name -> {dtype, shape, data_offsets: [begin, end]}` (plus an optional string map
`__metadata__`); offsets are relative to the data, contiguous from 0 in order and cover the data
exactly (no gaps, no overlap, no trailing bytes), and each span equals shape x dtype size.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from quantcli.errors import InputError, OutputError
from quantcli.formats.base import KV, ModelReader, TensorInfo, pread_exact
from quantcli.formats.dtypes import SAFETENSORS_DTYPES
from quantcli.formats.writer import TensorSpec, Writer

MAX_HEADER = 100_000_000  # the safetensors library's own cap
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_GGML_OF = {name: GGMLQuantizationType[name] for name in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")}


class _SafetensorsFile:
    """One validated .safetensors file: its tensors and a read-only memory map of it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc.strerror}") from None
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise InputError(f"{path}: empty file")
            if size < 8:
                raise InputError(f"{path}: invalid safetensors: {size} bytes is too short for a header")
            n = int.from_bytes(fh.read(8), "little")
            if n > MAX_HEADER:
                raise InputError(f"{path}: invalid safetensors: header length {n} exceeds the "
                                 f"{MAX_HEADER}-byte cap")
            if 8 + n > size:
                raise InputError(f"{path}: invalid safetensors: header length {n} runs past the end "
                                 f"of the file ({size} bytes): truncated")
            header_bytes = fh.read(n)
            self._parse(header_bytes, data_start=8 + n, file_size=size)
            self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def fail(self, what: str) -> InputError:
        return InputError(f"{self.path}: invalid safetensors: {what}")

    def _parse(self, raw: bytes, data_start: int, file_size: int) -> None:
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self.fail(f"header is not valid JSON ({exc.__class__.__name__}: {exc})") from None
        if not isinstance(header, dict):
            raise self.fail("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self.fail("__metadata__ must map strings to strings")
        self.metadata = meta
        entries = []
        for name, spec in header.items():
            if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
                raise self.fail(f"tensor '{name}' entry must have exactly dtype, shape, data_offsets")
            dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
            if dtype not in SAFETENSORS_DTYPES:
                raise self.fail(f"tensor '{name}' has unknown dtype {dtype!r} "
                                f"(known: {', '.join(SAFETENSORS_DTYPES)})")
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                      and d >= 0 for d in shape):
                raise self.fail(f"tensor '{name}' shape {shape!r} is not a list of non-negative ints")
            if (not isinstance(offsets, list) or len(offsets) != 2
                    or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                    or offsets[0] > offsets[1]):
                raise self.fail(f"tensor '{name}' data_offsets {offsets!r} are not [begin, end]")
            n = 1
            for d in shape:
                n *= d
            nbytes = n * SAFETENSORS_DTYPES[dtype][1]
            if offsets[1] - offsets[0] != nbytes:
                raise self.fail(f"tensor '{name}' spans {offsets[1] - offsets[0]} bytes but shape "
                                f"{shape} of {dtype} needs {nbytes}")
            entries.append((offsets[0], offsets[1], name, dtype, tuple(shape), nbytes))
        entries.sort()
        pos = 0
        for begin, end, name, _dtype, _shape, _nbytes in entries:
            if begin != pos:
                why = "overlaps the previous tensor" if begin < pos else "leaves a gap before it"
                raise self.fail(f"tensor '{name}' at offset {begin} {why} (expected {pos})")
            pos = end
        data_len = file_size - data_start
        if pos > data_len:
            raise self.fail(f"tensors need {pos} bytes of data, the file holds {data_len}: truncated")
        if pos < data_len:
            raise self.fail(f"{data_len - pos} trailing bytes after the last tensor")
        order = {name: i for i, name in enumerate(header)}  # keep the header's order
        for begin, _end, name, dtype, shape, nbytes in sorted(entries, key=lambda e: order[e[2]]):
            self.tensors[name] = TensorInfo(name=name, shape=shape, dtype=dtype,
                                            ggml_type=_GGML_OF.get(dtype), nbytes=nbytes,
                                            offset=data_start + begin)

    def raw(self, info: TensorInfo) -> np.ndarray:
        if info.nbytes == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def read(self, offset: int, nbytes: int, out: np.ndarray | None = None) -> np.ndarray:
        with open(self.path, "rb", buffering=0) as fh:
            return pread_exact(fh.fileno(), offset, nbytes, self.path, out)


def _config_kv(config: dict[str, Any]) -> dict[str, KV]:
    """config.json flattened to `hf.<key>` metadata (scalars and string lists only)."""
    out: dict[str, KV] = {}
    for key, value in config.items():
        if isinstance(value, bool):
            out[f"hf.{key}"] = KV(GGUFValueType.BOOL, value)
        elif isinstance(value, int):
            out[f"hf.{key}"] = KV(GGUFValueType.INT64, value)
        elif isinstance(value, float):
            out[f"hf.{key}"] = KV(GGUFValueType.FLOAT64, value)
        elif isinstance(value, str):
            out[f"hf.{key}"] = KV(GGUFValueType.STRING, value)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            out[f"hf.{key}"] = KV(GGUFValueType.ARRAY, value, GGUFValueType.STRING)
    return out


class SafetensorsReader(ModelReader):
    """A .safetensors file, or a Hugging Face directory (model.safetensors or a sharded index)."""

    format = "safetensors"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.config: dict[str, Any] = {}
        self._files: dict[str, _SafetensorsFile] = {}
        self._owner: dict[str, _SafetensorsFile] = {}
        if self.path.is_dir():
            self._open_directory()
        else:
            self._add_file(self.path)
        self.kv.update(_config_kv(self.config))

    def _open_directory(self) -> None:
        d = self.path
        config_path = d / "config.json"
        if config_path.is_file():
            self.config = _read_json(config_path, "config.json")
            if not isinstance(self.config, dict):
                raise InputError(f"{config_path}: config.json is not a JSON object")
        index = d / INDEX_NAME
        if index.is_file():
            data = _read_json(index, "index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputError(f"{index}: no 'weight_map' object mapping tensors to files")
            for shard in dict.fromkeys(weight_map.values()):
                if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
                    raise InputError(f"{index}: shard name {shard!r} is not a file in the directory")
                self._add_file(d / shard)
            missing = [n for n in weight_map if n not in self._owner]
            if missing:
                raise InputError(f"{index}: tensor '{missing[0]}' is listed but not in "
                                 f"{weight_map[missing[0]]}")
            wrong = [n for n, f in weight_map.items() if self._owner[n].path.name != f]
            if wrong:
                raise InputError(f"{index}: tensor '{wrong[0]}' is in "
                                 f"{self._owner[wrong[0]].path.name}, not {weight_map[wrong[0]]}")
        elif (d / SINGLE_NAME).is_file():
            self._add_file(d / SINGLE_NAME)
        else:
            raise InputError(f"{d}: no {SINGLE_NAME} or {INDEX_NAME} in this directory")

    def _add_file(self, path: Path) -> None:
        f = _SafetensorsFile(path)
        self._files[path.name] = f
        for name, info in f.tensors.items():
            if name in self._owner:
                raise InputError(f"{path}: tensor '{name}' also appears in "
                                 f"{self._owner[name].path.name}")
            self._owner[name] = f
            self.tensors[name] = info

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures")
        if isinstance(archs, list) and archs:
            return str(archs[0])
        return self.config.get("model_type")

    def summary(self) -> dict[str, Any]:
        c = self.config
        return {
            "architecture": self.architecture,
            "name": c.get("_name_or_path") or self.path.name,
            "layers": c.get("num_hidden_layers", c.get("n_layer")),
            "context_length": c.get("max_position_embeddings", c.get("n_positions")),
            "embedding_length": c.get("hidden_size", c.get("n_embd")),
            "vocab_size": c.get("vocab_size"),
            "file_type": None,
        }

    def raw(self, name: str) -> np.ndarray:
        info = self.info(name)
        return self._owner[name].raw(info)

    def raw_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        info = self.info(name)
        return self._owner[name].read(info.offset + start * info.row_bytes, (stop - start) * info.row_bytes,
                                      out)

    def close(self) -> None:
        for f in self._files.values():
            f._mmap = None


def _read_json(path: Path, what: str) -> Any:
    from quantcli.inputs import read_small_json

    return read_small_json(path, what)


class SafetensorsFile(Writer, format="safetensors"):
    """A .safetensors file through the `Writer` protocol: u64 header length, the JSON header (padded
    with spaces to 8 bytes, as the safetensors library pads it), then the tensors back to back.
    Metadata values are stored as strings (`__metadata__`)."""

    def layout(self, metadata: dict[str, Any], tensors: list[TensorSpec]) -> tuple[bytes, list[tuple[int, int]]]:
        header: dict[str, Any] = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
        layout, offset = [], 0
        for t in tensors:
            if t.type not in SAFETENSORS_DTYPES:
                raise OutputError(f"{self.path}: tensor '{t.name}' has type {t.type}, which safetensors "
                                  "cannot store (use gguf, or dequantize to F32/F16/BF16)")
            n = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
            nbytes = n * SAFETENSORS_DTYPES[t.type][1]
            header[t.name] = {"dtype": t.type, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
            layout.append((offset, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw, layout
