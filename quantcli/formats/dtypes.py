"""Decoding stored tensor bytes to float32, for every GGML type and every safetensors dtype."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quantcli.errors import InputError

# safetensors dtype -> (numpy dtype or None for custom decoding, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str | None, int]] = {
    "F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": (None, 2),
    "I64": ("<i8", 8), "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1),
    "U64": ("<u8", 8), "U32": ("<u4", 4), "U16": ("<u2", 2), "U8": ("u1", 1),
    "BOOL": ("?", 1), "F8_E4M3": (None, 1), "F8_E5M2": (None, 1),
}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the 16 bits up."""
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _f8_table(exp_bits: int, man_bits: int, bias: int, fn: bool) -> np.ndarray:
    """All 256 values of an 8-bit float (OCP FP8: E4M3 'fn' has no Inf, NaN at S.1111.111)."""
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    e = (codes >> man_bits) & ((1 << exp_bits) - 1)
    m = codes & ((1 << man_bits) - 1)
    normal = (1 + m / (1 << man_bits)) * np.exp2(e - bias)
    sub = (m / (1 << man_bits)) * np.exp2(1 - bias)
    val = sign * np.where(e == 0, sub, normal)
    emax = (1 << exp_bits) - 1
    if fn:
        val[(e == emax) & (m == (1 << man_bits) - 1)] = np.nan
    else:
        val[(e == emax) & (m == 0)] = sign[(e == emax) & (m == 0)] * np.inf
        val[(e == emax) & (m != 0)] = np.nan
    return val.astype(np.float32)


_F8 = {"F8_E4M3": _f8_table(4, 3, 7, fn=True), "F8_E5M2": _f8_table(5, 2, 15, fn=False)}


def decode_to_f32(raw: np.ndarray, info, path: Path) -> np.ndarray:
    """raw uint8 bytes of `info` -> float32 of info.shape."""
    shape = info.shape
    if info.dtype not in SAFETENSORS_DTYPES:  # a block-quantized GGML type
        from quantcli import codecs

        try:
            return codecs.dequantize(raw, info.ggml_type, shape)
        except Exception as exc:  # a codec error here means the file lies about its tensor
            raise InputError(f"{path}: cannot decode tensor '{info.name}': {exc}") from None
    if info.dtype == "BF16":
        return bf16_to_f32(raw).reshape(shape)
    if info.dtype in _F8:
        return _F8[info.dtype][raw].reshape(shape)
    np_dtype, _ = SAFETENSORS_DTYPES[info.dtype]
    return raw.view(np_dtype).astype(np.float32).reshape(shape)
