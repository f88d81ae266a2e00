"""Scalar helpers shared by the K-quant and legacy kernels, ported from ggml-quants.c.

Everything here is compiled by numba with IEEE float32 semantics, so that the kernels reproduce
ggml's bytes: no fastmath (hence no FMA contraction, no reassociation), `error_model="numpy"` (a
division by zero gives Inf/NaN as in C instead of raising), float32 constants only (a Python
float literal would promote an expression to float64), and sums accumulated in ggml's loop order.

Arrays are passed whole with an offset (`x, xo`) rather than sliced: a slice costs an array
view per call inside the hot loops.

Caching caveat: numba's on-disk cache (`cache=True`) keys a function on its own file only. A
kernel in kquants.py that calls a helper here keeps the old machine code after the helper is
edited: delete quantcli/codecs/__pycache__/*.nbi and *.nbc after changing this file or _lanes.py.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

F0 = np.float32(0.0)
F1 = np.float32(1.0)
GROUP_MAX_EPS = np.float32(1e-15)  # ggml-quants.c: #define GROUP_MAX_EPS 1e-15f
_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23, nearest_int's rounding constant
_SCALE_TO_INF = np.float32(2.0**112)  # ggml_compute_fp32_to_fp16
_SCALE_TO_ZERO = np.float32(2.0**-110)

JIT = dict(cache=True, error_model="numpy", nogil=True)  # fastmath stays off: bytes must match


@intrinsic
def f32_bits(typingctx, x):
    """float32 -> its IEEE bits as a non-negative int64 (C: memcpy(&u32, &f, 4))."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], ir.IntType(32))
        return builder.zext(bits, ir.IntType(64))

    return types.int64(types.float32), codegen


@intrinsic
def f32_from_bits(typingctx, u):
    """Low 32 bits of an int64 -> the float32 with those bits."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())

    return types.float32(u), codegen


@njit(**JIT)
def nearest_int(fval):
    # as nearest_int: (fval + 12582912.f) in float32, mantissa bits minus 2^22; for |fval| < 2^22
    # this is round-half-to-even, and for larger values it gives ggml's same garbage
    i = f32_bits(fval + _MAGIC)
    return (i & 0x007FFFFF) - 0x00400000


@njit(**JIT)
def fp32_to_fp16(f):
    """as ggml_compute_fp32_to_fp16 (the portable bit-trick version): round to nearest even."""
    base = (abs(f) * _SCALE_TO_INF) * _SCALE_TO_ZERO
    w = f32_bits(f)
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = f32_from_bits((bias >> 1) + 0x07800000) + base
    bits = f32_bits(base)
    exp_bits = (bits >> 13) & 0x00007C00
    mantissa_bits = bits & 0x00000FFF
    nonsign = exp_bits + mantissa_bits
    return (sign >> 16) | (0x7E00 if shl1_w > 0xFF000000 else nonsign)


@njit(**JIT)
def fp16_to_fp32(h):
    """IEEE half bits -> float32 (exact, as ggml_compute_fp16_to_fp32)."""
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if exp == 0:
        v = np.float32(mant) * np.float32(2.0**-24)  # subnormal or zero: exact in float32
        return -v if sign else v
    if exp == 31:
        return f32_from_bits(sign | 0x7F800000 | (mant << 13))
    return f32_from_bits(sign | ((exp + 112) << 23) | (mant << 13))


@njit(**JIT)
def put_fp16(out, b, pos, f):
    """Store GGML_FP32_TO_FP16(f) little-endian at out[b, pos:pos+2]; return its float32 value."""
    h = fp32_to_fp16(f)
    out[b, pos] = h & 0xFF
    out[b, pos + 1] = h >> 8
    return fp16_to_fp32(h)


@njit(**JIT)
def make_qx_quants(n, nmax, x, xo, L, lo, w, wo):
    """as make_qx_quants(n, nmax, x, L, rmse_type=1, qw): symmetric levels L in [0, 2*nmax).

    The weights are always given: ggml's `qw == NULL` case (w = x*x) is filled in by the caller,
    which yields the same float32 products. Returns the scale.
    """
    fmax = F0
    amax = F0
    for i in range(n):
        ax = abs(x[xo + i])
        if ax > amax:
            amax = ax
            fmax = x[xo + i]
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[lo + i] = 0
        return F0
    iscale = np.float32(-nmax) / fmax
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = nearest_int(iscale * x[xo + i])
        l = max(-nmax, min(nmax - 1, l))
        L[lo + i] = l + nmax
        fl = np.float32(l)
        wi = w[wo + i]
        sumlx += wi * x[xo + i] * fl
        suml2 += wi * fl * fl
    scale = sumlx / suml2 if suml2 != F0 else F0
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = -(np.float32(nmax) + np.float32(0.1) * np.float32(is_)) / fmax
        sumlx = F0
        suml2 = F0
        for i in range(n):
            l = nearest_int(iscale * x[xo + i])
            fl = np.float32(max(-nmax, min(nmax - 1, l)))
            wi = w[wo + i]
            sumlx += wi * x[xo + i] * fl
            suml2 += wi * fl * fl
        if suml2 > F0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[xo + i])
                L[lo + i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(**JIT)
def make_qkx_quants(n, nmax, x, xo, w, wo, L, lo, laux, rmin, rdelta, nstep, use_mad):
    """as make_qkx2_quants / make_qkx3_quants (identical when weights are given): asymmetric
    levels L in [0, nmax] with a min. Returns (scale, the_min) with the_min = -min >= 0."""
    fmin = x[xo]
    fmax = x[xo]
    sum_w = w[wo]
    sum_x = sum_w * x[xo]
    for i in range(1, n):
        xi = x[xo + i]
        if xi < fmin:
            fmin = xi
        if xi > fmax:
            fmax = xi
        wi = w[wo + i]
        sum_w += wi
        sum_x += wi * xi
    if fmin > F0:
        fmin = F0
    if fmax <= fmin:  # qkx2 tests ==, qkx3 tests <=: the same once min <= 0 <= ... <= max
        for i in range(n):
            L[lo + i] = 0
        return F0, -fmin
    iscale = np.float32(nmax) / (fmax - fmin)
    scale = F1 / iscale
    best_error = F0
    for i in range(n):
        l = nearest_int(iscale * (x[xo + i] - fmin))
        l = max(0, min(nmax, l))
        L[lo + i] = l
        diff = scale * np.float32(l) + fmin - x[xo + i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += w[wo + i] * diff
    if nstep < 1:
        return scale, -fmin
    for is_ in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(is_) + np.float32(nmax)) / (fmax - fmin)
        sum_l = F0
        sum_l2 = F0
        sum_xl = F0
        for i in range(n):
            l = nearest_int(iscale * (x[xo + i] - fmin))
            l = max(0, min(nmax, l))
            laux[i] = l
            fl = np.float32(l)
            wi = w[wo + i]
            sum_l += wi * fl
            sum_l2 += wi * fl * fl
            sum_xl += wi * fl * x[xo + i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > F0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > F0:
                this_min = F0
                this_scale = sum_xl / sum_l2
            cur_error = F0
            for i in range(n):
                diff = this_scale * np.float32(laux[i]) + this_min - x[xo + i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += w[wo + i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[lo + i] = laux[i]
                best_error = cur_error
                scale = this_scale
                fmin = this_min
    return scale, -fmin


@njit(**JIT)
def make_q3_quants(x, xo, L, lo):
    """as make_q3_quants(16, 4, x, L, do_rmse=true): L in [0, 8) (0 for an all-zero group).
    Its coordinate descent divides by a running sum that can get tiny: `nearest_int` may see
    values beyond 2^22 here."""
    n = 16
    nmax = 4
    fmax = F0
    amax = F0
    for i in range(n):
        ax = abs(x[xo + i])
        if ax > amax:
            amax = ax
            fmax = x[xo + i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[lo + i] = 0
        return F0
    iscale = np.float32(-nmax) / fmax
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[xo + i])))
        L[lo + i] = l
        xi = x[xo + i]
        wi = xi * xi
        fl = np.float32(l)
        sumlx += wi * xi * fl
        suml2 += wi * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            xi = x[xo + i]
            wi = xi * xi
            li = np.float32(L[lo + i])
            slx = sumlx - wi * xi * li
            if slx > F0:
                sl2 = suml2 - wi * li * li
                new_l = max(-nmax, min(nmax - 1, nearest_int(xi * sl2 / slx)))
                if new_l != L[lo + i]:
                    fl = np.float32(new_l)
                    slx += wi * xi * fl
                    sl2 += wi * fl * fl
                    if sl2 > F0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[lo + i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[lo + i] += nmax
    return sumlx / suml2 if suml2 > F0 else F0


@njit(**JIT)
def make_qp_quants(n, nmax, x, L, qw):
    """as make_qp_quants: positive levels for the sub-block scales/mins of a super-block.
    L holds uint8 values as in C: a negative level wraps (needs a negative scale; kept exact)."""
    fmax = F0
    for i in range(n):
        fmax = fmax if fmax > x[i] else x[i]  # MAX(max, x[i])
    if fmax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return F0
    iscale = np.float32(nmax) / fmax
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = F1 / iscale
    best_mse = F0
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        best_mse += qw[i] * diff * diff
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (np.float32(0.1) * np.float32(is_) + np.float32(nmax)) / fmax
        scale_is = F1 / iscale_is
        mse = F0
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * np.float32(l)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        fl = np.float32(l)
        sumlx += qw[i] * x[i] * fl
        suml2 += qw[i] * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            wi = qw[i]
            li = np.float32(L[i])
            slx = sumlx - wi * x[i] * li
            sl2 = suml2 - wi * li * li
            if slx > F0 and sl2 > F0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fl = np.float32(new_l)
                    slx += wi * x[i] * fl
                    sl2 += wi * fl * fl
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > F0 else F0


@njit(**JIT)
def row_sigma2(x, r, cols):
    """sum_x2 / n_per_row over one row, as quantize_row_q4_0_impl & co."""
    s = F0
    for j in range(cols):
        s += x[r, j] * x[r, j]
    return s / np.float32(cols)


_ABS_BITS = np.int32(0x7FFFFFFF)


@njit(**JIT)
def row_absmax(xi):
    """Per-row max |x| of float32 rows given as their int32 bits: (rows, cols) -> (rows,) float32.

    Compares the magnitude bits as integers, which order like the floats and let NaN (bits above
    Inf's 0x7F800000) win instead of being skipped: a row with NaN/Inf comes out non-finite.
    """
    rows, cols = xi.shape
    out = np.empty(rows, np.float32)
    for r in range(rows):
        m = np.int32(0)
        for j in range(cols):
            b = xi[r, j] & _ABS_BITS
            m = b if b > m else m
        out[r] = f32_from_bits(np.int64(m))
    return out


def readonly(a: np.ndarray | None) -> np.ndarray | None:
    """A read-only view of `a` (None stays None), for a kernel's input arrays: numba compiles a
    kernel once per argument type, and a writeable array is another type than a read-only one (a
    memory map), so every caller passes this view and each kernel has one signature to compile
    or cache."""
    if a is None:
        return None
    v = a.view()
    v.flags.writeable = False
    return v
