"""Codecs whose ggml reference quantizer the `gguf` package already reproduces bit for bit.

`gguf.quants` matches `quantize_row_*_ref` for these; ggml's importance-weighted variants of the legacy
types (`quantize_q4_0` with `quant_weights`, ...) are a different algorithm and live in `legacy.py`.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq

from quantcli.codecs.base import Codec


class GgufBacked(Codec):
    """Quantize (without importance) and dequantize through `gguf.quants`."""

    @classmethod
    def quantize_rows(cls, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        with np.errstate(all="ignore"):  # overflowing scales are caught by the caller, loudly
            return np.ascontiguousarray(gq.quantize(x, cls.ggml_type)).view(np.uint8)

    @classmethod
    def dequantize_rows(cls, data: np.ndarray, cols: int) -> np.ndarray:
        with np.errstate(all="ignore"):
            return gq.dequantize(data, cls.ggml_type).astype(np.float32, copy=False)


class DequantizeOnly(GgufBacked):
    """A type quantcli reads (gguf decodes it) but does not write."""

    can_quantize = False

    @classmethod
    def quantize_rows(cls, x, importance):
        from quantcli.codecs.base import quantizable_names
        from quantcli.errors import UsageError

        raise UsageError(f"quantizing to {cls.ggml_type.name} is not supported; "
                         f"supported: {quantizable_names()}")


def register_readers() -> None:
    """Give every type the `gguf` package can decode a codec, so any GGUF tensor can be read."""
    from quantcli.codecs.base import _REGISTRY

    for qtype in gq._type_traits:  # the types gguf.quants implements
        if qtype not in _REGISTRY:
            type(qtype.name, (DequantizeOnly,), {}, ggml_type=qtype)


class F32(Codec, ggml_type=Q.F32):
    @classmethod
    def quantize_rows(cls, x, importance):
        return np.ascontiguousarray(x, dtype="<f4").view(np.uint8)

    @classmethod
    def dequantize_rows(cls, data, cols):
        return np.ascontiguousarray(data).view("<f4").astype(np.float32, copy=False)


class F16(Codec, ggml_type=Q.F16):
    # as ggml_fp32_to_fp16_row: round to nearest even; finite values above 65504 become Inf,
    # which the caller's overflow check turns into an error
    @classmethod
    def quantize_rows(cls, x, importance):
        with np.errstate(over="ignore"):
            return x.astype("<f2").view(np.uint8)

    @classmethod
    def dequantize_rows(cls, data, cols):
        return np.ascontiguousarray(data).view("<f2").astype(np.float32)


class BF16(GgufBacked, ggml_type=Q.BF16):
    pass


class Q8_0(GgufBacked, ggml_type=Q.Q8_0):
    pass  # ggml's quantize_q8_0 ignores quant_weights


class TQ1_0(GgufBacked, ggml_type=Q.TQ1_0):
    pass  # quantize_tq1_0 ignores quant_weights


class TQ2_0(GgufBacked, ggml_type=Q.TQ2_0):
    pass


class MXFP4(GgufBacked, ggml_type=Q.MXFP4):
    pass  # quantize_mxfp4 ignores quant_weights
