"""Legacy 32-wide block types Q4_0, Q4_1, Q5_0, Q5_1, byte-exact to ggml.

Without importance ggml runs `quantize_row_q*_ref` (absmax or min/max, one rounding). `gguf.quants`
ports those too, but not bit for bit on blocks of signed zeros: C starts from `max = 0.0f` /
`min = FLT_MAX` and keeps the first of equal values, numpy's argmax/min pick other zeros, so a
block of -0.0 gets another fp16 sign bit. They are ported here (`_legacy_ref`), with C's
float -> int8 conversion. With importance, `quantize_q4_0` & co. run `quantize_row_q*_impl`: a
weighted search (make_qx_quants / make_qkx3_quants) with weights `qw[j] * sqrtf(sigma2 + x[j]^2)`,
sigma2 being the mean square of the whole row (`_legacy_impl`). Decoding is compiled
(`_dequant.dequant_q*`), bit-identical to `gguf.quants`.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import njit

from quantcli.codecs._dequant import (
    dequant_q4_0,
    dequant_q4_1,
    dequant_q5_0,
    dequant_q5_1,
)
from quantcli.codecs._ggml_math import JIT, put_fp16, readonly, row_sigma2
from quantcli.codecs._lanes import qkx_lanes, qx_lanes
from quantcli.codecs.gguf_backed import GgufBacked

QK = 32
LANES = 256  # blocks searched together
_M0_9, _D0_05 = np.float32(-0.9), np.float32(0.05)  # make_qkx3_quants grid of the _1 types


@njit(**JIT)
def _pack_nibbles(L, out, b, pos):
    # qs[j] = L[j] | L[j + 16] << 4
    for j in range(16):
        out[b, pos + j] = (L[j] & 0xF) | ((L[j + 16] & 0xF) << 4)


@njit(**JIT)
def _pack_qh(L, out, b, pos):
    # bit 4 of L[j] into bit j of the little-endian uint32 qh
    qh = 0
    for j in range(QK):
        qh |= ((L[j] >> 4) & 1) << j
    for k in range(4):
        out[b, pos + k] = (qh >> (8 * k)) & 0xFF


_I32_LO = np.float32(-(2.0**31))
_I32_HI = np.float32(2.0**31)
_FLT_MAX = np.float32(np.finfo(np.float32).max)
_I8_SIGN = np.int32(0x80)
_LOW_BYTE = np.int32(0xFF)


@njit(**JIT)
def _level(v, hi):
    """MIN(hi, (int8_t)v) & 0xFF as gcc compiles the cast on x86: cvttss2si to int32 (0x80000000
    when out of range or NaN), then the low byte, sign-extended. Branch-free: it vectorizes."""
    ok = (v >= _I32_LO) & (v < _I32_HI)
    i = np.int32(v if ok else np.float32(0.0))
    i = i if ok else np.int32(-(2**31))
    i = ((i & _LOW_BYTE) ^ _I8_SIGN) - _I8_SIGN
    return (i if i < hi else hi) & _LOW_BYTE


@njit(**JIT)
def _legacy_ref(xf, out, nmax, asymmetric):
    """quantize_row_q4_0_ref (nmax 8: d = max / -8, q = MIN(15, (int8_t)(x/d + 8.5f))),
    _q5_0_ref (16: d = max / -16, MIN(31, (int8_t)(x/d + 16.5f))), _q4_1_ref (15: d = (max - min)
    / 15, m = min, MIN(15, (int8_t)((x - min)/d + 0.5f))), _q5_1_ref (31: (uint8_t)(.. + 0.5f)).
    xf: (n_blocks * 32,) float32, out: (n_blocks, type_size) uint8."""
    fnmax = np.float32(nmax)
    hi = np.int32(127 if nmax == 31 else (31 if nmax == 16 else 15))  # Q5_1 has no MIN
    five_bit = nmax > 15
    pos = 4 if asymmetric else 2
    qs = pos + 4 if five_bit else pos
    for b in range(out.shape[0]):
        o = b * QK
        if asymmetric:
            fmin = _FLT_MAX
            fmax = -_FLT_MAX
            for j in range(QK):
                v = xf[o + j]
                fmin = v if v < fmin else fmin
                fmax = v if v > fmax else fmax
            d = (fmax - fmin) / fnmax
            bias = np.float32(0.5)
            put_fp16(out, b, 2, fmin)
        else:
            amax = np.float32(0.0)
            fmax = np.float32(0.0)
            for j in range(QK):
                v = xf[o + j]
                take = amax < abs(v)
                amax = abs(v) if take else amax
                fmax = v if take else fmax
            d = fmax / -fnmax
            fmin = np.float32(0.0)
            bias = fnmax + np.float32(0.5)
        idv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
        put_fp16(out, b, 0, d)
        qh = 0
        for j in range(16):  # x - 0.0f == x bit for bit, so the _0 types share the expression
            l0 = _level((xf[o + j] - fmin) * idv + bias, hi)
            l1 = _level((xf[o + 16 + j] - fmin) * idv + bias, hi)
            if five_bit:  # qs[j] = (xi0 & 0xF) | (xi1 & 0xF) << 4; bit 4 of each into qh
                out[b, qs + j] = (l0 & 0xF) | ((l1 & 0xF) << 4)
                qh |= ((l0 >> 4) & 1) << j | ((l1 >> 4) & 1) << (j + 16)
            else:  # qs[j] = xi0 | xi1 << 4, unmasked as in C
                out[b, qs + j] = l0 | (l1 << 4)
        if five_bit:
            for k in range(4):
                out[b, pos + k] = (qh >> (8 * k)) & 0xFF


@njit(**JIT)
def _legacy_impl(x, qw, out, nmax, asymmetric):
    """quantize_row_q4_0_impl (nmax 8), _q5_0_impl (16): make_qx_quants, block_q*_0 = d, [qh], qs;
    quantize_row_q4_1_impl (15), _q5_1_impl (31): make_qkx3_quants(.., -0.9, 0.05, 36), with a
    min: block_q*_1 = d, m, [qh], qs. x: (rows, cols) float32, qw: (cols,), out: (rows * cols/32,
    type_size) uint8. The blocks are searched LANES at a time (see `_lanes`)."""
    rows, cols = x.shape
    nb = cols // QK
    n_blocks = rows * nb
    xf = x.reshape(-1)
    sigma2 = np.empty(rows, np.float32)
    for r in range(rows):
        sigma2[r] = row_sigma2(x, r, cols)
    xt = np.empty((QK, LANES), np.float32)
    wt = np.empty((QK, LANES), np.float32)
    Lt = np.empty((QK, LANES), np.float32)
    scale = np.empty(LANES, np.float32)
    the_min = np.empty(LANES, np.float32)
    L = np.zeros(QK, np.int64)
    five_bit = nmax > 15
    for g0 in range(0, n_blocks, LANES):
        nl = min(LANES, n_blocks - g0)
        for k in range(nl):
            g = g0 + k
            sig = sigma2[g // nb]
            c0 = (g % nb) * QK
            for j in range(QK):
                xi = xf[g * QK + j]
                xt[j, k] = xi
                wt[j, k] = qw[c0 + j] * np.sqrt(sig + xi * xi)
        if asymmetric:
            qkx_lanes(xt, wt, nl, nmax, _M0_9, _D0_05, 36, False, scale, the_min, Lt)
        else:
            qx_lanes(xt, wt, nl, nmax, scale, Lt)
        for k in range(nl):
            b = g0 + k
            for j in range(QK):
                L[j] = np.int64(Lt[j, k])
            put_fp16(out, b, 0, scale[k])
            pos = 2
            if asymmetric:
                put_fp16(out, b, 2, -the_min[k])
                pos = 4
            if five_bit:
                _pack_qh(L, out, b, pos)
                pos += 4
            _pack_nibbles(L, out, b, pos)


class _Legacy(GgufBacked):
    nmax: int
    asymmetric: bool

    @classmethod
    def quantize_rows(cls, x, importance):
        rows, cols = x.shape
        out = np.zeros((rows * (cols // QK), cls.type_size), dtype=np.uint8)
        if importance is None:
            _legacy_ref(readonly(x.reshape(-1)), out, cls.nmax, cls.asymmetric)
        else:
            _legacy_impl(readonly(x), readonly(importance), out, cls.nmax, cls.asymmetric)
        return out.reshape(rows, cls.row_bytes(cols))


class Q4_0(_Legacy, ggml_type=Q.Q4_0):
    nmax, asymmetric = 8, False
    dequant_kernel = staticmethod(dequant_q4_0)


class Q4_1(_Legacy, ggml_type=Q.Q4_1):
    nmax, asymmetric = 15, True
    dequant_kernel = staticmethod(dequant_q4_1)


class Q5_0(_Legacy, ggml_type=Q.Q5_0):
    nmax, asymmetric = 16, False
    dequant_kernel = staticmethod(dequant_q5_0)


class Q5_1(_Legacy, ggml_type=Q.Q5_1):
    nmax, asymmetric = 31, True
    dequant_kernel = staticmethod(dequant_q5_1)
