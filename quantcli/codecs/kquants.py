"""K-quants (Q2_K .. Q6_K): super-blocks of 256 with quantized sub-block scales, byte-exact to ggml.

`quantize_q*_K` in ggml-quants.c runs `quantize_row_q*_K_ref` when quant_weights is NULL and
`quantize_row_q*_K_impl` (another search) otherwise; each codec does the same.

Each kernel takes the input flattened, `xf: (rows * cols,)` float32, and fills
`out: (n_superblocks, type_size)` uint8, in chunks of super-blocks:
  1. gather the chunk's sub-blocks as lanes, `xt: (16 or 32, lanes)`, with their search weights;
  2. run the sub-block search (make_qkx*_quants / make_qx_quants) on all lanes at once (`_lanes`);
  3. per super-block, in plain scalar code: quantize the sub-block scales, store fp16 d/dmin,
     requantize every value against the stored scales, pack the bits.
Step 3 follows the C functions line by line; see `_ggml_math` for the float32 rules.
Dequantization is compiled (`_dequant.dequant_q*_k`), bit-identical to `gguf.quants.dequantize`.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import njit

from quantcli.codecs._dequant import (
    dequant_q2_k,
    dequant_q3_k,
    dequant_q4_k,
    dequant_q5_k,
    dequant_q6_k,
)
from quantcli.codecs._ggml_math import (
    F0,
    GROUP_MAX_EPS,
    JIT,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    put_fp16,
    readonly,
)
from quantcli.codecs._lanes import q3_lanes, qkx_lanes, qx_lanes
from quantcli.codecs.gguf_backed import GgufBacked

QK_K = 256
LANES = 256  # sub-blocks searched together (a multiple of 16)
_F1 = np.float32(1.0)
_F2 = np.float32(2.0)
_F15 = np.float32(15.0)
_F32 = np.float32(32.0)
_F63 = np.float32(63.0)
_F128 = np.float32(128.0)
_FQK = np.float32(QK_K)
# make_qkx*_quants search grids (rmin, rdelta) as the C call sites pass them
_M1_0, _M0_9, _M0_5 = np.float32(-1.0), np.float32(-0.9), np.float32(-0.5)
_D0_1, _D0_05 = np.float32(0.1), np.float32(0.05)


# -- step 1: lanes and their weights ---------------------------------------------------------------


@njit(**JIT)
def _gather(xf, s0, nl, xt):
    """xt[i, k] = group s0 + k of xf: (n, nl) <- (nl, n), n = xt.shape[0]."""
    n = xt.shape[0]
    for k in range(nl):
        base = (s0 + k) * n
        for i in range(n):
            xt[i, k] = xf[base + i]


@njit(**JIT)
def _sumsq(xf, o, n):
    s = F0
    for j in range(n):
        s += xf[o + j] * xf[o + j]
    return s


@njit(**JIT)
def _imatrix_lanes(xf, qw, nb, s0, nl, sigma_scale, xt, wt, sw):
    """weight = qw[l] * sqrtf(sigma2 + x[l]^2), sigma2 = sigma_scale * sum(x^2) / QK_K over the
    lane's super-block (quantize_row_q*_K_impl); sw[k] = the lane's weights summed in order."""
    n = xt.shape[0]
    per = QK_K // n
    sig = np.empty(nl, np.float32)
    qoff = np.empty(nl, np.int64)
    sigma2 = F0
    for k in range(nl):
        s = s0 + k
        g = s // per
        if k == 0 or s % per == 0:
            sigma2 = sigma_scale * _sumsq(xf, g * QK_K, QK_K) / _FQK
        sig[k] = sigma2
        qoff[k] = (g % nb) * QK_K + (s % per) * n
    for i in range(n):
        for k in range(nl):
            xi = xt[i, k]
            wt[i, k] = qw[qoff[k] + i] * np.sqrt(sig[k] + xi * xi)
    for k in range(nl):
        sw[k] = F0
    for i in range(n):
        for k in range(nl):
            sw[k] += wt[i, k]


# -- step 3: scales, requantization and packing, per super-block -----------------------------------


@njit(**JIT)
def _levels(Lt, k0, n_sub, L):
    """L[n*j + i] = Lt[i, k0 + j]: the search's levels of one super-block, in element order."""
    n = Lt.shape[0]
    for j in range(n_sub):
        for i in range(n):
            L[n * j + i] = np.int64(Lt[i, k0 + j])


@njit(**JIT)
def _requant(xf, o, dv, mv, lo, hi, L):
    """L[t] = clamp(nearest_int((x[t] + mv[t]) / dv[t]), lo, hi) - lo over one super-block, except
    where dv[t] == 0 (C: `if (!d) continue;`), which keeps the search's level. dv/mv hold each
    value's sub-block d and dm; a whole-block loop so that it vectorizes."""
    for t in range(QK_K):
        d = dv[t]
        l = nearest_int((xf[o + t] + mv[t]) / d)
        l = max(lo, min(hi, l)) - lo
        L[t] = l if d != F0 else L[t]


@njit(**JIT)
def _fill(v, j, n, val):
    for t in range(n * j, n * j + n):
        v[t] = val


@njit(**JIT)
def _pack_2bit(L, out, b, pos):
    # qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6, j in {0, 128}
    for j in range(0, QK_K, 128):
        for l in range(32):
            out[b, pos + j // 4 + l] = (
                L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)
            ) & 0xFF


@njit(**JIT)
def _pack_scales_k4(ls, lm, q, out, b):
    """6-bit scales and mins of 8 sub-blocks into the 12 bytes q (int64 scratch, each & 0xFF as a
    uint8 store would), copied to block bytes 4..15: the inverse of get_scale_min_k4."""
    for j in range(8):
        if j < 4:
            q[j] = ls[j] & 0xFF
            q[j + 4] = lm[j] & 0xFF
        else:
            q[j + 4] = ((ls[j] & 0xF) | ((lm[j] & 0xF) << 4)) & 0xFF
            q[j - 4] = (q[j - 4] | ((ls[j] >> 4) << 6)) & 0xFF
            q[j] = (q[j] | ((lm[j] >> 4) << 6)) & 0xFF
    for j in range(12):
        out[b, 4 + j] = q[j]


@njit(**JIT)
def _scale_min_k4(j, q):
    """as get_scale_min_k4 on the 12 scale bytes q."""
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


@njit(**JIT)
def _requant_k4(xf, o, q, d_all, m_all, nmax, L, dv, mv):
    """Q4_K/Q5_K second pass: levels from the stored fp16 d/dmin and 6-bit scales/mins,
    d = d_all * sc, dm = m_all * m per sub-block of 32."""
    for j in range(8):
        sc, m = _scale_min_k4(j, q)
        _fill(dv, j, 32, d_all * np.float32(sc))
        _fill(mv, j, 32, m_all * np.float32(m))
    _requant(xf, o, dv, mv, 0, nmax, L)


@njit(**JIT)
def _pack_k45(L, out, b, nmax):
    if nmax == 15:  # Q4_K: qs @16, q[l] = L[j + l] | L[j + l + 32] << 4
        for j in range(0, QK_K, 64):
            for l in range(32):
                out[b, 16 + j // 2 + l] = L[j + l] | (L[j + l + 32] << 4)
        return
    # Q5_K: qh @16 (bit 4 of L[n + j] -> bit 2n/64 of qh[j], of L[n + j + 32] -> the next), qs @48
    qh = np.zeros(32, np.int64)
    m1 = 1
    m2 = 2
    for n in range(0, QK_K, 64):
        for j in range(32):
            l1 = L[n + j]
            if l1 > 15:
                l1 -= 16
                qh[j] |= m1
            l2 = L[n + j + 32]
            if l2 > 15:
                l2 -= 16
                qh[j] |= m2
            out[b, 48 + n // 2 + j] = l1 | (l2 << 4)
        m1 <<= 2
        m2 <<= 2
    for j in range(32):
        out[b, 16 + j] = qh[j]


@njit(**JIT)
def _finish_k45(xf, o, out, b, ls, lm, q, d_val, m_val, nmax, L, dv, mv):
    """Store 6-bit scales/mins and fp16 d/dmin, requantize, pack (block_q4_K / block_q5_K)."""
    _pack_scales_k4(ls, lm, q, out, b)
    d_all = put_fp16(out, b, 0, d_val)
    m_all = put_fp16(out, b, 2, m_val)
    _requant_k4(xf, o, q, d_all, m_all, nmax, L, dv, mv)
    _pack_k45(L, out, b, nmax)


@njit(**JIT)
def _finish_q2(xf, o, out, b, d_all, m_all, L, q, dv, mv):
    """Store the 16 scale bytes q, requantize to 2 bits with them (d = d_all * (q & 0xF),
    dm = m_all * (q >> 4)), pack: block_q2_K = scales[16] @0, qs[64] @16, d @80, dmin @82."""
    for j in range(16):
        out[b, j] = q[j]
        _fill(dv, j, 16, d_all * np.float32(q[j] & 0xF))
        _fill(mv, j, 16, m_all * np.float32(q[j] >> 4))
    _requant(xf, o, dv, mv, 0, 3, L)
    _pack_2bit(L, out, b, 16)


@njit(**JIT)
def _pack_q3_scales(ls, q):
    """16 6-bit scales (already offset by 32) into the 12 bytes of block_q3_K.scales (q, int64)."""
    for j in range(12):
        q[j] = 0
    for j in range(16):
        l = ls[j]
        if j < 8:
            q[j] = l & 0xF
        else:
            q[j - 8] = (q[j - 8] | ((l & 0xF) << 4)) & 0xFF
        l >>= 4
        q[8 + j % 4] = (q[8 + j % 4] | (l << (2 * (j // 4)))) & 0xFF


@njit(**JIT)
def _finish_q3(xf, o, out, b, L, q, d_all, dv, mv):
    """Requantize with the stored scales q (d = d_all * (6-bit scale - 32)), then hmask + 2-bit
    quants: block_q3_K = hmask[32] @0, qs[64] @32, scales[12] @96, d @108."""
    for j in range(12):
        out[b, 96 + j] = q[j]
    for j in range(16):
        sc = q[j] & 0xF if j < 8 else q[j - 8] >> 4
        sc = (sc | (((q[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
        _fill(dv, j, 16, d_all * np.float32(sc))
        _fill(mv, j, 16, F0)
    _requant(xf, o, dv, mv, -4, 3, L)
    for m in range(32):  # bit 2 of L[32*h + m] -> bit h of hmask[m]; the low 2 bits stay
        out[b, m] = (
            ((L[m] >> 2) & 1)
            | (((L[32 + m] >> 2) & 1) << 1)
            | (((L[64 + m] >> 2) & 1) << 2)
            | (((L[96 + m] >> 2) & 1) << 3)
            | (((L[128 + m] >> 2) & 1) << 4)
            | (((L[160 + m] >> 2) & 1) << 5)
            | (((L[192 + m] >> 2) & 1) << 6)
            | (((L[224 + m] >> 2) & 1) << 7)
        )
    for t in range(QK_K):
        L[t] &= 3
    _pack_2bit(L, out, b, 32)


@njit(**JIT)
def _finish_q6(xf, o, out, b, L, scales, k0, max_scale, dv, mv):
    """int8 scales against max_scale, requantize (d = fp16 d * scale), pack:
    block_q6_K = ql[128] @0, qh[64] @128, scales[16] @192, d @208."""
    iscale = -_F128 / max_scale
    d_all = put_fp16(out, b, 208, _F1 / iscale)
    for j in range(16):
        s = min(127, nearest_int(iscale * scales[k0 + j]))
        s = ((s + 128) & 0xFF) - 128  # stored as int8_t
        out[b, 192 + j] = s & 0xFF
        _fill(dv, j, 16, d_all * np.float32(s))
        _fill(mv, j, 16, F0)
    _requant(xf, o, dv, mv, -32, 31, L)
    for j in range(0, QK_K, 128):
        ql = j // 2
        qh = 128 + j // 4
        for l in range(32):
            out[b, ql + l] = (L[j + l] & 0xF) | ((L[j + l + 64] & 0xF) << 4)
            out[b, ql + l + 32] = (L[j + l + 32] & 0xF) | ((L[j + l + 96] & 0xF) << 4)
            out[b, qh + l] = (
                (L[j + l] >> 4)
                | ((L[j + l + 32] >> 4) << 2)
                | ((L[j + l + 64] >> 4) << 4)
                | ((L[j + l + 96] >> 4) << 6)
            )


# -- Q2_K: 16 sub-blocks of 16, 4-bit scales and mins, 2-bit quants (84 bytes) ---------------------


@njit(**JIT)
def _q2_k(xf, qw, out, nb, weighted):
    """quantize_row_q2_K_ref (weights |x|, make_qkx2_quants(16, 3, .., -0.5, 0.1, 15, mad)) or
    quantize_row_q2_K_impl (imatrix weights, make_qkx3_quants(16, 3, .., -0.9, 0.05, 36) and
    make_qp_quants for the scales)."""
    n_blocks = out.shape[0]
    per = LANES // 16
    xt = np.empty((16, LANES), np.float32)
    wt = np.empty((16, LANES), np.float32)
    Lt = np.empty((16, LANES), np.float32)
    scale = np.empty(LANES, np.float32)
    the_min = np.empty(LANES, np.float32)
    sw = np.empty(LANES, np.float32)
    L = np.zeros(QK_K, np.int64)
    dv = np.zeros(QK_K, np.float32)
    mv = np.zeros(QK_K, np.float32)
    q = np.zeros(16, np.int64)
    ls = np.zeros(16, np.int64)
    lm = np.zeros(16, np.int64)
    for g0 in range(0, n_blocks, per):
        ng = min(per, n_blocks - g0)
        nl = ng * 16
        _gather(xf, g0 * 16, nl, xt)
        if weighted:
            _imatrix_lanes(xf, qw, nb, g0 * 16, nl, _F1, xt, wt, sw)  # Q2_K: sigma2 = sumx2/QK_K
            qkx_lanes(xt, wt, nl, 3, _M0_9, _D0_05, 36, False, scale, the_min, Lt)
        else:
            for i in range(16):
                for k in range(nl):
                    wt[i, k] = abs(xt[i, k])
            qkx_lanes(xt, wt, nl, 3, _M0_5, _D0_1, 15, True, scale, the_min, Lt)
        for gi in range(ng):
            b = g0 + gi
            k0 = gi * 16
            _levels(Lt, k0, 16, L)
            if weighted:
                dm = make_qp_quants(16, 15, scale[k0:k0 + 16], ls, sw[k0:k0 + 16])
                mm = make_qp_quants(16, 15, the_min[k0:k0 + 16], lm, sw[k0:k0 + 16])
                d_all = put_fp16(out, b, 80, dm)
                m_all = put_fp16(out, b, 82, mm)
                for j in range(16):
                    q[j] = (ls[j] | (lm[j] << 4)) & 0xFF
            else:
                max_scale = F0
                max_min = F0
                for j in range(16):
                    if scale[k0 + j] > max_scale:
                        max_scale = scale[k0 + j]
                    if the_min[k0 + j] > max_min:
                        max_min = the_min[k0 + j]
                if max_scale > F0:
                    iscale = _F15 / max_scale
                    for j in range(16):
                        q[j] = nearest_int(iscale * scale[k0 + j]) & 0xFF
                    d_all = put_fp16(out, b, 80, max_scale / _F15)
                else:
                    for j in range(16):
                        q[j] = 0
                    d_all = put_fp16(out, b, 80, F0)
                if max_min > F0:
                    iscale = _F15 / max_min
                    for j in range(16):
                        q[j] = (q[j] | (nearest_int(iscale * the_min[k0 + j]) << 4)) & 0xFF
                    m_all = put_fp16(out, b, 82, max_min / _F15)
                else:
                    m_all = put_fp16(out, b, 82, F0)
            _finish_q2(xf, b * QK_K, out, b, d_all, m_all, L, q, dv, mv)


# -- Q3_K: 16 sub-blocks of 16, 6-bit signed scales, 3-bit quants (110 bytes) ----------------------


@njit(**JIT)
def _q3_k_ref(xf, out):
    """quantize_row_q3_K_ref: make_q3_quants per sub-block, scales to 6 bits against the largest."""
    n_blocks = out.shape[0]
    per = LANES // 16
    xt = np.empty((16, LANES), np.float32)
    Lt = np.empty((16, LANES), np.float32)
    scale = np.empty(LANES, np.float32)
    L = np.zeros(QK_K, np.int64)
    ls = np.zeros(16, np.int64)
    q = np.zeros(12, np.int64)
    dv = np.zeros(QK_K, np.float32)
    mv = np.zeros(QK_K, np.float32)
    for g0 in range(0, n_blocks, per):
        ng = min(per, n_blocks - g0)
        nl = ng * 16
        _gather(xf, g0 * 16, nl, xt)
        q3_lanes(xt, nl, scale, Lt)
        for gi in range(ng):
            b = g0 + gi
            k0 = gi * 16
            _levels(Lt, k0, 16, L)
            max_scale = F0
            amax = F0
            for j in range(16):
                s = scale[k0 + j]
                if abs(s) > amax:
                    amax = abs(s)
                    max_scale = s
            if max_scale != F0:
                iscale = -_F32 / max_scale
                for j in range(16):
                    l = ((nearest_int(iscale * scale[k0 + j]) + 128) & 0xFF) - 128  # int8_t l
                    ls[j] = max(-32, min(31, l)) + 32
                _pack_q3_scales(ls, q)
                d_all = put_fp16(out, b, 108, _F1 / iscale)
            else:
                for j in range(12):
                    q[j] = 0
                d_all = put_fp16(out, b, 108, F0)
            _finish_q3(xf, b * QK_K, out, b, L, q, d_all, dv, mv)


@njit(**JIT)
def _q3_k_impl(xf, qw, out, nb):
    """quantize_row_q3_K_impl: make_qx_quants(16, 4) per sub-block with imatrix weights, then
    make_qx_quants(16, 32) on the 16 scales weighted by their sub-block's weight sums."""
    n_blocks = out.shape[0]
    per = LANES // 16
    xt = np.empty((16, LANES), np.float32)
    wt = np.empty((16, LANES), np.float32)
    Lt = np.empty((16, LANES), np.float32)
    scale = np.empty(LANES, np.float32)
    sw = np.empty(LANES, np.float32)
    L = np.zeros(QK_K, np.int64)
    ls = np.zeros(16, np.int64)
    q = np.zeros(12, np.int64)
    dv = np.zeros(QK_K, np.float32)
    mv = np.zeros(QK_K, np.float32)
    for g0 in range(0, n_blocks, per):
        ng = min(per, n_blocks - g0)
        nl = ng * 16
        _gather(xf, g0 * 16, nl, xt)
        _imatrix_lanes(xf, qw, nb, g0 * 16, nl, _F2, xt, wt, sw)
        qx_lanes(xt, wt, nl, 4, scale, Lt)
        for gi in range(ng):
            b = g0 + gi
            k0 = gi * 16
            _levels(Lt, k0, 16, L)
            d_block = make_qx_quants(16, 32, scale, k0, ls, 0, sw, k0)
            _pack_q3_scales(ls, q)
            d_all = put_fp16(out, b, 108, d_block)
            _finish_q3(xf, b * QK_K, out, b, L, q, d_all, dv, mv)


# -- Q4_K / Q5_K: 8 sub-blocks of 32, 6-bit scales and mins ----------------------------------------
# block_q4_K: d @0, dmin @2, scales[12] @4, qs[128] @16 (144 bytes)
# block_q5_K: d @0, dmin @2, scales[12] @4, qh[32] @16, qs[128] @48 (176 bytes)


@njit(**JIT)
def _qk45(xf, qw, out, nb, weighted, nmax, rmin, rdelta, nstep):
    """quantize_row_q4_K_ref (nmax 15, grid -1, 0.1, 20) / quantize_row_q5_K_ref (31, -0.5, 0.1,
    15): weights av_x + |x|, make_qkx2_quants, scales to 6 bits against the largest;
    quantize_row_q4_K_impl / _q5_K_impl (weighted): imatrix weights, make_qkx3_quants(.., -0.9,
    0.05, 36), make_qp_quants on the scales and mins (Q5_K clamps them to 63, Q4_K does not)."""
    n_blocks = out.shape[0]
    per = LANES // 8
    xt = np.empty((32, LANES), np.float32)
    wt = np.empty((32, LANES), np.float32)
    Lt = np.empty((32, LANES), np.float32)
    scale = np.empty(LANES, np.float32)
    the_min = np.empty(LANES, np.float32)
    sw = np.empty(LANES, np.float32)
    L = np.zeros(QK_K, np.int64)
    dv = np.zeros(QK_K, np.float32)
    mv = np.zeros(QK_K, np.float32)
    ls = np.zeros(8, np.int64)
    lm = np.zeros(8, np.int64)
    q = np.zeros(12, np.int64)
    for g0 in range(0, n_blocks, per):
        ng = min(per, n_blocks - g0)
        nl = ng * 8
        _gather(xf, g0 * 8, nl, xt)
        if weighted:
            _imatrix_lanes(xf, qw, nb, g0 * 8, nl, _F2, xt, wt, sw)
            qkx_lanes(xt, wt, nl, nmax, _M0_9, _D0_05, 36, False, scale, the_min, Lt)
        else:
            for k in range(nl):
                sw[k] = F0
            for i in range(32):
                for k in range(nl):
                    sw[k] += xt[i, k] * xt[i, k]
            for k in range(nl):
                sw[k] = np.sqrt(sw[k] / _F32)  # av_x
            for i in range(32):
                for k in range(nl):
                    wt[i, k] = sw[k] + abs(xt[i, k])
            qkx_lanes(xt, wt, nl, nmax, rmin, rdelta, nstep, False, scale, the_min, Lt)
        for gi in range(ng):
            b = g0 + gi
            k0 = gi * 8
            _levels(Lt, k0, 8, L)
            if weighted:
                d_val = make_qp_quants(8, 63, scale[k0:k0 + 8], ls, sw[k0:k0 + 8])
                m_val = make_qp_quants(8, 63, the_min[k0:k0 + 8], lm, sw[k0:k0 + 8])
                if nmax == 31:
                    for j in range(8):
                        ls[j] = min(63, ls[j])
                        lm[j] = min(63, lm[j])
            else:
                max_scale = F0
                max_min = F0
                for j in range(8):
                    if scale[k0 + j] > max_scale:
                        max_scale = scale[k0 + j]
                    if the_min[k0 + j] > max_min:
                        max_min = the_min[k0 + j]
                inv_scale = _F63 / max_scale if max_scale > F0 else F0
                inv_min = _F63 / max_min if max_min > F0 else F0
                for j in range(8):  # uint8_t ls = nearest_int(..); ls = MIN(63, ls)
                    ls[j] = min(63, nearest_int(inv_scale * scale[k0 + j]) & 0xFF)
                    lm[j] = min(63, nearest_int(inv_min * the_min[k0 + j]) & 0xFF)
                d_val = max_scale / _F63
                m_val = max_min / _F63
            _finish_k45(xf, b * QK_K, out, b, ls, lm, q, d_val, m_val, nmax, L, dv, mv)


# -- Q6_K: 16 sub-blocks of 16, int8 scales, 6-bit quants (210 bytes) ------------------------------


@njit(**JIT)
def _q6_k(xf, qw, out, nb, weighted):
    """quantize_row_q6_K_ref (weights x^2) / quantize_row_q6_K_impl (the raw imatrix as weights):
    make_qx_quants(16, 32) per sub-block, int8 scales against the largest |scale|."""
    n_blocks = out.shape[0]
    per = LANES // 16
    xt = np.empty((16, LANES), np.float32)
    wt = np.empty((16, LANES), np.float32)
    Lt = np.empty((16, LANES), np.float32)
    scale = np.empty(LANES, np.float32)
    L = np.zeros(QK_K, np.int64)
    dv = np.zeros(QK_K, np.float32)
    mv = np.zeros(QK_K, np.float32)
    for g0 in range(0, n_blocks, per):
        ng = min(per, n_blocks - g0)
        nl = ng * 16
        _gather(xf, g0 * 16, nl, xt)
        if weighted:
            for k in range(nl):
                s = g0 * 16 + k
                qo = ((s // 16) % nb) * QK_K + (s % 16) * 16
                for i in range(16):
                    wt[i, k] = qw[qo + i]
        else:
            for i in range(16):
                for k in range(nl):
                    wt[i, k] = xt[i, k] * xt[i, k]
        qx_lanes(xt, wt, nl, 32, scale, Lt)
        for gi in range(ng):
            b = g0 + gi
            k0 = gi * 16
            max_scale = F0
            max_abs_scale = F0
            for j in range(16):
                s = scale[k0 + j]
                if abs(s) > max_abs_scale:
                    max_abs_scale = abs(s)
                    max_scale = s
            if max_abs_scale < GROUP_MAX_EPS:
                for t in range(210):
                    out[b, t] = 0
                continue
            _levels(Lt, k0, 16, L)
            _finish_q6(xf, b * QK_K, out, b, L, scale, k0, max_scale, dv, mv)


# -- codecs ----------------------------------------------------------------------------------------

_NO_WEIGHTS = readonly(np.zeros(1, np.float32))


class _KQuant(GgufBacked):
    @classmethod
    def quantize_rows(cls, x, importance):
        rows, cols = x.shape
        out = np.zeros((rows * (cols // QK_K), cls.type_size), dtype=np.uint8)
        qw = _NO_WEIGHTS if importance is None else readonly(importance)
        cls._kernel(readonly(x.reshape(-1)), qw, out, cols // QK_K, importance is not None)
        return out.reshape(rows, cls.row_bytes(cols))


class Q2_K(_KQuant, ggml_type=Q.Q2_K):
    _kernel = staticmethod(_q2_k)
    dequant_kernel = staticmethod(dequant_q2_k)


class Q3_K(_KQuant, ggml_type=Q.Q3_K):
    dequant_kernel = staticmethod(dequant_q3_k)

    @staticmethod
    def _kernel(xf, qw, out, nb, weighted):
        if weighted:
            _q3_k_impl(xf, qw, out, nb)
        else:
            _q3_k_ref(xf, out)


class Q4_K(_KQuant, ggml_type=Q.Q4_K):
    dequant_kernel = staticmethod(dequant_q4_k)

    @staticmethod
    def _kernel(xf, qw, out, nb, weighted):
        _qk45(xf, qw, out, nb, weighted, 15, _M1_0, _D0_1, 20)


class Q5_K(_KQuant, ggml_type=Q.Q5_K):
    dequant_kernel = staticmethod(dequant_q5_k)

    @staticmethod
    def _kernel(xf, qw, out, nb, weighted):
        _qk45(xf, qw, out, nb, weighted, 31, _M0_5, _D0_1, 15)


class Q6_K(_KQuant, ggml_type=Q.Q6_K):
    _kernel = staticmethod(_q6_k)
    dequant_kernel = staticmethod(dequant_q6_k)
