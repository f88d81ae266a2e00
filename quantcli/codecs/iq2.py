"""IQ2_XXS, IQ2_XS, IQ2_S: 2-bit lattice ("grid") quants, byte-identical to ggml.

Ported from ggml-quants.c: `iq2xs_init_impl` (grid, kmap, neighbour lists),
`iq2_find_best_neighbour` and `quantize_row_iq2_{xxs,xs,s}_impl`. Groups of 8 magnitudes snap to
one of 256/512/1024 points of {1,3,5}^8 (levels l in {0,1,2}, value 2l+1); signs are stored apart.
`iq1.py` reuses the grid tables built here.

    IQ2_XXS (66 bytes): d fp16 | u32[16]: per 32 values, 4 grid bytes; 4x7 sign bits | scale << 28
    IQ2_XS  (74 bytes): d fp16 | u16[32]: grid 9 bits | 7 sign bits << 9 | scales[8] (nibbles)
    IQ2_S   (82 bytes): d fp16 | grid low bytes[32] | signs[32] | qh[8] (2 bits each) | scales[8]
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq
from numba import njit

from quantcli.codecs._ggml_math import (
    F0,
    F1,
    GROUP_MAX_EPS,
    JIT,
    fp32_to_fp16,
    make_qp_quants,
    nearest_int,
    readonly,
)
from quantcli.codecs.gguf_backed import GgufBacked

KMAP_SIZE = 43692  # iq2xs_init_impl: kmap_size, one slot per 8 levels packed 2 bits each
FLT_MAX = np.float32(3.4028234663852886e38)
HALF = np.float32(0.5)
F0_1 = np.float32(0.1)
F3 = np.float32(3.0)
F5 = np.float32(5.0)  # 2*kMaxQ - 1
F31 = np.float32(31.0)
F256 = np.float32(256.0)  # QK_K
GROUP_MAX_EPS_IQ2_S = np.float32(1e-8)


# -- grid tables, as iq2xs_init_impl ---------------------------------------------------------------
class GridTables(NamedTuple):
    levels: np.ndarray  # (n, 8) int8: l in {0,1,2} of each grid point (C stores 2l+1)
    slots: np.ndarray  # (n, 8) uint8: 4i + l, where position i at level l sits in a table of terms
    kmap: np.ndarray  # (KMAP_SIZE,) int32: grid index, or -(offset+1) into neighbours when off grid
    neighbours: np.ndarray  # uint16: at each offset a count, then that many grid indices


def kgrid(cls: type) -> np.ndarray:
    """The `kgrid_*` uint16 table of iq2xs_init_impl: gguf's grid hex packs the same 2-bit levels,
    8 per point, lowest bits first (checked equal to kgrid_2bit_256/512/1024, kgrid_1bit_2048)."""
    return np.frombuffer(bytes.fromhex(cls.grid_hex.decode()), dtype="<u2")


@njit(**JIT)
def _neighbour_list(u, levels, nwant, d2, out, pos):
    """The grid points nearest to the off-grid point u, as iq2xs_init_impl: sorted by (distance,
    index), every point of the `nwant` smallest distances. Writes count + indices at out[pos:]
    when out is given; returns the count."""
    n = levels.shape[0]
    hist = np.zeros(8 * 4 + 1, dtype=np.int64)  # squared level distances are <= 8 * 2^2
    for j in range(n):
        d = 0
        for k in range(8):
            diff = levels[j, k] - ((u >> (2 * k)) & 3)
            d += diff * diff  # C compares (2l+1) values: 4x these, the same order
        d2[j] = d
        hist[d] += 1
    count = 0
    have = 0
    for d in range(hist.size):
        if hist[d] == 0:
            continue
        if out is not None:
            for j in range(n):
                if d2[j] == d:
                    out[pos + 1 + count] = j
                    count += 1
        else:
            count += hist[d]
        have += 1
        if have == nwant:
            break
    if out is not None:
        out[pos] = count
    return count


@njit(**JIT)
def _build_tables(kgrid_, nwant):
    n = kgrid_.size
    levels = np.empty((n, 8), dtype=np.int8)
    kmap = np.full(KMAP_SIZE, -1, dtype=np.int32)
    for j in range(n):
        for k in range(8):
            levels[j, k] = (kgrid_[j] >> (2 * k)) & 3
        kmap[kgrid_[j]] = j
    # the quantizers clamp levels to {0,1,2}, so only those 3^8 points are ever looked up
    # (C also builds lists for points with a level 3; they are unreachable)
    reachable = np.zeros(KMAP_SIZE, dtype=np.bool_)
    for u in range(KMAP_SIZE):
        ok = kmap[u] < 0
        for k in range(8):
            ok = ok and ((u >> (2 * k)) & 3) != 3
        reachable[u] = ok
    d2 = np.empty(n, dtype=np.int64)
    total = 0
    for u in range(KMAP_SIZE):
        if reachable[u]:
            total += 1 + _neighbour_list(u, levels, nwant, d2, None, 0)
    neighbours = np.empty(total, dtype=np.uint16)
    pos = 0
    for u in range(KMAP_SIZE):
        if reachable[u]:
            kmap[u] = -(pos + 1)
            pos += 1 + _neighbour_list(u, levels, nwant, d2, neighbours, pos)
    slots = (4 * np.arange(8) + levels).astype(np.uint8)
    return levels, slots, kmap, neighbours


@lru_cache(maxsize=None)
def grid_tables(qtype: Q) -> GridTables:
    """iq2xs_init_impl(type): the grid, kmap and neighbour lists (nwant 2, 2, 1, 3 for IQ2_XXS,
    IQ2_XS, IQ2_S, IQ1_S/IQ1_M)."""
    cls, nwant = {
        Q.IQ2_XXS: (gq.IQ2_XXS, 2),
        Q.IQ2_XS: (gq.IQ2_XS, 2),
        Q.IQ2_S: (gq.IQ2_S, 1),
        Q.IQ1_S: (gq.IQ1_S, 3),
        Q.IQ1_M: (gq.IQ1_S, 3),
    }[qtype]
    return GridTables(*_build_tables(kgrid(cls), nwant))


# -- shared pieces of the three quantizers ---------------------------------------------------------
# The hot loop (_search) is written out in one function: numba passes each array argument as a
# dozen words, and inline="always" adds reference counting, so small helpers there cost 2x.
@njit(**JIT)
def _search(xval, weight, waux, LL, og, term, n, base, is_lo, is_hi, scale, resnap_all,
            kmap, t_neigh, t_slots, t_levels):
    """The scale search of quantize_row_iq2_{xxs,xs,s}_impl for a sub-block of n = 32 or 16 values
    (n/8 grid points); `scale` is C's starting scale. Returns the scale; LL[0, :n] <- the levels.

    For each id = (5 + 0.1*is)/base, is in [is_lo, is_hi]: l = clamp(nearest_int(0.5*(id*x - 1)),
    0, 2), a group off the grid replaced by its best neighbour (iq2_find_best_neighbour at scale
    1/id); keep the levels maximising (sum w*x*q)^2 / sum w*q^2, q = 2l+1. Then snap once more at
    the best scale, every group (IQ2_XXS) or only those that were off the grid (XS, S), and refit.
    LL (2, 32) int64 and og (2, 4) bool: row 0 the best, row 1 the current try; term (32,) float32.
    """
    ngroups = n // 8
    for i in range(n):
        LL[0, i] = 0
    for k in range(ngroups):
        og[0, k] = True
    best = F0
    nsteps = is_hi - is_lo + 1
    for step in range(nsteps + 1):
        if step < nsteps:
            iscale = (F5 + np.float32(is_lo + step) * F0_1) / base
            nscale = F1 / iscale
            dst = 1
        else:
            off_grid = resnap_all
            for k in range(ngroups):
                off_grid = off_grid or not og[0, k]
            if not off_grid or not scale > F0:
                break
            iscale = F1 / scale
            nscale = scale
            dst = 0
        for k in range(ngroups):
            if dst == 0 and not resnap_all and og[0, k]:
                continue
            u = 0
            for i in range(8):
                l = max(0, min(2, nearest_int(HALF * (iscale * xval[8 * k + i] - F1))))
                LL[dst, 8 * k + i] = l
                u |= l << (2 * i)
            og[1, k] = kmap[u] >= 0
            if og[1, k]:
                continue
            # iq2_find_best_neighbour: min sum waux*(nscale*q - x)^2 over the listed points.
            # A term takes one of 3 values per position (q = 1, 3, 5): computed once here with
            # C's float ops, a neighbour then sums 8 looked-up terms in C's order
            for i in range(8):
                xi = xval[8 * k + i]
                wi = waux[8 * k + i]
                for l in range(3):
                    diff = nscale * np.float32(2 * l + 1) - xi
                    term[4 * i + l] = wi * diff * diff
            off = np.uintp(-kmap[u] - 1)  # unsigned indices: no wrap-around branch
            best_d2 = FLT_MAX
            gi = -1
            for j in range(1, t_neigh[off] + 1):
                g = t_neigh[off + np.uintp(j)]
                d2 = F0
                for i in range(8):
                    d2 += term[t_slots[g, i]]
                if d2 < best_d2:
                    best_d2 = d2
                    gi = g
            for i in range(8):
                LL[dst, 8 * k + i] = t_levels[gi, i]
        sumqx = F0
        sumq2 = F0
        for i in range(n):
            w = weight[i]
            q = np.float32(2 * LL[dst, i] + 1)
            sumqx += w * xval[i] * q
            sumq2 += w * q * q
        if dst == 0:
            if sumq2 > F0:
                scale = sumqx / sumq2
        elif sumq2 > F0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(n):
                LL[0, i] = LL[1, i]
            for k in range(ngroups):
                og[0, k] = og[1, k]
    return scale


@njit(**JIT)
def _fill(x, r, xo, n, qw, sigma2, weight, waux, no_qw_w):
    """weight = qw * sqrtf(sigma2 + x^2) (no_qw_w*sigma2 + x^2 without importance); waux = sqrt."""
    for i in range(n):
        xi = x[r, xo + i]
        if qw is None:
            weight[i] = no_qw_w * sigma2 + xi * xi
        else:
            weight[i] = qw[xo + i] * np.sqrt(sigma2 + xi * xi)
    for i in range(n):
        waux[i] = np.sqrt(weight[i])


@njit(**JIT)
def _abs_and_signs(x, r, xo, n, weight, xval, signs, even):
    """xval = |x| for n values; signs[k] <- the sign bits of group k. With `even` (IQ2_XXS/XS
    store 7 sign bits), an odd number of negatives is made even by flipping the smallest w*x^2."""
    for k in range(n // 8):
        nflip = 0
        s = 0
        for i in range(8):
            xi = x[r, xo + 8 * k + i]
            if xi >= F0:
                xval[8 * k + i] = xi
            else:
                xval[8 * k + i] = -xi
                nflip += 1
                s |= 1 << i
        if even and nflip % 2:
            imin = 0
            xi = x[r, xo + 8 * k]
            vmin = weight[8 * k] * xi * xi
            for i in range(1, 8):
                xi = x[r, xo + 8 * k + i]
                ax = weight[8 * k + i] * xi * xi
                if ax < vmin:
                    vmin = ax
                    imin = i
            xval[8 * k + imin] = -xval[8 * k + imin]
            s ^= 1 << imin
        signs[k] = s & 127 if even else s


@njit(**JIT)
def _sumx2(x, r, xo):
    s = F0
    for i in range(256):
        s += x[r, xo + i] * x[r, xo + i]
    return s


@njit(**JIT)
def _vmax(xval, n):
    m = xval[0]
    for i in range(1, n):
        m = m if m > xval[i] else xval[i]  # MAX(max, xval[i])
    return m


@njit(**JIT)
def _grid_index(LL, k, kmap):
    u = 0
    for i in range(8):
        u |= LL[0, 8 * k + i] << (2 * i)
    return kmap[u]


# -- IQ2_XXS ---------------------------------------------------------------------------------------
@njit(**JIT)
def _iq2_xxs_rows(x, qw, kmap, t_neigh, t_slots, t_levels, out):
    # (rows, cols) -> (rows, cols // 256 * 66), as quantize_iq2_xxs
    rows, cols = x.shape
    weight = np.empty(32, np.float32)
    waux = np.empty(32, np.float32)
    xval = np.empty(32, np.float32)
    LL = np.zeros((2, 32), np.int64)
    og = np.zeros((2, 4), np.bool_)
    term = np.zeros(32, np.float32)
    Lu8 = np.zeros(32, np.uint8)
    scales = np.empty(8, np.float32)
    q2 = np.zeros(16, np.int64)  # uint32 q2[16]
    signs = np.zeros(4, np.int64)
    for r in range(rows):
        for ibl in range(cols // 256):
            xo = 256 * ibl
            o = 66 * ibl
            q2[:] = 0
            max_scale = F0
            sigma2 = _sumx2(x, r, xo) / F256
            for ib in range(8):
                xb = xo + 32 * ib
                scales[ib] = F0
                _fill(x, r, xb, 32, qw, sigma2, weight, waux, F0)
                _abs_and_signs(x, r, xb, 32, weight, xval, signs, True)
                if _vmax(xval, 32) < GROUP_MAX_EPS:
                    continue
                scale = make_qp_quants(32, 4, xval, Lu8, weight)
                eff_max = scale * F3
                if eff_max <= F0:
                    continue
                scale = _search(xval, weight, waux, LL, og, term, 32, eff_max, -6, 6, scale, True,
                                kmap, t_neigh, t_slots, t_levels)
                if scale < F0:  # "should never happen": flip the scale and the signs
                    scale = -scale
                    for k in range(4):
                        signs[k] = ~signs[k] & 127
                for k in range(4):
                    q2[2 * ib] |= _grid_index(LL, k, kmap) << (8 * k)
                    q2[2 * ib + 1] |= signs[k] << (7 * k)
                scales[ib] = scale
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == F0:
                continue  # d = 0, qs = 0
            d = max_scale / F31
            h = fp32_to_fp16(d)
            out[r, o] = h & 0xFF
            out[r, o + 1] = h >> 8
            iscale = F1 / d
            for ib in range(8):
                l = max(0, min(15, nearest_int(HALF * (iscale * scales[ib] - F1))))
                q2[2 * ib + 1] |= l << 28
            for j in range(16):
                for b in range(4):
                    out[r, o + 2 + 4 * j + b] = (q2[j] >> (8 * b)) & 0xFF


# -- IQ2_XS and IQ2_S: sub-blocks of 16, two grid points each --------------------------------------
@njit(**JIT)
def _put_nibble_scales(out, r, at, scales, d):
    """l = clamp(nearest_int(0.5*(scale/d - 1)), 0, 15), two per byte, as the XS/S tails."""
    iscale = F1 / d
    for ib in range(16):
        l = max(0, min(15, nearest_int(HALF * (iscale * scales[ib] - F1))))
        if ib % 2 == 0:
            out[r, at + ib // 2] = l
        else:
            out[r, at + ib // 2] |= l << 4


@njit(**JIT)
def _iq2_16_rows(x, qw, is_s, kmap, t_neigh, t_slots, t_levels, out):
    # (rows, cols) -> (rows, cols // 256 * (74 or 82)), as quantize_iq2_xs / quantize_iq2_s
    rows, cols = x.shape
    bsize = 82 if is_s else 74
    eps = GROUP_MAX_EPS_IQ2_S if is_s else GROUP_MAX_EPS
    weight = np.empty(16, np.float32)
    waux = np.empty(16, np.float32)
    xval = np.empty(16, np.float32)
    LL = np.zeros((2, 32), np.int64)
    og = np.zeros((2, 4), np.bool_)
    term = np.zeros(32, np.float32)
    scales = np.empty(16, np.float32)
    signs = np.zeros(2, np.int64)
    for r in range(rows):
        for ibl in range(cols // 256):
            xo = 256 * ibl
            o = bsize * ibl
            max_scale = F0
            sumx2 = _sumx2(x, r, xo)
            sigma2 = (np.float32(2.0) * sumx2) / F256 if is_s else sumx2 / F256
            for ib in range(16):
                xb = xo + 16 * ib
                scales[ib] = F0
                _fill(x, r, xb, 16, qw, sigma2, weight, waux, np.float32(0.25))
                _abs_and_signs(x, r, xb, 16, weight, xval, signs, not is_s)
                vmax = _vmax(xval, 16)
                if vmax < eps:
                    continue
                scale = _search(xval, weight, waux, LL, og, term, 16, vmax, -9, 9, vmax / F5,
                                False, kmap, t_neigh, t_slots, t_levels)
                if scale < F0:
                    scale = -scale
                    for k in range(2):
                        signs[k] = ~signs[k] & (0xFF if is_s else 127)
                for k in range(2):
                    gi = _grid_index(LL, k, kmap)
                    i8 = 2 * ib + k
                    if is_s:
                        out[r, o + 2 + i8] = gi & 255
                        out[r, o + 66 + i8 // 4] |= (gi >> 8) << (2 * (i8 % 4))
                        out[r, o + 34 + i8] = signs[k]
                    else:
                        v = gi | (signs[k] << 9)
                        out[r, o + 2 + 2 * i8] = v & 0xFF
                        out[r, o + 3 + 2 * i8] = v >> 8
                scales[ib] = scale
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == F0:
                if not is_s:  # quantize_row_iq2_xs_impl clears qs here; _s_impl keeps them
                    out[r, o + 2:o + 66] = 0
                continue
            d = max_scale / F31
            h = fp32_to_fp16(d * np.float32(0.9875) if is_s else d)
            out[r, o] = h & 0xFF
            out[r, o + 1] = h >> 8
            _put_nibble_scales(out, r, o + (74 if is_s else 66), scales, d)


def _tables(qtype: Q):
    t = grid_tables(qtype)
    return t.kmap, t.neighbours, t.slots, t.levels


class IQ2_XXS(GgufBacked, ggml_type=Q.IQ2_XXS):
    requires_importance = True  # quantize_row_iq2_xxs_impl: GGML_ASSERT(quant_weights)

    @classmethod
    def quantize_rows(cls, x, importance):
        out = np.zeros((x.shape[0], cls.row_bytes(x.shape[1])), dtype=np.uint8)
        _iq2_xxs_rows(readonly(x), readonly(importance), *_tables(Q.IQ2_XXS), out)
        return out


class IQ2_XS(GgufBacked, ggml_type=Q.IQ2_XS):
    requires_importance = True  # quantize_row_iq2_xs_impl: GGML_ASSERT(quant_weights)

    @classmethod
    def quantize_rows(cls, x, importance):
        out = np.zeros((x.shape[0], cls.row_bytes(x.shape[1])), dtype=np.uint8)
        _iq2_16_rows(readonly(x), readonly(importance), False, *_tables(Q.IQ2_XS), out)
        return out


class IQ2_S(GgufBacked, ggml_type=Q.IQ2_S):
    @classmethod
    def quantize_rows(cls, x, importance):
        out = np.zeros((x.shape[0], cls.row_bytes(x.shape[1])), dtype=np.uint8)
        _iq2_16_rows(readonly(x), readonly(importance), True, *_tables(Q.IQ2_S), out)
        return out
