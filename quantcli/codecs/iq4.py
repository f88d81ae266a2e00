"""IQ4_NL and IQ4_XS: 4-bit non-linear levels (`kvalues_iq4nl`), byte-identical to ggml.

Both are `quantize_row_iq4_nl_impl` in ggml-quants.c, called by `quantize_iq4_nl` (super-block 32,
one fp16 scale) and `quantize_iq4_xs` (super-block 256: an fp16 scale and eight 6-bit sub-scales).
`ggml_quantize_chunk` always runs the search with `ntry = 7`, with or without importance.

    IQ4_NL block (18 bytes):  d fp16 | qs[16]   low nibble = x[j], high nibble = x[j + 16]
    IQ4_XS block (136 bytes): d fp16 | scales_h u16 | scales_l[4] | qs[128] (4 x the IQ4_NL layout)
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq
from numba import njit

from quantcli.codecs._ggml_math import F0, F1, GROUP_MAX_EPS, JIT, nearest_int, put_fp16, readonly
from quantcli.codecs.gguf_backed import GgufBacked

# helpers taking arrays are inlined into the row kernels at numba-IR level: a compiled call
# costs an atomic refcount increment and decrement per array argument (NRT_incref/decref)
JIT_INLINE = dict(JIT, inline="always")

KVALUES = np.array(gq.IQ4_NL.kvalues, dtype=np.float32)  # kvalues_iq4nl, as the floats C compares
NTRY = 7  # quantize_iq4_nl / quantize_iq4_xs pass ntry = 7
_SIGMA_NL = np.float32(2.0 / 32)  # sigma2 *= 2.f/super_block_size
_SIGMA_XS = np.float32(2.0 / 256)


def _upper_table(values: np.ndarray) -> np.ndarray:
    """For k = floor(x) in [values[0], values[15]): the first level above k, i.e. where the binary
    search of best_index_int8 ends (values are integers, so x < values[i] exactly when k < values[i])."""
    lo, hi = int(values[0]), int(values[-1])
    return np.array([int(np.argmax(values > k)) for k in range(lo, hi)], dtype=np.intp)


_UPPER = _upper_table(KVALUES)
_LOWEST = np.float64(-KVALUES[0])  # x + this >= 0 inside the table's range


@njit(**JIT_INLINE)
def best_index_int8(values, x):
    """as best_index_int8(16, values, x): the nearest of 16 sorted levels, ties to the upper. The
    binary search's end point comes from a table indexed by floor(x) (taken in float64, where
    x + 127 is exact); the final comparison is C's, in float32, taken without a branch. Unsigned
    indices: numba checks signed ones for wrap-around, which made this 5x slower."""
    if x <= values[0]:
        return 0
    if x >= values[15] or x != x:  # NaN: every comparison in C's search is false, it ends at 15
        return 15
    mu = _UPPER[int(np.float64(x) + _LOWEST)]
    return mu - np.intp(x - values[np.uintp(mu - 1)] < values[np.uintp(mu)] - x)


@njit(**JIT_INLINE)
def _fill_weights(x, r, xo, qw, sigma2, w):
    """weight[j] = qw[j] * sqrtf(sigma2 + x^2), or x^2 without importance; w is (32,)."""
    for j in range(32):
        xj = x[r, xo + j]
        if qw is None:
            w[j] = xj * xj
        else:
            w[j] = qw[xo + j] * np.sqrt(sigma2 + xj * xj)


@njit(**JIT_INLINE)
def _sums(x, r, xo, w, values, iscale):
    """sum w*q*x and sum w*q*q over a block of 32 with q = values[best_index(iscale*x)]."""
    sumqx = F0
    sumq2 = F0
    for j in range(32):
        xj = x[r, xo + j]
        q = values[best_index_int8(values, iscale * xj)]
        sumqx += w[j] * q * xj
        sumq2 += w[j] * q * q
    return sumqx, sumq2


@njit(**JIT_INLINE)
def _block_scale(x, r, xo, w, values):
    """The scale search of quantize_row_iq4_nl_impl for one block of 32 (ntry = 7)."""
    amax = F0
    vmax = F0
    for j in range(32):
        ax = abs(x[r, xo + j])
        if ax > amax:
            amax = ax
            vmax = x[r, xo + j]
    if amax < GROUP_MAX_EPS:
        return F0
    d = -vmax / values[0]
    sumqx, sumq2 = _sums(x, r, xo, w, values, F1 / d)
    d = sumqx / sumq2 if sumq2 > F0 else F0
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        iscale = np.float32(itry + int(values[0])) / vmax
        sumqx, sumq2 = _sums(x, r, xo, w, values, iscale)
        if sumq2 > F0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@njit(**JIT_INLINE)
def _pack_nibbles(x, r, xo, iscale, values, out, o):
    """q4[j] = L[j] | L[j + 16] << 4 for one block of 32, L = best_index(iscale * x)."""
    for j in range(16):
        lo = best_index_int8(values, iscale * x[r, xo + j])
        hi = best_index_int8(values, iscale * x[r, xo + j + 16])
        out[r, o + j] = lo | (hi << 4)


@njit(**JIT)
def _iq4_nl_rows(x, qw, values, out):
    # (rows, cols) float32 -> (rows, cols // 32 * 18) uint8, as quantize_iq4_nl
    rows, cols = x.shape
    w = np.empty(32, dtype=np.float32)
    for r in range(rows):
        for ib in range(cols // 32):
            xo = 32 * ib
            sigma2 = F0
            for j in range(32):
                sigma2 += x[r, xo + j] * x[r, xo + j]
            sigma2 *= _SIGMA_NL
            _fill_weights(x, r, xo, qw, sigma2, w)
            d = _block_scale(x, r, xo, w, values)
            put_fp16(out, r, 18 * ib, d)
            _pack_nibbles(x, r, xo, F1 / d if d != F0 else F0, values, out, 18 * ib + 2)


@njit(**JIT)
def _iq4_xs_rows(x, qw, values, out):
    # (rows, cols) float32 -> (rows, cols // 256 * 136) uint8, as quantize_iq4_xs
    rows, cols = x.shape
    w = np.empty(32, dtype=np.float32)
    scales = np.empty(8, dtype=np.float32)
    for r in range(rows):
        for ibl in range(cols // 256):
            xs = 256 * ibl
            o = 136 * ibl
            sigma2 = F0
            for j in range(256):
                sigma2 += x[r, xs + j] * x[r, xs + j]
            sigma2 *= _SIGMA_XS
            max_scale = F0
            amax_scale = F0
            for ib in range(8):
                _fill_weights(x, r, xs + 32 * ib, qw, sigma2, w)
                scales[ib] = _block_scale(x, r, xs + 32 * ib, w, values)
                if abs(scales[ib]) > amax_scale:
                    amax_scale = abs(scales[ib])
                    max_scale = scales[ib]
            d = -max_scale / np.float32(32)  # -0.0 for an all-zero super-block, as in C
            put_fp16(out, r, o, d)
            iscale = F1 / d if d != F0 else F0
            scales_h = 0
            for ib in range(8):
                l = max(-32, min(31, nearest_int(iscale * scales[ib])))
                dl = d * np.float32(l)
                _pack_nibbles(x, r, xs + 32 * ib, F1 / dl if dl != F0 else F0, values, out,
                              o + 8 + 16 * ib)
                l += 32
                if ib % 2 == 0:
                    out[r, o + 4 + ib // 2] = l & 0xF
                else:
                    out[r, o + 4 + ib // 2] |= (l & 0xF) << 4
                scales_h |= (l >> 4) << (2 * ib)
            out[r, o + 2] = scales_h & 0xFF
            out[r, o + 3] = scales_h >> 8


class IQ4_NL(GgufBacked, ggml_type=Q.IQ4_NL):
    @classmethod
    def quantize_rows(cls, x, importance):
        out = np.zeros((x.shape[0], cls.row_bytes(x.shape[1])), dtype=np.uint8)
        _iq4_nl_rows(readonly(x), readonly(importance), KVALUES, out)
        return out


class IQ4_XS(GgufBacked, ggml_type=Q.IQ4_XS):
    @classmethod
    def quantize_rows(cls, x, importance):
        out = np.zeros((x.shape[0], cls.row_bytes(x.shape[1])), dtype=np.uint8)
        _iq4_xs_rows(readonly(x), readonly(importance), KVALUES, out)
        return out
