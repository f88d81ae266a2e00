"""IQ1_S and IQ1_M: ternary lattice quants, byte-identical to ggml.

Ported from ggml-quants.c: `quantize_row_iq1_s_impl`, `quantize_row_iq1_m_impl`,
`iq1_find_best_neighbour2`, `iq1_sort_helper`. Values are -1, 0, 1 shifted by +-delta (0.125);
groups of 8 snap to one of the 2048 points of `iq1s_grid` (tables built in `iq2.py`, as both use
`iq2xs_init_impl`). The exact optimum of the 3-level split is found from prefix sums over the
values sorted ascending: glibc's qsort is a stable merge sort, so equal values keep index order.

    IQ1_S (50 bytes): d fp16 | grid low bytes[32] | u16[8]: 4x3 high bits | 3-bit scale << 12
                      | x_m bit << 15
    IQ1_M (56 bytes): grid low bytes[32] | qh[16]: 2x(3 high bits | x_m bit << 3)
                      | u16[4]: 4x 3-bit scales | one nibble of d fp16 << 12
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import njit

from quantcli.codecs._ggml_math import F0, F1, JIT, f32_bits, fp32_to_fp16, nearest_int, readonly
from quantcli.codecs.gguf_backed import GgufBacked
from quantcli.codecs.iq2 import FLT_MAX, HALF, F256, grid_tables

DELTA = np.float32(0.125)  # IQ1S_DELTA == IQ1M_DELTA
# x_p = {-1 + delta, delta, 1 + delta} (row 0), x_m = {-1 - delta, -delta, 1 - delta} (row 1)
XX = np.array([[-F1 + DELTA, DELTA, F1 + DELTA], [-F1 - DELTA, -DELTA, F1 - DELTA]], dtype=np.float32)
_XP = (XX[0, 0], XX[0, 1], XX[0, 2])
_XM = (XX[1, 0], XX[1, 1], XX[1, 2])
# quantize_row_iq1_m_impl's level differences (float32 products and differences, as in C)
_CP1 = XX[0, 0] * XX[0, 0] - XX[0, 1] * XX[0, 1]
_CP2 = XX[0, 1] * XX[0, 1] - XX[0, 2] * XX[0, 2]
_CM1 = XX[1, 0] * XX[1, 0] - XX[1, 1] * XX[1, 1]
_CM2 = XX[1, 1] * XX[1, 1] - XX[1, 2] * XX[1, 2]
F15 = np.float32(15.0)
GROUP_MAX_EPS_IQ1_S = np.float32(1e-12)
GROUP_MAX_EPS_IQ1_M = np.float32(1e-7)
IQ1M_MASKS = (0x00, 0x80, 0x08, 0x88)  # qh bits telling which halves use x_m


@njit(**JIT)
def sort_indices(x, r, xo, n, idx, key):
    """as qsort(pairs, n, 2*sizeof(float), iq1_sort_helper): idx <- 0..n-1 by ascending x, stably
    (glibc sorts with merge sort; -0.0 and 0.0 compare equal, as in the comparator).

    Each value's rank is counted with branch-free compares (vectorized) of unique integer keys:
    the float's bits mapped to an order-preserving unsigned value (x + 0 turns -0.0 into 0.0),
    then its index, so ties keep index order. An insertion sort mispredicts a branch per step."""
    for j in range(n):
        b = f32_bits(x[r, xo + j] + F0)
        b ^= 0xFFFFFFFF if b >> 31 else 0x80000000  # negatives reversed, below the positives
        key[j] = (b << 6) | j
    for j in range(n):
        rank = 0
        kj = key[j]
        for i in range(n):
            rank += key[i] < kj
        idx[rank] = j


@njit(**JIT)
def find_best_neighbour2(t_neigh, off, t_levels, x, r, xo, weight, wo, scale, xx, L, lo):
    """as iq1_find_best_neighbour2: the listed grid point minimising sum w*(scale*xx[l] - x)^2 over
    x[r, xo:xo+8]; writes its levels to L[lo:lo+8] and returns its index. (C's fallback full-grid
    scan only runs when every distance is Inf/NaN, i.e. for inputs that overflow fp16 anyway.)"""
    best_d2 = FLT_MAX
    best = -1
    off = np.uintp(off)  # unsigned indices: no wrap-around branch
    for j in range(1, t_neigh[off] + 1):
        g = t_neigh[off + np.uintp(j)]
        d2 = F0
        for i in range(8):
            q = xx[np.uintp(t_levels[g, i])]
            w = weight[wo + i]
            diff = scale * q - x[r, xo + i]
            d2 += w * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            best = g
    for i in range(8):
        L[lo + i] = t_levels[best, i]
    return best


@njit(**JIT)
def _fill(x, r, xo, n, qw, sigma2, weight):
    """weight = qw * sqrtf(sigma2 + x^2), or x^2 without importance (IQ1_M only)."""
    for i in range(n):
        xi = x[r, xo + i]
        if qw is None:
            weight[i] = xi * xi
        else:
            weight[i] = qw[xo + i] * np.sqrt(sigma2 + xi * xi)


@njit(**JIT)
def _absmax(x, r, xo, n):
    m = abs(x[r, xo])
    for i in range(1, n):
        a = abs(x[r, xo + i])
        m = m if m > a else a
    return m


@njit(**JIT)
def _split_levels(idx, n, i1, i2, L):
    """L[idx[j]] = 0, 1, 2 for sorted position j below i1, below i2, from i2 on."""
    for j in range(n):
        L[idx[j]] = 0 if j < i1 else (1 if j < i2 else 2)


@njit(**JIT)
def _snap_groups(x, r, xb, ngroups, weight, scale, L, xsel, index, kmap, t_neigh, t_levels):
    """Grid index of each group of 8 levels, the best neighbour when off grid; True if all on grid.
    xsel[k] picks x_p (0) or x_m (1) for group k."""
    all_on_grid = True
    for k in range(ngroups):
        u = 0
        for j in range(8):
            u |= L[8 * k + j] << (2 * j)
        gi = kmap[u]
        if gi < 0:
            all_on_grid = False
            gi = find_best_neighbour2(t_neigh, -gi - 1, t_levels, x, r, xb + 8 * k, weight, 8 * k,
                                      scale, XX[xsel[k]], L, 8 * k)
        index[k] = gi
    return all_on_grid


@njit(**JIT)
def _refit(x, r, xb, ngroups, weight, scale, xsel, index, t_levels):
    """scale = sum w*q*x / sum w*q*q over the chosen grid points, if both are positive."""
    sumqx = F0
    sumq2 = F0
    for k in range(ngroups):
        xx = XX[xsel[k]]
        for j in range(8):
            w = weight[8 * k + j]
            q = xx[t_levels[index[k], j]]
            sumqx += w * q * x[r, xb + 8 * k + j]
            sumq2 += w * q * q
    return sumqx / sumq2 if sumqx > F0 and sumq2 > F0 else scale


# -- IQ1_S -----------------------------------------------------------------------------------------
# The split searches below score every (i1, i2, shift) in C's order, keeping the first that beats
# the best so far. For one i1, all i2 are first scored at once (a vectorized loop, each sum in
# C's float order) only to learn whether any of them beats the best so far: if none does, C's
# sequential pass over them changes nothing and is skipped; else it runs, recomputing the same
# sums. Few i1 improve on the best, so most of the search runs in vector lanes.
@njit(**JIT)
def _iq1_s_sums(a, b, c, aw, bw, cw):
    """sumqx, sumq2 for x_p (shift +1), then for x_m (shift -1), as quantize_row_iq1_s_impl."""
    p0, p1, p2 = _XP
    m0, m1, m2 = _XM
    return (a * p0 + b * p1 + c * p2, aw * p0 * p0 + bw * p1 * p1 + cw * p2 * p2,
            a * m0 + b * m1 + c * m2, aw * m0 * m0 + bw * m1 * m1 + cw * m2 * m2)


@njit(**JIT)
def _iq1_s_split(x, r, xb, weight, idx, key, sumx, sumw):
    """Exhaustive search of the two split points over the sorted values (sub-block of 32), for
    both shifts. Returns (scale, i1, i2, shift), shift 0 when nothing qualified."""
    sort_indices(x, r, xb, 32, idx, key)
    sumx[0] = F0
    sumw[0] = F0
    for j in range(32):
        i = idx[j]
        sumx[j + 1] = sumx[j] + weight[i] * x[r, xb + i]
        sumw[j + 1] = sumw[j] + weight[i]
    best_score = -FLT_MAX
    scale = _absmax(x, r, xb, 32)
    besti1 = -1
    besti2 = -1
    best_shift = 0
    for i1 in range(33):
        a = sumx[i1] - sumx[0]
        aw = sumw[i1] - sumw[0]
        hit = False
        for i2 in range(33):  # a fixed trip count vectorizes better; i2 < i1 are masked off
            qx_p, q2_p, qx_m, q2_m = _iq1_s_sums(a, sumx[i2] - sumx[i1], sumx[32] - sumx[i2],
                                                 aw, sumw[i2] - sumw[i1], sumw[32] - sumw[i2])
            hit |= (i2 >= i1) & (((q2_p > F0) & (qx_p * qx_p > best_score * q2_p))
                                 | ((q2_m > F0) & (qx_m * qx_m > best_score * q2_m)))
        if not hit:
            continue
        for i2 in range(i1, 33):
            sums = _iq1_s_sums(a, sumx[i2] - sumx[i1], sumx[32] - sumx[i2],
                               aw, sumw[i2] - sumw[i1], sumw[32] - sumw[i2])
            for s in range(2):
                sumqx = sums[2 * s]
                sumq2 = sums[2 * s + 1]
                if sumq2 > F0 and sumqx * sumqx > best_score * sumq2:
                    scale = sumqx / sumq2
                    best_score = scale * sumqx
                    besti1 = i1
                    besti2 = i2
                    best_shift = 1 - 2 * s
    return scale, besti1, besti2, best_shift


@njit(**JIT)
def _iq1_s_rows(x, qw, kmap, t_neigh, t_levels, out):
    # (rows, cols) -> (rows, cols // 256 * 50), as quantize_iq1_s
    rows, cols = x.shape
    weight = np.empty(32, np.float32)
    sumx = np.empty(33, np.float32)
    sumw = np.empty(33, np.float32)
    idx = np.empty(32, np.int64)
    key = np.empty(32, np.int64)
    L = np.zeros(32, np.int64)
    index = np.zeros(4, np.int64)
    xsel = np.zeros(4, np.int64)
    scales = np.empty(8, np.float32)
    shifts = np.empty(8, np.int64)
    qh = np.zeros(8, np.int64)
    for r in range(rows):
        for ibl in range(cols // 256):
            xo = 256 * ibl
            o = 50 * ibl
            qh[:] = 0
            max_scale = F0
            sumx2 = F0
            for i in range(256):
                sumx2 += x[r, xo + i] * x[r, xo + i]
            sigma2 = np.float32(2.0) * sumx2 / F256
            for ib in range(8):
                xb = xo + 32 * ib
                _fill(x, r, xb, 32, qw, sigma2, weight)
                scales[ib] = F0
                shifts[ib] = 1
                if _absmax(x, r, xb, 32) < GROUP_MAX_EPS_IQ1_S:
                    continue
                scale, i1, i2, shift = _iq1_s_split(x, r, xb, weight, idx, key, sumx, sumw)
                if i1 < 0 or i2 < 0 or shift == 0:
                    continue
                _split_levels(idx, 32, i1, i2, L)
                if scale < F0:
                    for j in range(32):
                        L[j] = 2 - L[j]
                    scale = -scale
                    shift = -shift
                xsel[:] = 0 if shift == 1 else 1
                on_grid = _snap_groups(x, r, xb, 4, weight, scale, L, xsel, index,
                                       kmap, t_neigh, t_levels)
                if not on_grid:
                    scale = _refit(x, r, xb, 4, weight, scale, xsel, index, t_levels)
                h = 0
                for k in range(4):
                    out[r, o + 2 + 4 * ib + k] = index[k] & 255
                    h |= (index[k] >> 8) << (3 * k)
                qh[ib] = h
                scales[ib] = scale
                shifts[ib] = shift
                max_scale = max_scale if max_scale > scale else scale
            if max_scale != F0:
                d = max_scale / F15
                hd = fp32_to_fp16(d * np.float32(1.125))
                out[r, o] = hd & 0xFF
                out[r, o + 1] = hd >> 8
                iscale = F1 / d
                for ib in range(8):
                    l = max(0, min(7, nearest_int(HALF * (iscale * scales[ib] - F1))))
                    if shifts[ib] == -1:
                        l |= 8
                    qh[ib] |= l << 12
            for ib in range(8):
                out[r, o + 34 + 2 * ib] = qh[ib] & 0xFF
                out[r, o + 35 + 2 * ib] = qh[ib] >> 8


# -- IQ1_M -----------------------------------------------------------------------------------------
@njit(**JIT)
def _iq1_m_sums(tx0, tx1, tw0, tw1, sx0, sx1, w01, w02, w11, w12):
    """sumqx, sumq2 of the 4 shift combinations (0: +,+  1: +,-  2: -,+  3: -,-  for the first
    and second half), from the prefix sums as quantize_row_iq1_m_impl."""
    p2 = _XP[2]
    m2 = _XM[2]
    qx_p0 = tx0 * p2 - sx0
    qx_m0 = tx0 * m2 - sx0
    qx_p1 = tx1 * p2 - sx1
    qx_m1 = tx1 * m2 - sx1
    q2_p0 = tw0 * p2 * p2 + w01 * _CP1 + w02 * _CP2
    q2_m0 = tw0 * m2 * m2 + w01 * _CM1 + w02 * _CM2
    q2_p1 = tw1 * p2 * p2 + w11 * _CP1 + w12 * _CP2
    q2_m1 = tw1 * m2 * m2 + w11 * _CM1 + w12 * _CM2
    return (qx_p0 + qx_p1, q2_p0 + q2_p1, qx_p0 + qx_m1, q2_p0 + q2_m1,
            qx_m0 + qx_p1, q2_m0 + q2_p1, qx_m0 + qx_m1, q2_m0 + q2_m1)


@njit(**JIT)
def _iq1_m_split(x, r, xb, weight, idx, key, px, pw):
    """The split search of quantize_row_iq1_m_impl (sub-block of 16, each half of 8 with its own
    shift): prefix sums per half, 4 sign combinations. Returns (scale, i1, i2, best_k)."""
    sort_indices(x, r, xb, 16, idx, key)
    px[0, 0] = F0
    px[1, 0] = F0
    pw[0, 0] = F0
    pw[1, 0] = F0
    for j in range(16):
        i = idx[j]
        h = 0 if i < 8 else 1
        px[h, j + 1] = px[h, j] + weight[i] * x[r, xb + i]
        px[1 - h, j + 1] = px[1 - h, j]
        pw[h, j + 1] = pw[h, j] + weight[i]
        pw[1 - h, j + 1] = pw[1 - h, j]
    px0, px1, pw0, pw1 = px[0], px[1], pw[0], pw[1]
    tx0, tx1, tw0, tw1 = px0[16], px1[16], pw0[16], pw1[16]
    best_score = -FLT_MAX
    scale = _absmax(x, r, xb, 16)
    besti1 = -1
    besti2 = -1
    best_k = -1
    for i1 in range(17):
        hit = False  # as in _iq1_s_split
        for i2 in range(17):
            s = _iq1_m_sums(tx0, tx1, tw0, tw1, px0[i1] + px0[i2], px1[i1] + px1[i2],
                            pw0[i1], pw0[i2], pw1[i1], pw1[i2])
            hit |= (i2 >= i1) & (((s[1] > F0) & (s[0] * s[0] > best_score * s[1]))
                                 | ((s[3] > F0) & (s[2] * s[2] > best_score * s[3]))
                                 | ((s[5] > F0) & (s[4] * s[4] > best_score * s[5]))
                                 | ((s[7] > F0) & (s[6] * s[6] > best_score * s[7])))
        if not hit:
            continue
        for i2 in range(i1, 17):
            s = _iq1_m_sums(tx0, tx1, tw0, tw1, px0[i1] + px0[i2], px1[i1] + px1[i2],
                            pw0[i1], pw0[i2], pw1[i1], pw1[i2])
            for k in range(4):
                sumqx = s[2 * k]
                sumq2 = s[2 * k + 1]
                if sumq2 > F0 and sumqx * sumqx > best_score * sumq2:
                    scale = sumqx / sumq2
                    best_score = scale * sumqx
                    besti1 = i1
                    besti2 = i2
                    best_k = k
    return scale, besti1, besti2, best_k


@njit(**JIT)
def _iq1_m_rows(x, qw, kmap, t_neigh, t_levels, out):
    # (rows, cols) -> (rows, cols // 256 * 56), as quantize_iq1_m
    rows, cols = x.shape
    weight = np.empty(16, np.float32)
    px = np.empty((2, 17), np.float32)
    pw = np.empty((2, 17), np.float32)
    idx = np.empty(16, np.int64)
    key = np.empty(16, np.int64)
    L = np.zeros(16, np.int64)
    index = np.zeros(2, np.int64)
    xsel = np.zeros(2, np.int64)
    scales = np.empty(16, np.float32)
    shifts = np.empty(16, np.int64)
    sc = np.zeros(4, np.int64)
    for r in range(rows):
        for ibl in range(cols // 256):
            xo = 256 * ibl
            o = 56 * ibl
            max_scale = F0
            sumx2 = F0
            for i in range(256):
                sumx2 += x[r, xo + i] * x[r, xo + i]
            sigma2 = np.float32(2.0) * sumx2 / F256
            for ib in range(16):
                xb = xo + 16 * ib
                _fill(x, r, xb, 16, qw, sigma2, weight)
                scales[ib] = F0
                shifts[ib] = 0
                if _absmax(x, r, xb, 16) < GROUP_MAX_EPS_IQ1_M:
                    continue
                scale, i1, i2, best_k = _iq1_m_split(x, r, xb, weight, idx, key, px, pw)
                if i1 < 0 or i2 < 0 or best_k < 0:
                    continue
                _split_levels(idx, 16, i1, i2, L)
                if scale < F0:
                    for j in range(16):
                        L[j] = 2 - L[j]
                    scale = -scale
                    best_k = 3 - best_k
                xsel[0] = 0 if best_k < 2 else 1
                xsel[1] = 0 if best_k % 2 == 0 else 1
                on_grid = _snap_groups(x, r, xb, 2, weight, scale, L, xsel, index,
                                       kmap, t_neigh, t_levels)
                if not on_grid:
                    scale = _refit(x, r, xb, 2, weight, scale, xsel, index, t_levels)
                out[r, o + 2 * ib] = index[0] & 255
                out[r, o + 2 * ib + 1] = index[1] & 255
                out[r, o + 32 + ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
                scales[ib] = scale
                shifts[ib] = best_k
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == F0:
                continue
            _iq1_m_tail(x, r, xo, o, qw, sigma2, max_scale, scales, shifts, weight, sc,
                        t_levels, out)


@njit(**JIT)
def _iq1_m_tail(x, r, xo, o, qw, sigma2, max_scale, scales, shifts, weight, sc, t_levels, out):
    """3-bit sub-block scales, then the super-block scale refitted over all 256 values and stored
    as fp16(d * 1.1125) in the top nibbles of the four scale words."""
    sc[:] = 0
    d = max_scale / F15
    iscale = F1 / d
    sumqx = F0
    sumq2 = F0
    for ib in range(16):
        l = max(0, min(7, nearest_int(HALF * (iscale * scales[ib] - F1))))
        sc[ib // 4] |= l << (3 * (ib % 4))
        out[r, o + 32 + ib] |= IQ1M_MASKS[shifts[ib]]
        xb = xo + 16 * ib
        _fill(x, r, xb, 16, qw, sigma2, weight)
        ql = np.float32(2 * l + 1)
        for k in range(2):
            xx = XX[0 if (shifts[ib] < 2 if k == 0 else shifts[ib] % 2 == 0) else 1]
            g = out[r, o + 2 * ib + k] + ((out[r, o + 32 + ib] >> (4 * k)) & 7) * 256
            for j in range(8):
                w = weight[8 * k + j]
                q = xx[t_levels[g, j]] * ql
                sumqx += w * q * x[r, xb + 8 * k + j]
                sumq2 += w * q * q
    if sumq2 > F0:
        d = sumqx / sumq2
    s = fp32_to_fp16(d * np.float32(1.1125))
    sc[0] |= (s & 0x000F) << 12
    sc[1] |= (s & 0x00F0) << 8
    sc[2] |= (s & 0x0F00) << 4
    sc[3] |= s & 0xF000
    for i in range(4):
        out[r, o + 48 + 2 * i] = sc[i] & 0xFF
        out[r, o + 49 + 2 * i] = (sc[i] >> 8) & 0xFF


def _tables():
    t = grid_tables(Q.IQ1_S)  # IQ1_M shares IQ1_S's grid and neighbour lists (iq2_data_index 2)
    return t.kmap, t.neighbours, t.levels


class IQ1_S(GgufBacked, ggml_type=Q.IQ1_S):
    requires_importance = True  # quantize_row_iq1_s_impl: GGML_ASSERT(quant_weights)

    @classmethod
    def quantize_rows(cls, x, importance):
        out = np.zeros((x.shape[0], cls.row_bytes(x.shape[1])), dtype=np.uint8)
        _iq1_s_rows(readonly(x), readonly(importance), *_tables(), out)
        return out


class IQ1_M(GgufBacked, ggml_type=Q.IQ1_M):
    @classmethod
    def quantize_rows(cls, x, importance):
        out = np.zeros((x.shape[0], cls.row_bytes(x.shape[1])), dtype=np.uint8)
        _iq1_m_rows(readonly(x), readonly(importance), *_tables(), out)
        return out
