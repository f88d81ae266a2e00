"""ggml itself, through ctypes, as an oracle for the codecs (optional: tests skip without it).

Looks for libggml-base in $QUANTCLI_GGML_LIB (a file or a folder), then in the `llama_cpp`
package (llama-cpp-python bundles it under llama_cpp/lib).
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


def _candidates() -> list[Path]:
    found: list[Path] = []
    env = os.environ.get("QUANTCLI_GGML_LIB")
    if env:
        p = Path(env)
        found += [p] if p.is_file() else sorted(p.glob("libggml-base.so*"))
    try:
        import importlib.util

        spec = importlib.util.find_spec("llama_cpp")
        if spec and spec.origin:
            found += sorted((Path(spec.origin).parent / "lib").glob("libggml-base.so*"))
    except (ImportError, ValueError):
        pass
    return found


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    for path in _candidates():
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ]
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        return lib
    return None


def quantize(x: np.ndarray, qtype: GGMLQuantizationType, importance: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk(type, x, dst, 0, rows, cols, importance) -> (rows, row_bytes) uint8."""
    lib = load()
    assert lib is not None, "libggml-base not found"
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, cols // block * size), dtype=np.uint8)
    imp = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        imp = importance.ctypes.data
    lib.ggml_quantize_init(int(qtype))
    lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols, imp)
    return out


def block_mismatches(qtype: str, x: np.ndarray, importance: np.ndarray | None = None) -> str:
    """'' when quantcli's bytes equal ggml's for every block, else how many blocks differ."""
    from quantcli import codecs

    ref = quantize(x, codecs.resolve_type(qtype), importance)
    out = codecs.quantize(x, qtype, importance)
    size = codecs.get_codec(qtype).type_size
    differ = (out.reshape(-1, size) != ref.reshape(-1, size)).any(axis=1)
    return "" if not differ.any() else f"{differ.sum()} of {differ.size} blocks differ (first {np.argmax(differ)})"
