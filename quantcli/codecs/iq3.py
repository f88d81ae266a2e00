"""IQ3_XXS and IQ3_S: 3-bit lattice quants, byte-identical to ggml.

As `quantize_row_iq3_xxs_impl` (grid of 256) and `quantize_row_iq3_s_impl` (grid of 512) in
ggml-quants.c: each group of 4 magnitudes is snapped to levels 2l+1 (l in 0..7); a point not on the
grid goes to the best of its nearest grid points (`iq3_find_best_neighbour`), with the neighbour
lists built as `iq3xs_init_impl` does. Signs are stored separately.

    IQ3_XXS block (98 bytes):  d fp16 | qs[64] grid indices | 8 x u32 (4 x 7 sign bits, 4-bit scale)
    IQ3_S block (110 bytes):   d fp16 | qs[64] | qh[8] (index bit 8) | signs[32] | scales[4] nibbles

Kept for byte parity: quantize_row_iq3_s_impl advances its qs/signs pointers only past blocks of 32
that are not all zero, so the blocks after a zero block slide into its slots (qh stays in place),
and a zero block in a non-zero super-block does not dequantize to zeros in either type.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq
from numba import njit

from quantcli.codecs._ggml_math import F0, F1, JIT, nearest_int, put_fp16, readonly
from quantcli.codecs.gguf_backed import GgufBacked

# helpers taking arrays are inlined into the row kernels at numba-IR level: a compiled call
# costs an atomic refcount increment and decrement per array argument (NRT_incref/decref)
JIT_INLINE = dict(JIT, inline="always")

_F15 = np.float32(15)  # 2*kMaxQ - 1 with kMaxQ = 8
_HALF = np.float32(0.5)
_FLT_MAX = np.float32(np.finfo(np.float32).max)
_EPS_XXS = np.float32(1e-8)  # GROUP_MAX_EPS_IQ3_XXS
_STEP = np.float32(0.2)  # scale trials: id = (15 + is*0.2f)/max
_FUDGE_XXS = np.float32(1.0125)  # "small improvement via this fudge factor" on the fp16 scale
_FUDGE_S = np.float32(1.033)


@lru_cache(maxsize=None)
def grid_tables(grid_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """as iq3xs_init_impl(grid_size) -> (levels (n, 4) int8, kmap (4096,) int32, neighbours uint16).

    kmap[u] for u = sum l_i << 3i is the grid index, or -(offset + 1) into `neighbours`, which holds
    at that offset a count and then the grid points at the `nwant` smallest squared distances,
    ordered by (distance, index) as ggml's qsort with iq3_compare_func.
    """
    cls = {256: gq.IQ3_XXS, 512: gq.IQ3_S}[grid_size]
    cls.init_grid()
    values = cls.grid.reshape(grid_size, 4)  # gguf's dequantization grid: value of level l per cell
    levels = np.searchsorted(np.array(cls.grid_map, dtype=np.float32), values).astype(np.int8)
    shifts = np.array([0, 3, 6, 9])
    kmap = np.full(4096, -1, dtype=np.int32)
    kmap[(levels.astype(np.int64) << shifts).sum(axis=1)] = np.arange(grid_size)

    off_grid = np.nonzero(kmap < 0)[0]
    pos = 2 * ((off_grid[:, None] >> shifts) & 7) + 1  # (m, 4)
    d2 = ((pos[:, None, :] - (2 * levels[None].astype(np.int64) + 1)) ** 2).sum(axis=-1)  # (m, n)
    order = np.argsort(d2, axis=1, kind="stable")  # by distance, then index
    sorted_d2 = np.take_along_axis(d2, order, axis=1)
    rank = np.cumsum(np.diff(sorted_d2, axis=1, prepend=-1) != 0, axis=1)  # 1 for the nearest
    keep = rank <= (2 if grid_size == 256 else 3)  # nwant

    neighbours = []
    for row, u in enumerate(off_grid):
        kmap[u] = -(len(neighbours) + 1)
        chosen = order[row, keep[row]]
        neighbours.append(len(chosen))
        neighbours.extend(chosen.tolist())
    return levels, kmap, np.array(neighbours, dtype=np.uint16)


@njit(**JIT_INLINE)
def _snap_groups(xval, waux, iscale, scale, levels, qvals, kmap, neigh, L, on_grid,
                 only_off_grid):
    """Levels L (32,) of the 8 groups of 4 in xval at 1/iscale; on_grid[k] says whether group k's
    levels were a grid point. One that is not becomes its best listed neighbour at `scale`, as
    iq3_find_best_neighbour: min over neighbours of sum waux*(scale*q - xval)^2, first on ties.

    The neighbour search is written out here rather than in a helper of its own: an inlined helper
    with a branch, called per group, costs numba an atomic refcount pair per call (2x run time).
    """
    for k in range(8):
        if only_off_grid and on_grid[k]:
            continue
        o = 4 * k
        u = 0
        for i in range(4):
            l = max(0, min(7, nearest_int(_HALF * (iscale * xval[o + i] - F1))))
            L[o + i] = l
            u |= l << (3 * i)
        on_grid[k] = kmap[u] >= 0
        if on_grid[k]:
            continue
        start = -kmap[u] - 1  # kneighbors_q3xs - kmap_q3xs[u] - 1
        best_d2 = _FLT_MAX
        grid_index = -1
        for j in range(1, int(neigh[start]) + 1):
            g = int(neigh[start + j])
            d2 = F0
            for i in range(4):
                diff = scale * qvals[g, i] - xval[o + i]
                d2 += waux[o + i] * diff * diff
            if d2 < best_d2:
                best_d2 = d2
                grid_index = g
        for i in range(4):
            L[o + i] = levels[grid_index, i]


@njit(**JIT_INLINE)
def _sums(xval, weight, L):
    sumqx = F0
    sumq2 = F0
    for i in range(32):
        q = np.float32(2 * L[i] + 1)
        sumqx += weight[i] * xval[i] * q
        sumq2 += weight[i] * q * q
    return sumqx, sumq2


@njit(**JIT_INLINE)
def _block_search(xval, weight, waux, vmax, levels, qvals, kmap, neigh, n_is, is_xxs, L, Laux,
                  on_grid, on_grid_aux):
    """The scale search of quantize_row_iq3_{xxs,s}_impl for one block of 32 -> scale, L (32,).

    IQ3_XXS tries is in -15..15, starts with every group "on grid" and re-snaps only groups that
    were not; IQ3_S tries -9..9, starts with none on grid and re-snaps all of them.
    """
    for i in range(32):
        L[i] = 0
    best = F0
    scale = vmax / _F15
    for k in range(8):
        on_grid[k] = is_xxs
    for is_ in range(-n_is, n_is + 1):
        iscale = (_F15 + np.float32(is_) * _STEP) / vmax
        this_scale = F1 / iscale
        _snap_groups(xval, waux, iscale, this_scale, levels, qvals, kmap, neigh, Laux, on_grid_aux,
                     False)
        sumqx, sumq2 = _sums(xval, weight, Laux)
        if sumq2 > F0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            L[:] = Laux
            on_grid[:] = on_grid_aux
    n_not_on_grid = 0
    for k in range(8):
        if not on_grid[k]:
            n_not_on_grid += 1
    if n_not_on_grid > 0 and scale > F0:
        _snap_groups(xval, waux, F1 / scale, scale, levels, qvals, kmap, neigh, L, on_grid, is_xxs)
        sumqx, sumq2 = _sums(xval, weight, L)
        if sumq2 > F0:
            scale = sumqx / sumq2
    return scale


@njit(**JIT_INLINE)
def _prepare_block(x, r, xo, qw, sigma2, weight, waux, xval, signs, is_xxs):
    """Weights, |x| and sign bytes of one block of 32; returns max |x| (signs flipped to even
    parity for IQ3_XXS, which stores 7 sign bits per 8 values)."""
    for i in range(32):
        xi = x[r, xo + i]
        if qw is None:
            weight[i] = xi * xi
        else:
            weight[i] = qw[xo + i] * np.sqrt(sigma2 + xi * xi)
        waux[i] = np.sqrt(weight[i])
    for k in range(4):
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
        if is_xxs and nflip % 2:
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
        signs[k] = s & 127 if is_xxs else s
    vmax = xval[0]
    for i in range(1, 32):
        vmax = vmax if vmax > xval[i] else xval[i]  # MAX(max, xval[i])
    return vmax


@njit(**JIT_INLINE)
def _superblock_sigma2(x, r, xs):
    sumx2 = F0
    for i in range(256):
        sumx2 += x[r, xs + i] * x[r, xs + i]
    return np.float32(2) * sumx2 / np.float32(256)


@njit(**JIT)
def _iq3_rows(x, qw, levels, kmap, neigh, is_xxs, out):
    # (rows, cols) float32 -> (rows, cols // 256 * (98 | 110)) uint8
    rows, cols = x.shape
    type_size = 98 if is_xxs else 110
    qvals = (np.float32(2) * levels.astype(np.float32) + F1).astype(np.float32)  # 2l+1, exact
    weight = np.empty(32, dtype=np.float32)
    waux = np.empty(32, dtype=np.float32)
    xval = np.empty(32, dtype=np.float32)
    L = np.empty(32, dtype=np.int8)
    Laux = np.empty(32, dtype=np.int8)
    on_grid = np.empty(8, dtype=np.bool_)
    on_grid_aux = np.empty(8, dtype=np.bool_)
    signs = np.empty(4, dtype=np.uint8)
    scales = np.empty(8, dtype=np.float32)
    words = np.empty(8, dtype=np.uint32)  # IQ3_XXS scales_and_signs
    for r in range(rows):
        for ibl in range(cols // 256):
            xs = 256 * ibl
            o = type_size * ibl
            sigma2 = _superblock_sigma2(x, r, xs)
            max_scale = F0
            n_written = 0  # IQ3_S advances its qs/signs pointers only past non-zero blocks
            for ib in range(8):
                words[ib] = 0
                vmax = _prepare_block(x, r, xs + 32 * ib, qw, sigma2, weight, waux, xval, signs,
                                      is_xxs)
                if (is_xxs and vmax < _EPS_XXS) or (not is_xxs and vmax == F0):
                    scales[ib] = F0
                    continue
                scale = _block_search(xval, weight, waux, vmax, levels, qvals, kmap, neigh,
                                      15 if is_xxs else 9, is_xxs, L, Laux, on_grid, on_grid_aux)
                if scale < F0:  # "should never happen": flip the scale and the signs
                    scale = -scale
                    for k in range(4):
                        signs[k] = ~signs[k] & (127 if is_xxs else 255)
                for k in range(8):
                    u = 0
                    for i in range(4):
                        u |= int(L[4 * k + i]) << (3 * i)
                    g = kmap[u]
                    if is_xxs:
                        out[r, o + 2 + 8 * ib + k] = g
                    else:
                        out[r, o + 2 + 8 * n_written + k] = g & 255
                        out[r, o + 66 + ib] |= (g >> 8) << k
                if is_xxs:
                    words[ib] = (signs[0] | (signs[1] << 7) | (signs[2] << 14)
                                 | (signs[3] << 21))
                else:
                    for k in range(4):
                        out[r, o + 74 + 4 * n_written + k] = signs[k]
                n_written += 1
                scales[ib] = scale
                max_scale = max_scale if max_scale > scale else scale  # MAX(max_scale, scale)
            if max_scale == F0:
                if is_xxs:
                    out[r, o:o + type_size] = 0
                continue
            d = max_scale / np.float32(31)
            put_fp16(out, r, o, d * (_FUDGE_XXS if is_xxs else _FUDGE_S))
            iscale = F1 / d
            for ib in range(8):
                l = max(0, min(15, nearest_int(_HALF * (iscale * scales[ib] - F1))))
                if is_xxs:
                    words[ib] |= np.uint32(l) << np.uint32(28)
                elif ib % 2 == 0:
                    out[r, o + 106 + ib // 2] = l
                else:
                    out[r, o + 106 + ib // 2] |= l << 4
            if is_xxs:
                for ib in range(8):
                    for b in range(4):
                        out[r, o + 66 + 4 * ib + b] = (words[ib] >> np.uint32(8 * b)) & 0xFF


def _quantize(cls, x, importance, grid_size):
    levels, kmap, neigh = grid_tables(grid_size)
    out = np.zeros((x.shape[0], cls.row_bytes(x.shape[1])), dtype=np.uint8)
    _iq3_rows(readonly(x), readonly(importance), levels, kmap, neigh, grid_size == 256, out)
    return out


class IQ3_XXS(GgufBacked, ggml_type=Q.IQ3_XXS):
    @classmethod
    def quantize_rows(cls, x, importance):
        return _quantize(cls, x, importance, 256)


class IQ3_S(GgufBacked, ggml_type=Q.IQ3_S):
    @classmethod
    def quantize_rows(cls, x, importance):
        return _quantize(cls, x, importance, 512)
