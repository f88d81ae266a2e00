"""Codecs for every GGML type, byte-identical to ggml's reference quantizers.

    quantize(x, "Q4_K", importance=None) -> (rows, row_bytes) uint8
    dequantize(data, "Q4_K", shape) -> float32 of `shape`
    quantize_with_error(x, "Q4_K", importance=None) -> (bytes, QuantError)
    measure(x, "Q4_K", importance=None) -> QuantError   # the error alone, memory bounded
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from quantcli.codecs.base import (
    FP16_MAX,
    Codec,
    check_finite_rows,
    get_codec,
    named_types,
    registered_types,
    resolve_type,
)
from quantcli.codecs.error import QuantError, error_of
from quantcli.errors import NumericError, UsageError

__all__ = ["Codec", "QuantError", "quantize", "quantize_with_error", "measure", "dequantize",
           "get_codec", "load_kernels", "named_types", "registered_types", "resolve_type"]


def quantize(
    x: np.ndarray,
    ggml_type: "str | int | GGMLQuantizationType",
    importance: np.ndarray | None = None,
) -> np.ndarray:
    """Quantize float rows exactly as ggml's `ggml_quantize_chunk` does.

    Args:
        x: float32 `(rows, cols)` (a 1-D array is one row).
        ggml_type: a type name (`"Q4_K"`), id or `GGMLQuantizationType`.
        importance: float32 `(cols,)` per-column weights (an imatrix row), or None.
    Returns:
        uint8 `(rows, row_bytes)`.
    """
    codec, x, importance, amax = _checked(x, ggml_type, importance)
    if amax is None:
        return np.zeros((x.shape[0], codec.row_bytes(x.shape[1])), dtype=np.uint8)
    return _encode(codec, x, importance, amax)


def quantize_with_error(
    x: np.ndarray,
    ggml_type: "str | int | GGMLQuantizationType",
    importance: np.ndarray | None = None,
) -> tuple[np.ndarray, QuantError]:
    """`quantize`, and the error those bytes make on `x` (weighted by `importance` when given)."""
    codec, x, importance, amax = _checked(x, ggml_type, importance)
    if amax is None:
        return quantize(x, codec.ggml_type), _no_values(codec, x)
    data = _encode(codec, x, importance, amax)
    return data, error_of(codec, x, importance, data)


def measure(
    x: np.ndarray,
    ggml_type: "str | int | GGMLQuantizationType",
    importance: np.ndarray | None = None,
) -> QuantError:
    """The error `quantize(x, ggml_type, importance)` makes, without keeping the bytes: rows are
    quantized and decoded a chunk at a time."""
    codec, x, importance, amax = _checked(x, ggml_type, importance)
    if amax is None:
        return _no_values(codec, x)
    return error_of(codec, x, importance,
                    encode=lambda r0, r1: _encode(codec, x[r0:r1], importance, amax[r0:r1], r0))


def _no_values(codec: type[Codec], x: np.ndarray) -> QuantError:
    return QuantError.from_rows(codec.ggml_type, x.shape[1], np.zeros((x.shape[0], 5)))


def _checked(x, ggml_type, importance):
    """Validate `quantize`'s arguments -> (codec, x as C-contiguous float32 (rows, cols),
    importance as float32 (cols,) or None, each row's absmax, or None when there are no values)."""
    codec = get_codec(ggml_type)
    name = codec.ggml_type.name
    x = np.asarray(x)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise UsageError(f"quantize takes (rows, cols) input, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    if cols % codec.block_size and not codec.partial_blocks:
        raise UsageError(
            f"{name} needs rows divisible by its block size {codec.block_size}; "
            f"row length is {cols}",
            hint="pick a type with a smaller block (e.g. Q8_0, Q5_0, IQ4_NL) for this tensor",
        )
    if rows == 0 or cols == 0:
        return codec, x, importance, None
    from quantcli.codecs._ggml_math import row_absmax  # numba: loaded with the codec families

    amax = row_absmax(x.view(np.int32))  # one pass; NaN/Inf make a row's maximum non-finite
    if not np.isfinite(amax).all():
        check_finite_rows(x)
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if importance.shape[0] != cols:
            raise UsageError(
                f"importance has {importance.shape[0]} values, rows have {cols} columns"
            )
        check_finite_rows(importance, "importance")
    elif codec.requires_importance:
        raise UsageError(
            f"{name} cannot be quantized without importance weights (ggml refuses it)",
            hint="pass an importance matrix with --imatrix (make one with `quantcli imatrix`)",
        )
    return codec, x, importance, amax


def _encode(codec: type[Codec], x: np.ndarray, importance: np.ndarray | None, amax: np.ndarray,
            row0: int = 0) -> np.ndarray:
    """Quantize checked rows `x` (rows row0.. of the caller's input, for error messages)."""
    out = codec.quantize_rows(x, importance)
    _check_no_overflow(codec, x, amax, out, row0)
    return out


def _check_no_overflow(codec: type[Codec], x: np.ndarray, amax: np.ndarray, out: np.ndarray,
                       row0: int = 0) -> None:
    """A block whose fp16 scale overflowed decodes to Inf/NaN: refuse it rather than write it."""
    suspect = np.nonzero(amax > 1e4)[0]  # below this no type's fp16 scale can overflow
    if suspect.size == 0:
        return
    back = codec.dequantize_rows(out[suspect], x.shape[1])
    bad = ~np.isfinite(back).all(axis=1)
    if bad.any():
        row = int(suspect[np.argmax(bad)])
        raise NumericError(
            f"row {row0 + row} has values up to {amax[row]:.4g}: {codec.ggml_type.name}'s fp16 block "
            f"scale would overflow (max {FP16_MAX:g})",
            hint="keep this tensor in F32 or BF16 (e.g. --tensor-type NAME=F32)",
        )


def dequantize(
    data: np.ndarray,
    ggml_type: "str | int | GGMLQuantizationType",
    shape: tuple[int, ...],
) -> np.ndarray:
    """Inverse of `quantize`: raw bytes of a tensor of `shape` (numpy order, last axis = row) -> float32."""
    codec = get_codec(ggml_type)
    shape = tuple(int(s) for s in shape)
    cols = shape[-1] if shape else 1
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if cols % codec.block_size and not codec.partial_blocks:
        raise UsageError(
            f"{codec.ggml_type.name} rows must be multiples of {codec.block_size}; got {cols}"
        )
    rows = n // cols if cols else 0
    raw = np.ascontiguousarray(np.asarray(data).reshape(-1).view(np.uint8))
    expect = rows * codec.row_bytes(cols)
    if raw.size != expect:
        raise UsageError(
            f"{codec.ggml_type.name} data of shape {shape} needs {expect} bytes, got {raw.size}"
        )
    if rows == 0:
        return np.zeros(shape, dtype=np.float32)
    return codec.dequantize_rows(raw.reshape(rows, -1), cols).reshape(shape)


def load_kernels(decode: "set | list" = (), encode: "set | list" = (), weighted: bool = False) -> None:
    """Run the decoders of `decode` and the encoders of `encode` (with importance weights when
    `weighted`) once on one block of zeros, so numba loads their compiled code now. Pipelines call
    this before they create output: a Ctrl-C that lands while numba loads code runs inside its
    ctypes callbacks, where Python reports the KeyboardInterrupt and drops it."""
    for t in decode:
        codec = get_codec(t)
        dequantize(np.zeros(codec.type_size, np.uint8), codec.ggml_type, (codec.block_size,))
    for t in encode:
        codec = get_codec(t)
        if not codec.can_quantize:
            continue
        n = codec.block_size
        imp = np.ones(n, np.float32) if weighted or codec.requires_importance else None
        quantize(np.zeros((1, n), np.float32), codec.ggml_type, imp)
