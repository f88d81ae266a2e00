"""Compiled loops for the forward pass's element-wise work (numba, cached on disk).

numpy needs several passes and temporaries for each of these (rms_norm: square, sum, cast, divide,
two products; GELU: cast to fp16, gather, two masks); here each is one pass over the rows, in
ggml-cpu's arithmetic: the rms sum adds float32 squares in double, the fp16 rounding is ggml's
bit-exact conversion. They release the GIL. Each is called through a wrapper that passes its
inputs as read-only views (`readonly`), so that numba compiles (or loads) one signature per kernel
whether the weights come from a memory map or not. Softmax and the output head's log-sum-exp stay in
numpy: its vectorised exp is several times numba's scalar one (measured: 2.0 s against 0.4 s for
the head of 8 Gemma chunks).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from quantcli.codecs._ggml_math import fp16_to_fp32, fp32_to_fp16, readonly

JIT = dict(cache=True, error_model="numpy", nogil=True)
_F0 = np.float32(0.0)
_NEG10 = np.float32(-10.0)
_POS10 = np.float32(10.0)


@njit(**JIT)
def _rms_norm_rows(x, w, eps, out):
    """ggml_compute_forward_rms_norm_f32 then ggml_mul: x [R, n] -> out [R, n];
    sum of (float32 square) in double, mean and scale in float32; w empty: no multiply."""
    R, n = x.shape
    has_w = w.shape[0] == n
    for r in range(R):
        s = 0.0
        for i in range(n):
            v = x[r, i]
            s += np.float64(v * v)
        mean = np.float32(s / n)
        scale = np.float32(1.0) / np.sqrt(mean + eps)
        if has_w:
            for i in range(n):
                out[r, i] = (x[r, i] * scale) * w[i]
        else:
            for i in range(n):
                out[r, i] = x[r, i] * scale


@njit(**JIT)
def _gelu_fp16_mul(g, u, table, out):
    """ggml_vec_gelu_f32 (GGML_GELU_FP16) of g, times u when u has g's size: flat float32 arrays.
    0 at or below -10, identity at or above 10, else the fp16 table at the fp16-rounded input."""
    mul = u.shape[0] == g.shape[0]
    for i in range(g.shape[0]):
        v = g[i]
        if v <= _NEG10:
            y = _F0
        elif v >= _POS10:
            y = v
        else:
            y = table[fp32_to_fp16(v)]
        out[i] = y * u[i] if mul else y


@njit(**JIT)
def _round_fp16(x, out):
    """x rounded to fp16 and back (what an fp16 KV cache stores): flat float32 arrays."""
    for i in range(x.shape[0]):
        out[i] = fp16_to_fp32(fp32_to_fp16(x[i]))


_I127 = np.float32(127.0)
_NEG127 = np.float32(-127.0)


@njit(**JIT)
def _round_q8_0(x, out):
    """x (flat, whole blocks of 32) as ggml-cpu's x86 quantize_row_q8_0 rounds it, dequantized:
    d = amax/127 stored fp16, q = rint(x * 127/amax) (half to even)."""
    for b in range(x.shape[0] // 32):
        o = b * 32
        amax = _F0
        for j in range(32):
            a = abs(x[o + j])
            if a > amax:
                amax = a
        d = fp16_to_fp32(fp32_to_fp16(amax / _I127))
        iscale = _I127 / amax if amax > _F0 else _F0
        for j in range(32):
            out[o + j] = np.rint(x[o + j] * iscale) * d


@njit(**JIT)
def _round_q8_k(x, out):
    """x (flat, whole blocks of 256) as quantize_row_q8_K_ref rounds it, dequantized: the signed
    value of largest magnitude (first wins) gives iscale = -127/max, q = min(127, rint(iscale*x)),
    d = 1/iscale."""
    for b in range(x.shape[0] // 256):
        o = b * 256
        amax = _F0
        vmax = _F0
        for j in range(256):
            a = abs(x[o + j])
            if a > amax:
                amax = a
                vmax = x[o + j]
        if vmax == _F0:
            for j in range(256):
                out[o + j] = _F0
            continue
        iscale = _NEG127 / vmax
        d = np.float32(1.0) / iscale
        for j in range(256):
            q = np.rint(iscale * x[o + j])
            if q > _I127:
                q = _I127
            out[o + j] = q * d


def rms_norm_rows(x, w, eps, out):
    _rms_norm_rows(readonly(x), readonly(w), np.float32(eps), out)


def gelu_fp16_mul(g, u, table, out):
    _gelu_fp16_mul(readonly(g), readonly(u), readonly(table), out)


def round_fp16(x, out):
    _round_fp16(readonly(x), out)


def round_q8_0(x, out):
    _round_q8_0(readonly(x), out)


def round_q8_k(x, out):
    _round_q8_k(readonly(x), out)
