"""ggml's scale searches run on many groups at once: one group per lane, lanes innermost.

ggml's `make_qkx2_quants`, `make_qkx3_quants` and `make_qx_quants` walk one group (16 or 32 values)
at a time; their sums are sequential float32 chains, so the C code waits on adder latency. Here
group k lives in column k of a transposed block `xt: (n, lanes)` and every loop runs
`for i in range(n): for k in range(lanes)`: each lane still adds in C's order (bytes stay exact),
while LLVM vectorizes across lanes. Branches on a lane's state become per-lane selects.

Rounding in the searches: `clamp(nearest_int(v))` equals `clamp(rint(v))` computed in float32 as
`(v + 1.5*2^23) - 1.5*2^23` for |v| < 2^22, which keeps the loops in float32 lanes (int64 ->
float32 does not vectorize on AVX2). By construction |v| <= nmax + 1 in make_qx_quants; in
make_qkx*_quants a group whose range is tiny (subnormal) overflows iscale to Inf, where C's
`nearest_int` returns bit garbage: such lanes are detected (sum of |v| not small) and redone by
the scalar port.
Keep the lane count in a runtime argument: a constant trip count gets unrolled, not vectorized.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from quantcli.codecs._ggml_math import F0, F1, GROUP_MAX_EPS, JIT, make_q3_quants, make_qkx_quants

_MAGIC = np.float32(12582912.0)
_SAFE = np.float32(2.0**21)  # lanes whose sum of |v| reaches this take the scalar path
_TENTH = np.float32(0.1)


@njit(**JIT)
def qkx_lanes(xt, wt, nl, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, Lt):
    """make_qkx2_quants / make_qkx3_quants (with weights) on lanes 0..nl-1.

    xt, wt: (n, >= nl) float32 values and weights. Writes scale[k], the_min[k] (= -min >= 0) and
    the levels Lt[:, k] (float32 in [0, nmax]).
    """
    n = xt.shape[0]
    fnmax = np.float32(nmax)
    fmin = np.empty(nl, np.float32)
    fmax = np.empty(nl, np.float32)
    sum_w = np.empty(nl, np.float32)
    sum_x = np.empty(nl, np.float32)
    acc_is = np.empty(nl, np.float32)  # iscale and min that produced the kept levels
    acc_min = np.empty(nl, np.float32)
    best = np.zeros(nl, np.float32)
    S = np.empty(nl, np.float32)
    sl = np.empty(nl, np.float32)
    sl2 = np.empty(nl, np.float32)
    sxl = np.empty(nl, np.float32)
    ts = np.empty(nl, np.float32)
    tm = np.empty(nl, np.float32)
    err = np.empty(nl, np.float32)
    fmin0 = np.empty(nl, np.float32)
    flat = np.empty(nl, np.bool_)
    chk = np.zeros(nl, np.float32)  # sum of |v| fed to the rounding: Inf/NaN/large -> scalar
    for k in range(nl):
        fmin[k] = xt[0, k]
        fmax[k] = xt[0, k]
        sum_w[k] = wt[0, k]
        sum_x[k] = wt[0, k] * xt[0, k]
    for i in range(1, n):
        for k in range(nl):
            xi = xt[i, k]
            a = fmin[k]
            fmin[k] = xi if xi < a else a
            b = fmax[k]
            fmax[k] = xi if xi > b else b
    for i in range(1, n):
        for k in range(nl):
            sum_w[k] += wt[i, k]
            sum_x[k] += wt[i, k] * xt[i, k]
    for k in range(nl):
        m = F0 if fmin[k] > F0 else fmin[k]
        fmin[k] = m
        fmin0[k] = m
        flat[k] = fmax[k] == m
        acc_min[k] = m
        isc = fnmax / (fmax[k] - m)
        acc_is[k] = isc
        scale[k] = F1 / isc
    # the error of the plain min/max grid
    for i in range(n):
        for k in range(nl):
            v = acc_is[k] * (xt[i, k] - fmin[k])
            chk[k] += abs(v)
            r = (v + _MAGIC) - _MAGIC
            r = F0 if r < F0 else r
            r = fnmax if r > fnmax else r
            diff = scale[k] * r + fmin[k] - xt[i, k]
            diff = abs(diff) if use_mad else diff * diff
            best[k] += wt[i, k] * diff
    for is_ in range(nstep + 1):
        num = rmin + rdelta * np.float32(is_) + fnmax
        for k in range(nl):
            S[k] = num / (fmax[k] - fmin[k])
            sl[k] = F0
            sl2[k] = F0
            sxl[k] = F0
            err[k] = F0
        for i in range(n):
            for k in range(nl):
                v = S[k] * (xt[i, k] - fmin[k])
                chk[k] += abs(v)
                r = (v + _MAGIC) - _MAGIC
                r = F0 if r < F0 else r
                r = fnmax if r > fnmax else r
                w = wt[i, k]
                sl[k] += w * r
                sl2[k] += w * r * r
                sxl[k] += w * r * xt[i, k]
        for k in range(nl):
            D = sum_w[k] * sl2[k] - sl[k] * sl[k]
            a = (sum_w[k] * sxl[k] - sum_x[k] * sl[k]) / D
            b = (sl2[k] * sum_x[k] - sl[k] * sxl[k]) / D
            pos = b > F0
            tm[k] = F0 if pos else b
            ts[k] = sxl[k] / sl2[k] if pos else a
        for i in range(n):
            for k in range(nl):
                r = (S[k] * (xt[i, k] - fmin[k]) + _MAGIC) - _MAGIC
                r = F0 if r < F0 else r
                r = fnmax if r > fnmax else r
                diff = ts[k] * r + tm[k] - xt[i, k]
                diff = abs(diff) if use_mad else diff * diff
                err[k] += wt[i, k] * diff
        for k in range(nl):
            D = sum_w[k] * sl2[k] - sl[k] * sl[k]
            if D > F0 and err[k] < best[k]:
                best[k] = err[k]
                scale[k] = ts[k]
                acc_is[k] = S[k]
                acc_min[k] = fmin[k]
                fmin[k] = tm[k]
    for i in range(n):
        for k in range(nl):
            r = (acc_is[k] * (xt[i, k] - acc_min[k]) + _MAGIC) - _MAGIC
            r = F0 if r < F0 else r
            Lt[i, k] = fnmax if r > fnmax else r
    for k in range(nl):
        the_min[k] = -fmin[k]
        if flat[k]:  # max == min: levels 0, scale 0, the_min = -min
            scale[k] = F0
            the_min[k] = -fmin0[k]
            for i in range(n):
                Lt[i, k] = F0
        elif not chk[k] < _SAFE:
            _qkx_scalar(xt, wt, k, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, Lt)


@njit(**JIT)
def _qkx_scalar(xt, wt, k, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, Lt):
    """Lane k through the exact scalar port (make_qkx_quants)."""
    n = xt.shape[0]
    x = np.ascontiguousarray(xt[:, k])
    w = np.ascontiguousarray(wt[:, k])
    L = np.zeros(n, np.int64)
    laux = np.zeros(n, np.int64)
    s, m = make_qkx_quants(n, nmax, x, 0, w, 0, L, 0, laux, rmin, rdelta, nstep, use_mad)
    scale[k] = s
    the_min[k] = m
    for i in range(n):
        Lt[i, k] = np.float32(L[i])


@njit(**JIT)
def qx_lanes(xt, wt, nl, nmax, scale, Lt):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, w) on lanes 0..nl-1: symmetric levels.

    xt, wt: (n, >= nl). Writes scale[k] and Lt[:, k] (float32 in [0, 2*nmax); 0 for an all-zero
    group, as C leaves it).
    """
    n = xt.shape[0]
    fnmax = np.float32(nmax)
    lo = np.float32(-nmax)
    hi = np.float32(nmax - 1)
    fmax = np.zeros(nl, np.float32)
    amax = np.zeros(nl, np.float32)
    acc = np.empty(nl, np.float32)
    best = np.empty(nl, np.float32)
    S = np.empty(nl, np.float32)
    slx = np.empty(nl, np.float32)
    sl2 = np.empty(nl, np.float32)
    for i in range(n):
        for k in range(nl):
            xi = xt[i, k]
            ax = abs(xi)
            big = ax > amax[k]
            fmax[k] = xi if big else fmax[k]
            amax[k] = ax if big else amax[k]
    for is_ in range(-10, 10):  # -10 stands for the first, plain grid; then is = -9..9 but 0
        if is_ == 0:
            continue
        for k in range(nl):
            if is_ == -10:
                S[k] = lo / fmax[k]
            else:
                S[k] = -(fnmax + _TENTH * np.float32(is_)) / fmax[k]
            slx[k] = F0
            sl2[k] = F0
        for i in range(n):
            for k in range(nl):
                xi = xt[i, k]
                r = (S[k] * xi + _MAGIC) - _MAGIC
                r = lo if r < lo else r
                r = hi if r > hi else r
                w = wt[i, k]
                slx[k] += w * xi * r
                sl2[k] += w * r * r
        if is_ == -10:
            for k in range(nl):
                s = slx[k] / sl2[k] if sl2[k] != F0 else F0
                scale[k] = s
                best[k] = s * slx[k]
                acc[k] = S[k]
        else:
            for k in range(nl):
                if sl2[k] > F0 and slx[k] * slx[k] > best[k] * sl2[k]:
                    s = slx[k] / sl2[k]
                    scale[k] = s
                    best[k] = s * slx[k]
                    acc[k] = S[k]
    for i in range(n):
        for k in range(nl):
            r = (acc[k] * xt[i, k] + _MAGIC) - _MAGIC
            r = lo if r < lo else r
            r = hi if r > hi else r
            Lt[i, k] = r + fnmax
    for k in range(nl):
        if amax[k] < GROUP_MAX_EPS:  # all zero
            scale[k] = F0
            for i in range(n):
                Lt[i, k] = F0


@njit(**JIT)
def q3_lanes(xt, nl, scale, Lt):
    """make_q3_quants(16, 4, x, L, do_rmse=true) on lanes 0..nl-1 (weights x^2).

    xt: (n, >= nl). Writes scale[k] and Lt[:, k] (float32 in [0, 8); 0 for an all-zero group).
    The coordinate descent's `nearest_int(x * sl2 / slx)` can see huge values when slx is tiny:
    lanes where that happened (in a step C really takes) are redone by the scalar port.
    """
    n = xt.shape[0]
    lo = np.float32(-4.0)
    hi = np.float32(3.0)
    fmax = np.zeros(nl, np.float32)
    amax = np.zeros(nl, np.float32)
    slx = np.zeros(nl, np.float32)
    sl2 = np.zeros(nl, np.float32)
    chk = np.zeros(nl, np.float32)
    active = np.ones(nl, np.bool_)
    changed = np.zeros(nl, np.int64)
    for i in range(n):
        for k in range(nl):
            xi = xt[i, k]
            ax = abs(xi)
            big = ax > amax[k]
            fmax[k] = xi if big else fmax[k]
            amax[k] = ax if big else amax[k]
    for k in range(nl):
        scale[k] = lo / fmax[k]  # iscale, for now
    for i in range(n):
        for k in range(nl):
            xi = xt[i, k]
            r = (scale[k] * xi + _MAGIC) - _MAGIC
            r = lo if r < lo else r
            r = hi if r > hi else r
            Lt[i, k] = r
            w = xi * xi
            slx[k] += w * xi * r
            sl2[k] += w * r * r
    for _ in range(5):
        for k in range(nl):
            changed[k] = 0
        for i in range(n):
            for k in range(nl):
                xi = xt[i, k]
                w = xi * xi
                li = Lt[i, k]
                s1 = slx[k] - w * xi * li
                s2 = sl2[k] - w * li * li
                v = xi * s2 / s1
                live = active[k] and s1 > F0
                chk[k] += abs(v) if live else F0
                r = (v + _MAGIC) - _MAGIC
                r = lo if r < lo else r
                r = hi if r > hi else r
                n1 = s1 + w * xi * r
                n2 = s2 + w * r * r
                take = live and r != li and n2 > F0 and n1 * n1 * sl2[k] > slx[k] * slx[k] * n2
                if take:
                    Lt[i, k] = r
                    slx[k] = n1
                    sl2[k] = n2
                    changed[k] += 1
        more = False
        for k in range(nl):
            active[k] = active[k] and changed[k] > 0
            more = more or active[k]
        if not more:
            break
    for i in range(n):
        for k in range(nl):
            Lt[i, k] += hi + F1  # L[i] += nmax
    for k in range(nl):
        scale[k] = slx[k] / sl2[k] if sl2[k] > F0 else F0
        if amax[k] < GROUP_MAX_EPS:  # all zero
            scale[k] = F0
            for i in range(n):
                Lt[i, k] = F0
        elif not chk[k] < _SAFE:
            x = np.ascontiguousarray(xt[:, k])
            L = np.zeros(n, np.int64)
            scale[k] = make_q3_quants(x, 0, L, 0)
            for i in range(n):
                Lt[i, k] = np.float32(L[i])
