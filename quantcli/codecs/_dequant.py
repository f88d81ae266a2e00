"""Compiled decoders of the legacy and K-quant block types, bit-identical to ggml and gguf.quants.

Each kernel ports `dequantize_row_*` (ggml-quants.c): `blocks: (n_blocks, type_size)` uint8 ->
`y: (n_blocks * block_size,)` float32, written in place so that callers can reuse a buffer. The
float32 products are taken in C's order (`y = d1 * q - m1` with `d1 = d * sc`, never
`d * (sc * q)`), which is also the order of gguf's numpy code, so the outputs match bit for bit;
see `_ggml_math` for the JIT settings (no fastmath: no FMA contraction of `d1 * q - m1`).

Vectorizing: the inner loops run over 16 or 32 contiguous outputs, with a trip count from `_run`
rather than a constant. A loop of constant count that short is unrolled fully by LLVM before its
loop vectorizer runs, and numba leaves the SLP vectorizer off, so it would stay scalar (2-3x
slower); a count LLVM cannot fold keeps it a loop, which vectorizes.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from quantcli.codecs._ggml_math import JIT, fp16_to_fp32

QK = 32  # legacy block
QK_K = 256  # K-quant super-block
_I8_SIGN = 0x80


@njit(**JIT)
def _run(blocks, pos, n):
    """n, the length of a run of bytes at blocks[:, pos:], as a value LLVM cannot fold (see the
    module docstring); capped by the row width, so that a loop over it never reads past a block."""
    return min(blocks.shape[1] - pos, n)


@njit(**JIT)
def _check_out(blocks, y, block_size):
    # nothing checks the indices inside the kernels: a short y would be written past its end
    if y.size < blocks.shape[0] * block_size:
        raise ValueError("the output holds fewer values than the blocks decode to")


@njit(**JIT)
def _fp16_at(blocks, b, pos):
    """The little-endian fp16 at blocks[b, pos:pos+2] as float32 (GGML_FP16_TO_FP32)."""
    return fp16_to_fp32(np.int64(blocks[b, pos]) | (np.int64(blocks[b, pos + 1]) << 8))


@njit(**JIT)
def _i8(u):
    # (int8_t) of a byte
    return (np.int32(u) ^ _I8_SIGN) - _I8_SIGN


# -- legacy types: blocks of 32 --------------------------------------------------------------------


@njit(**JIT)
def dequant_q4_0(blocks, y):
    """dequantize_row_q4_0: block_q4_0 = d, qs[16]; y[j] = ((qs[j] & 0xF) - 8) * d, y[j + 16] from
    the high nibble. blocks: (n_blocks, 18)."""
    _check_out(blocks, y, QK)
    n = _run(blocks, 2, 16)
    for b in range(blocks.shape[0]):
        d = _fp16_at(blocks, b, 0)
        o = b * QK
        for j in range(n):
            q = np.int32(blocks[b, 2 + j])
            y[o + j] = np.float32((q & 0xF) - 8) * d
            y[o + 16 + j] = np.float32((q >> 4) - 8) * d


@njit(**JIT)
def dequant_q4_1(blocks, y):
    """dequantize_row_q4_1: block_q4_1 = d, m, qs[16]; y = q * d + m. blocks: (n_blocks, 20)."""
    _check_out(blocks, y, QK)
    n = _run(blocks, 4, 16)
    for b in range(blocks.shape[0]):
        d = _fp16_at(blocks, b, 0)
        m = _fp16_at(blocks, b, 2)
        o = b * QK
        for j in range(n):
            q = np.int32(blocks[b, 4 + j])
            y[o + j] = np.float32(q & 0xF) * d + m
            y[o + 16 + j] = np.float32(q >> 4) * d + m


@njit(**JIT)
def _qh32(blocks, b, pos):
    # memcpy(&qh, x[i].qh, 4): the little-endian uint32 of the fifth bits
    return (np.int64(blocks[b, pos]) | (np.int64(blocks[b, pos + 1]) << 8)
            | (np.int64(blocks[b, pos + 2]) << 16) | (np.int64(blocks[b, pos + 3]) << 24))


@njit(**JIT)
def dequant_q5_0(blocks, y):
    """dequantize_row_q5_0: block_q5_0 = d, qh[4], qs[16]; value j takes bit j of qh as its fifth
    bit, y = (q - 16) * d. blocks: (n_blocks, 22)."""
    _check_out(blocks, y, QK)
    n = _run(blocks, 6, 16)
    for b in range(blocks.shape[0]):
        d = _fp16_at(blocks, b, 0)
        qh = _qh32(blocks, b, 2)
        o = b * QK
        for j in range(n):
            q = np.int64(blocks[b, 6 + j])
            x0 = (q & 0xF) | (((qh >> j) << 4) & 0x10)
            x1 = (q >> 4) | ((qh >> (j + 12)) & 0x10)
            y[o + j] = np.float32(x0 - 16) * d
            y[o + 16 + j] = np.float32(x1 - 16) * d


@njit(**JIT)
def dequant_q5_1(blocks, y):
    """dequantize_row_q5_1: block_q5_1 = d, m, qh[4], qs[16]; y = q * d + m.
    blocks: (n_blocks, 24)."""
    _check_out(blocks, y, QK)
    n = _run(blocks, 8, 16)
    for b in range(blocks.shape[0]):
        d = _fp16_at(blocks, b, 0)
        m = _fp16_at(blocks, b, 2)
        qh = _qh32(blocks, b, 4)
        o = b * QK
        for j in range(n):
            q = np.int64(blocks[b, 8 + j])
            x0 = (q & 0xF) | (((qh >> j) << 4) & 0x10)
            x1 = (q >> 4) | ((qh >> (j + 12)) & 0x10)
            y[o + j] = np.float32(x0) * d + m
            y[o + 16 + j] = np.float32(x1) * d + m


@njit(**JIT)
def dequant_q8_0(blocks, y):
    """dequantize_row_q8_0: block_q8_0 = d, qs[32] int8; y = qs * d. blocks: (n_blocks, 34)."""
    _check_out(blocks, y, QK)
    n = _run(blocks, 2, QK)
    for b in range(blocks.shape[0]):
        d = _fp16_at(blocks, b, 0)
        o = b * QK
        for j in range(n):
            y[o + j] = np.float32(_i8(blocks[b, 2 + j])) * d


# -- K-quants: super-blocks of 256 -----------------------------------------------------------------


@njit(**JIT)
def dequant_q2_k(blocks, y):
    """dequantize_row_q2_K: block_q2_K = scales[16], qs[64], d, dmin. Each scale byte holds the
    4-bit scale and 4-bit min of 16 values: y = (d * (sc & 0xF)) * q - dmin * (sc >> 4), the
    2-bit q at shift 2j of qs[32n + l] for y[128n + 32j + l]. blocks: (n_blocks, 84)."""
    _check_out(blocks, y, QK_K)
    n32 = _run(blocks, 16, 32)
    for b in range(blocks.shape[0]):
        d = _fp16_at(blocks, b, 80)
        dmin = _fp16_at(blocks, b, 82)
        for n in range(2):
            q0 = 16 + 32 * n  # qs start at byte 16
            for j in range(4):
                shift = 2 * j
                s0 = np.int32(blocks[b, 8 * n + 2 * j])  # l < 16
                s1 = np.int32(blocks[b, 8 * n + 2 * j + 1])  # l >= 16
                dl0, ml0 = d * np.float32(s0 & 0xF), dmin * np.float32(s0 >> 4)
                dl1, ml1 = d * np.float32(s1 & 0xF), dmin * np.float32(s1 >> 4)
                y0 = b * QK_K + 128 * n + 32 * j
                for l in range(n32):
                    q = np.float32((np.int32(blocks[b, q0 + l]) >> shift) & 3)
                    y[y0 + l] = (dl0 * q - ml0) if l < 16 else (dl1 * q - ml1)


@njit(**JIT)
def _q3_scale(blocks, b, s):
    """Sub-block scale s of a block_q3_K, as the aux[] shuffle of dequantize_row_q3_K: low 4 bits
    from byte s & 7 of scales[12] (its high nibble for s >= 8), high 2 bits from byte 8 + (s & 3)
    at shift 2 * (s >> 2); minus 32."""
    lo = np.int32(blocks[b, 96 + (s & 7)])
    lo = (lo >> 4) if s >= 8 else (lo & 0xF)
    hi = (np.int32(blocks[b, 104 + (s & 3)]) >> (2 * (s >> 2))) & 3
    return (lo | (hi << 4)) - 32


@njit(**JIT)
def dequant_q3_k(blocks, y):
    """dequantize_row_q3_K: block_q3_K = hmask[32], qs[64], scales[12], d. y = (d * (sc - 32)) * q,
    q = the 2-bit value at shift 2j of qs[32n + l], minus 4 unless bit 4n + j of hmask[l] is set,
    for y[128n + 32j + l]. blocks: (n_blocks, 110)."""
    _check_out(blocks, y, QK_K)
    n32 = _run(blocks, 32, 32)
    for b in range(blocks.shape[0]):
        d_all = _fp16_at(blocks, b, 108)
        for n in range(2):
            q0 = 32 + 32 * n  # qs start at byte 32
            for j in range(4):
                shift = 2 * j
                m = 1 << (4 * n + j)
                dl0 = d_all * np.float32(_q3_scale(blocks, b, 8 * n + 2 * j))  # l < 16
                dl1 = d_all * np.float32(_q3_scale(blocks, b, 8 * n + 2 * j + 1))
                y0 = b * QK_K + 128 * n + 32 * j
                for l in range(n32):
                    q = (np.int32(blocks[b, q0 + l]) >> shift) & 3
                    q -= 0 if np.int32(blocks[b, l]) & m else 4
                    y[y0 + l] = (dl0 if l < 16 else dl1) * np.float32(q)


@njit(**JIT)
def _scale_min_k4(blocks, b, j):
    """get_scale_min_k4(j, scales) of a block_q4_K / block_q5_K (scales[12] at byte 4):
    the 6-bit (scale, min) of sub-block j."""
    if j < 4:
        return np.int32(blocks[b, 4 + j]) & 63, np.int32(blocks[b, 8 + j]) & 63
    s = (np.int32(blocks[b, 8 + j]) & 0xF) | ((np.int32(blocks[b, j]) >> 6) << 4)
    m = (np.int32(blocks[b, 8 + j]) >> 4) | ((np.int32(blocks[b, 4 + j]) >> 6) << 4)
    return s, m


@njit(**JIT)
def _k4_chunk_scales(blocks, b, c, d, dmin):
    """(d1, m1, d2, m2) of the two sub-blocks of 64-value chunk c of a block_q4_K / block_q5_K:
    d1 = d * sc and m1 = dmin * m of sub-block 2c, then of 2c + 1."""
    sc, mn = _scale_min_k4(blocks, b, 2 * c)
    d1, m1 = d * np.float32(sc), dmin * np.float32(mn)
    sc, mn = _scale_min_k4(blocks, b, 2 * c + 1)
    return d1, m1, d * np.float32(sc), dmin * np.float32(mn)


@njit(**JIT)
def dequant_q4_k(blocks, y):
    """dequantize_row_q4_K: block_q4_K = d, dmin, scales[12], qs[128]. Per 64 values, two
    sub-blocks: y = d1 * (qs[l] & 0xF) - m1, then d2 * (qs[l] >> 4) - m2, with d1 = d * sc and
    m1 = dmin * m. blocks: (n_blocks, 144)."""
    _check_out(blocks, y, QK_K)
    n32 = _run(blocks, 16, 32)
    for b in range(blocks.shape[0]):
        d = _fp16_at(blocks, b, 0)
        dmin = _fp16_at(blocks, b, 2)
        for c in range(4):
            d1, m1, d2, m2 = _k4_chunk_scales(blocks, b, c, d, dmin)
            q0 = 16 + 32 * c  # qs start at byte 16
            y0 = b * QK_K + 64 * c
            for l in range(n32):
                q = np.int32(blocks[b, q0 + l])
                y[y0 + l] = d1 * np.float32(q & 0xF) - m1
                y[y0 + 32 + l] = d2 * np.float32(q >> 4) - m2


@njit(**JIT)
def dequant_q5_k(blocks, y):
    """dequantize_row_q5_K: block_q5_K = d, dmin, scales[12], qh[32], qs[128]; as Q4_K with a
    fifth bit (+16) from bits 2c and 2c + 1 of qh[l] for the 64 values of chunk c.
    blocks: (n_blocks, 176)."""
    _check_out(blocks, y, QK_K)
    n32 = _run(blocks, 16, 32)
    for b in range(blocks.shape[0]):
        d = _fp16_at(blocks, b, 0)
        dmin = _fp16_at(blocks, b, 2)
        for c in range(4):
            d1, m1, d2, m2 = _k4_chunk_scales(blocks, b, c, d, dmin)
            q0 = 48 + 32 * c  # qh at byte 16, qs at byte 48
            y0 = b * QK_K + 64 * c
            for l in range(n32):
                q = np.int32(blocks[b, q0 + l])
                h = np.int32(blocks[b, 16 + l]) >> (2 * c)
                y[y0 + l] = d1 * np.float32((q & 0xF) + ((h & 1) << 4)) - m1
                y[y0 + 32 + l] = d2 * np.float32((q >> 4) + ((h & 2) << 3)) - m2


@njit(**JIT)
def dequant_q6_k(blocks, y):
    """dequantize_row_q6_K: block_q6_K = ql[128], qh[64], scales[16] int8, d. Per half n of 128
    values: q = (4 bits of ql | 2 bits of qh << 4) - 32 and y = (d * sc) * q, for four runs r of
    32 values (ql[l] low, ql[l + 32] low, ql[l] high, ql[l + 32] high; qh[l] at shift 2r), the
    scale sc[8n + 2r + l / 16]. blocks: (n_blocks, 210)."""
    _check_out(blocks, y, QK_K)
    n32 = _run(blocks, 0, 32)
    for b in range(blocks.shape[0]):
        d = _fp16_at(blocks, b, 208)
        for n in range(2):
            h0 = 128 + 32 * n  # qh at byte 128, scales at 192
            y0 = b * QK_K + 128 * n
            for r in range(4):
                l0 = 64 * n + 32 * (r & 1)
                lshift = 4 * (r >> 1)
                hshift = 2 * r
                ds0 = d * np.float32(_i8(blocks[b, 192 + 8 * n + 2 * r]))  # l < 16
                ds1 = d * np.float32(_i8(blocks[b, 192 + 8 * n + 2 * r + 1]))
                for l in range(n32):
                    q = ((np.int32(blocks[b, l0 + l]) >> lshift) & 0xF) | (
                        ((np.int32(blocks[b, h0 + l]) >> hshift) & 3) << 4)
                    y[y0 + 32 * r + l] = (ds0 if l < 16 else ds1) * np.float32(q - 32)
