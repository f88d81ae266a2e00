"""Types whose ggml quantizer ignores importance: F32, F16, BF16, Q8_0, TQ1_0, TQ2_0, MXFP4.

Quantizing ports `quantize_row_*_ref` (ggml-quants.c) and the float row converters (ggml.c) to
numba, byte-exact including C's conversions of out-of-range floats to integers. Decoding goes
through `gguf.quants` (`GgufBacked`), except for the types with a compiled decoder in `_dequant`
(Q8_0 here, the legacy and K-quant types), bit-identical to it. `register_readers` gives the
types quantcli reads but does not write a decode-only codec.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq
from numba import njit

from quantcli.codecs._dequant import dequant_q8_0
from quantcli.codecs._ggml_math import F0, F1, JIT, f32_from_bits, fp32_to_fp16, put_fp16, readonly
from quantcli.codecs.base import Codec, rows_into, rows_out


class GgufBacked(Codec):
    """Quantize (without importance) and dequantize through `gguf.quants`, or decode with
    `dequant_kernel` where a subclass sets one."""

    # a `_dequant` kernel: (blocks (n_blocks, type_size) uint8, y (n_blocks * block_size,) float32)
    dequant_kernel = None

    @classmethod
    def quantize_rows(cls, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        with np.errstate(all="ignore"):  # overflowing scales are caught by the caller, loudly
            return np.ascontiguousarray(gq.quantize(x, cls.ggml_type)).view(np.uint8)

    @classmethod
    def dequantize_rows(
        cls, data: np.ndarray, cols: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        if cls.dequant_kernel is not None:
            out = rows_out(out, data.shape[0], cols)
            blocks = np.ascontiguousarray(data).view(np.uint8).reshape(-1, cls.type_size)
            cls.dequant_kernel(readonly(blocks), out.reshape(-1))
            return out
        with np.errstate(all="ignore"):
            y = gq.dequantize(data, cls.ggml_type).astype(np.float32, copy=False)
        return rows_into(out, y, data.shape[0], cols)


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


_I32_LIM = np.float32(2.0**31)
_HALF = np.float32(0.5)


@njit(**JIT)
def _round_int(v):
    """(int32_t)roundf(v) as gcc compiles it on x86 (cvttss2si: 0x80000000 for NaN and |v| >= 2^31),
    as a value whose low byte is C's (int8_t) cast. `lroundf(v) + 1` has that low byte plus 1 too:
    a float beyond 2^31 is a multiple of 256. Branch-free, so that callers vectorize."""
    ok = abs(v) < _I32_LIM
    w = v if ok else F0
    i = np.int32(w)  # truncation
    f = w - np.float32(i)  # exact
    i = i + np.int32(f >= _HALF) - np.int32(f <= -_HALF)
    return i if ok else np.int32(-(2**31))


@njit(**JIT)
def _absmax(xf, o, n):
    # float amax = 0.0f; amax = MAX(amax, fabsf(v)) over x[o:o+n]
    amax = F0
    for j in range(n):
        a = abs(xf[o + j])
        amax = amax if amax > a else a
    return amax


@njit(**JIT)
def _q8_0_ref(xf, out):
    """quantize_row_q8_0_ref: d = amax / 127, qs[j] = roundf(x[j] / d). out: (n_blocks, 34)."""
    for b in range(out.shape[0]):
        o = b * 32
        d = _absmax(xf, o, 32) / np.float32(127.0)
        idv = F1 / d if d != F0 else F0
        put_fp16(out, b, 0, d)
        for j in range(32):
            out[b, 2 + j] = _round_int(xf[o + j] * idv)  # the low byte


@njit(**JIT)
def _tq1_0_ref(xf, out):
    """quantize_row_tq1_0_ref: d = amax; 5 trits per byte in qs[48] (32 bytes from 160 values,
    16 from 80), 4 in qh[4] (16 values); each byte is ceil(q * 256 / 243) of q = sum of trits
    t = lroundf(x * id) + 1, first most significant, in uint8 arithmetic. out: (n_blocks, 54)."""
    t = np.empty(256, np.int32)
    for b in range(out.shape[0]):
        o = b * 256
        d = _absmax(xf, o, 256)
        idv = F1 / d if d != F0 else F0
        for j in range(256):
            t[j] = _round_int(xf[o + j] * idv) + np.int32(1)
        for m in range(32):
            q = (t[m] * 81 + t[m + 32] * 27 + t[m + 64] * 9 + t[m + 96] * 3 + t[m + 128]) & 0xFF
            out[b, m] = (q * 256 + 242) // 243
        for m in range(16):
            q = (t[m + 160] * 81 + t[m + 176] * 27 + t[m + 192] * 9 + t[m + 208] * 3
                 + t[m + 224]) & 0xFF
            out[b, 32 + m] = (q * 256 + 242) // 243
        for m in range(4):
            q = (t[m + 240] * 81 + t[m + 244] * 27 + t[m + 248] * 9 + t[m + 252] * 3) & 0xFF
            out[b, 48 + m] = (q * 256 + 242) // 243
        put_fp16(out, b, 52, d)


@njit(**JIT)
def _tq2_0_ref(xf, out):
    """quantize_row_tq2_0_ref: d = amax; qs[j + m] |= ((lroundf(x * id) + 1) & 3) << 2n for
    x = block[4*j + 32*n + m]. out: (n_blocks, 66)."""
    for b in range(out.shape[0]):
        o = b * 256
        d = _absmax(xf, o, 256)
        idv = F1 / d if d != F0 else F0
        for j in range(0, 64, 32):
            base = o + 4 * j
            for m in range(32):
                q = 0
                for n in range(4):
                    q += ((_round_int(xf[base + m + n * 32] * idv) + 1) & 3) << (2 * n)
                out[b, j + m] = q
        put_fp16(out, b, 64, d)


_FP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12], np.float32)  # kvalues_mxfp4[0:8]; [8:16]: negated


@njit(**JIT)
def _mxfp4_index(x, e):
    """best_index_mxfp4(x, e): the first i minimizing fabsf(kvalues_mxfp4[i]*e - x). The errors of
    the negative half for x < 0 are those of the positive half for -x (and index 8, value 0, ties
    index 0 and comes after it), so one half of the table is searched."""
    a = abs(x)
    best = a
    bi = 0
    for i in range(1, 8):
        err = abs(_FP4[i] * e - a)
        if err < best:
            best = err
            bi = i
    return bi + 8 if x < F0 and bi != 0 else bi


@njit(**JIT)
def _mxfp4_ref(xf, out):
    """quantize_row_mxfp4_ref: e = (uint8_t)(floorf(log2f(amax)) - 2 + 127) (0 if amax is 0),
    d = GGML_E8M0_TO_FP32_HALF(e), qs[j] = index(x[j]) | index(x[j + 16]) << 4.
    out: (n_blocks, 17)."""
    for b in range(out.shape[0]):
        o = b * 32
        amax = F0
        for j in range(32):
            a = abs(xf[o + j])
            amax = a if amax < a else amax
        e = 0
        if amax > F0:  # log2f is libm's, as ggml's; (uint8_t) keeps the low byte (subnormals)
            e = (math.floor(math.log2(amax)) - 2 + 127) & 0xFF
        d = f32_from_bits(0x00200000 << e if e < 2 else (e - 1) << 23)
        out[b, 0] = e
        for j in range(16):
            out[b, 1 + j] = _mxfp4_index(xf[o + j], d) | (_mxfp4_index(xf[o + 16 + j], d) << 4)


_U1, _U16, _U64 = np.uint32(1), np.uint32(16), np.uint32(64)
_ABS_BITS, _INF_BITS, _ROUND = np.uint32(0x7FFFFFFF), np.uint32(0x7F800000), np.uint32(0x7FFF)


@njit(**JIT)
def _bf16_row(xi, out):
    """ggml_fp32_to_bf16_row_ref on float32 bits: NaN -> quiet NaN, else round to nearest even."""
    for i in range(xi.size):
        u = np.uint32(xi[i])
        h = u >> _U16
        if (u & _ABS_BITS) > _INF_BITS:  # NaN: force to quiet
            out[i] = h | _U64
        else:
            out[i] = (u + (_ROUND + (h & _U1))) >> _U16


@njit(**JIT)
def _f16_row(xf, out):
    """ggml_fp32_to_fp16_row: GGML_FP32_TO_FP16 on each value."""
    for i in range(xf.size):
        out[i] = fp32_to_fp16(xf[i])


class F32(Codec, ggml_type=Q.F32):
    @classmethod
    def quantize_rows(cls, x, importance):
        return np.ascontiguousarray(x, dtype="<f4").view(np.uint8)

    @classmethod
    def dequantize_rows(cls, data, cols, out=None):
        y = np.ascontiguousarray(data).view("<f4").astype(np.float32, copy=False)
        return rows_into(out, y, data.shape[0], cols)


class F16(Codec, ggml_type=Q.F16):
    # round to nearest even; finite values above 65504 become Inf, which the caller's overflow
    # check turns into an error
    @classmethod
    def quantize_rows(cls, x, importance):
        out = np.empty(x.shape, np.uint16)
        _f16_row(readonly(x.reshape(-1)), out.reshape(-1))
        return out.view(np.uint8)

    @classmethod
    def dequantize_rows(cls, data, cols, out=None):
        out = rows_out(out, data.shape[0], cols)
        out[...] = np.ascontiguousarray(data).view("<f2")  # exact: every fp16 is a float32
        return out


class _RefBlocks(GgufBacked):
    """A block type quantized by a `_*_ref` kernel: (xf (n,), out (n_blocks, type_size))."""

    kernel = None

    @classmethod
    def quantize_rows(cls, x, importance):
        rows, cols = x.shape
        out = np.empty((rows * (cols // cls.block_size), cls.type_size), np.uint8)
        cls.kernel(readonly(x.reshape(-1)), out)
        return out.reshape(rows, cls.row_bytes(cols))


class BF16(GgufBacked, ggml_type=Q.BF16):
    @classmethod
    def quantize_rows(cls, x, importance):
        out = np.empty(x.shape, np.uint16)
        _bf16_row(readonly(x.reshape(-1).view(np.int32)), out.reshape(-1))
        return out.view(np.uint8)


class Q8_0(_RefBlocks, ggml_type=Q.Q8_0):
    kernel = _q8_0_ref  # ggml's quantize_q8_0 ignores quant_weights
    dequant_kernel = staticmethod(dequant_q8_0)


class TQ1_0(_RefBlocks, ggml_type=Q.TQ1_0):
    kernel = _tq1_0_ref  # quantize_tq1_0 ignores quant_weights


class TQ2_0(_RefBlocks, ggml_type=Q.TQ2_0):
    kernel = _tq2_0_ref


class MXFP4(_RefBlocks, ggml_type=Q.MXFP4):
    kernel = _mxfp4_ref  # quantize_mxfp4 ignores quant_weights
