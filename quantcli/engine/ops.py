"""The few operations a llama-family forward pass needs, in float32 numpy, following ggml-cpu.

Each cites the ggml kernel it mirrors; where ggml rounds (the fp16 GELU table, the fp16 KV cache,
the float32 running product of the rope angles) we round the same way.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

GELU_COEF_A = np.float32(0.044715)
SQRT_2_OVER_PI = np.float32(0.79788456080286535587989211986876)


def _k():
    """The compiled kernels; numba is imported on first use, not by every command's start-up."""
    from quantcli.engine import _kernels

    return _kernels


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """ggml_rms_norm then ggml_mul: x / sqrt(mean(x^2) + eps) * w over the last axis.
    [..., n] -> [..., n]; the float32 squares summed in double as ggml's ggml_float sum."""
    n = x.shape[-1]
    x2 = np.ascontiguousarray(x, np.float32).reshape(-1, n)
    out = np.empty_like(x2)
    w = _NO_WEIGHT if weight is None else np.ascontiguousarray(weight, np.float32).reshape(-1)
    _k().rms_norm_rows(x2, w, np.float32(eps), out)
    return out.reshape(x.shape)


_NO_WEIGHT = np.zeros(0, np.float32)


@lru_cache(maxsize=1)
def _gelu_table() -> np.ndarray:
    """ggml_table_gelu_f16: gelu of every fp16 value, rounded to fp16 (GGML_GELU_FP16)."""
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        y = np.float32(0.5) * x * (np.float32(1.0) + np.tanh(
            SQRT_2_OVER_PI * x * (np.float32(1.0) + GELU_COEF_A * x * x)))
    return y.astype(np.float16).astype(np.float32)


def gelu(x: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
    """ggml_vec_gelu_f32 with GGML_GELU_FP16: table lookup on the fp16-rounded input,
    0 below -10, identity above 10; multiplied by `times` (same shape) when given, in one pass."""
    g = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(g)
    u = _NO_WEIGHT if times is None else np.ascontiguousarray(times, np.float32).reshape(-1)
    _k().gelu_fp16_mul(g.reshape(-1), u, _gelu_table(), out.reshape(-1))
    return out


def round_fp16(x: np.ndarray) -> np.ndarray:
    """x rounded to fp16 and back (an fp16 KV cache), as float32."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(x)
    _k().round_fp16(x.reshape(-1), out.reshape(-1))
    return out


def silu(x: np.ndarray) -> np.ndarray:
    """ggml_silu_f32: x / (1 + exp(-x))."""
    with np.errstate(over="ignore"):
        return x / (np.float32(1.0) + np.exp(-x))


# ggml-cpu's type_traits_cpu[type].vec_dot_type: what a matmul's activations are converted to
# before the dot products with weights of that type
_Q8_0_TYPES = {"Q4_0", "Q5_0", "Q8_0", "Q1_0", "Q2_0", "IQ4_NL", "MXFP4", "NVFP4", "Q4_1", "Q5_1", "Q8_1"}
_Q8_K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
               "IQ1_S", "IQ1_M", "IQ4_XS", "TQ1_0", "TQ2_0"}


def activation_type(weight_type: str) -> str:
    """The type ggml-cpu converts matmul inputs to for weights of `weight_type` (Q8_1 gives the
    same values as Q8_0)."""
    if weight_type in _Q8_0_TYPES:
        return "Q8_0"
    if weight_type in _Q8_K_TYPES:
        return "Q8_K"
    if weight_type in ("F16", "BF16"):
        return weight_type
    return "F32"


def quantize_activations(x: np.ndarray, act_type: str) -> np.ndarray:
    """x [..., n] rounded as ggml-cpu rounds a matmul's input for the weight's vec_dot_type,
    returned dequantized (float32), so a float matmul sees the values ggml's integer dot sees.

    Q8_0 (quantize_row_q8_0, x86): per 32, d = amax/127 stored fp16, q = rint(x * 127/amax).
    Q8_K (quantize_row_q8_K_ref): per 256, iscale = -127/max (max: the signed value of largest
    magnitude, first wins), q = min(127, rint(iscale*x)), d = 1/iscale.
    """
    if act_type == "F32":
        return x
    if act_type == "F16":
        return round_fp16(x)
    if act_type == "BF16":
        u = np.ascontiguousarray(x, np.float32).view(np.uint32)
        u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000  # round to nearest even
        return u.view(np.float32)
    block = 32 if act_type == "Q8_0" else 256
    if x.shape[-1] % block:
        raise ValueError(f"{act_type} rounding needs rows of whole {block}-blocks, got {x.shape[-1]}")
    xc = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(xc)
    (_k().round_q8_0 if act_type == "Q8_0" else _k().round_q8_k)(xc.reshape(-1), out.reshape(-1))
    return out


@lru_cache(maxsize=16)
def rope_cache(n_pos: int, n_rot: int, base: float, scale: float,
               freq_factors: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape [n_pos, n_rot/2], as ggml_rope_cache_init with ext_factor = 0:
    theta_i = p * base^(-2i/n_rot), built by repeated float32 multiplication like ggml, then
    divided by the frequency factor (llama3 rope_freqs) and multiplied by freq_scale."""
    theta_scale = np.float32(math.pow(np.float32(base), np.float32(-2.0) / np.float32(n_rot)))
    half = n_rot // 2
    theta = np.empty((n_pos, half), np.float32)
    theta[:, 0] = np.arange(n_pos, dtype=np.float32)
    for i in range(1, half):
        theta[:, i] = theta[:, i - 1] * theta_scale
    if freq_factors is not None:
        theta = theta / np.frombuffer(freq_factors, np.float32)
    theta = theta * np.float32(scale)
    return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> np.ndarray:
    """ggml_rope_ext on x [T, n_heads, head_dim] with cos/sin [T, n_rot/2].
    NEOX rotates pairs (i, i + n_rot/2); normal (llama) rotates pairs (2i, 2i+1)."""
    n_rot = 2 * cos.shape[-1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = x.copy()
    if neox:
        x0, x1 = x[..., : n_rot // 2], x[..., n_rot // 2: n_rot]
        out[..., : n_rot // 2] = x0 * c - x1 * s
        out[..., n_rot // 2: n_rot] = x0 * s + x1 * c
    else:
        x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = x0 * c - x1 * s
        out[..., 1:n_rot:2] = x0 * s + x1 * c
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float32 (rows fully masked to -inf give NaN, as ggml)."""
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True, dtype=np.float64).astype(np.float32)


def attention_mask(n_q: int, n_kv: int, q_offset: int = 0, window: int = 0) -> np.ndarray:
    """Additive mask [n_q, n_kv]: 0 where query position q_offset+i may see key j, else -inf.
    Causal (j <= i); with a sliding window also i - j < window (llama_hparams::is_masked_swa)."""
    qpos = np.arange(q_offset, q_offset + n_q)[:, None]
    kpos = np.arange(n_kv)[None, :]
    visible = kpos <= qpos
    if window > 0:
        visible &= (qpos - kpos) < window
    return np.where(visible, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, window: int = 0,
              block: int = 64) -> np.ndarray:
    """Causal (optionally sliding-window) grouped-query attention, as ggml_flash_attn_ext.

    q [T, n_head, d], k [N, n_kv, d], v [N, n_kv, dv] -> [T, n_head * dv], N >= T: the queries
    are the last T positions of the N (N > T: the earlier keys come from a KV cache). Query rows
    go in blocks of `block`, each against only the keys it can see (causal: about half the work
    of the full square; memory is one block's scores; 64 measured fastest). Each kv head's query
    group is one 2-D product, which BLAS runs far faster than numpy's stacked matmul.
    """
    T, n_head, d = q.shape
    off = k.shape[0] - T  # position of the first query
    n_kv, dv = k.shape[1], v.shape[2]
    g = n_head // n_kv
    out = np.empty((T, n_kv, g, dv), np.float32)
    for h in range(n_kv):
        qh = np.ascontiguousarray(q[:, h * g:(h + 1) * g].transpose(1, 0, 2))  # [g, T, d]
        kh = np.ascontiguousarray(k[:, h])  # [T, d]
        vh = np.ascontiguousarray(v[:, h])  # [T, dv]
        for q0 in range(0, T, block):
            q1 = min(T, q0 + block)
            p0, p1 = off + q0, off + q1  # their positions
            k0 = max(0, p0 - window + 1) if window > 0 else 0  # earlier keys are outside every window
            qb = qh[:, q0:q1].reshape(g * (q1 - q0), d)
            s = (qb @ kh[k0:p1].T).reshape(g, q1 - q0, p1 - k0)  # [g, bq, bk]
            s *= np.float32(scale)
            s += attention_mask(q1 - q0, p1 - k0, p0 - k0, window)
            p = softmax(s).reshape(g * (q1 - q0), p1 - k0)
            out[q0:q1, h] = (p @ vh[k0:p1]).reshape(g, q1 - q0, dv).transpose(1, 0, 2)
    return out.reshape(T, n_head * dv)


def decode_attention(q: np.ndarray, kvs: list[tuple[np.ndarray, np.ndarray]], scale: float,
                     window: int = 0) -> np.ndarray:
    """`attention` for one new query of each of B sequences at once: q [B, n_head, d], kvs[b] the
    keys [N_b, n_kv, d] and values [N_b, n_kv, dv] of sequence b (its query is its last position)
    -> [B, n_head * dv]. The sequences are padded to the longest and the padding masked, so the
    products run batched instead of one small product per sequence."""
    B, n_head, d = q.shape
    n_kv, dv = kvs[0][0].shape[1], kvs[0][1].shape[2]
    g = n_head // n_kv
    n = np.array([k.shape[0] for k, _ in kvs])
    N = int(n.max())
    K = np.zeros((B, n_kv, N, d), np.float32)
    V = np.zeros((B, n_kv, N, dv), np.float32)
    for b, (k, v) in enumerate(kvs):
        K[b, :, : n[b]] = k.transpose(1, 0, 2)
        V[b, :, : n[b]] = v.transpose(1, 0, 2)
    j = np.arange(N)[None, :]
    visible = j < n[:, None]
    if window > 0:
        visible &= (n[:, None] - 1 - j) < window
    s = np.matmul(q.reshape(B, n_kv, g, d), K.transpose(0, 1, 3, 2))  # [B, n_kv, g, N]
    s *= np.float32(scale)
    s += np.where(visible, np.float32(0.0), np.float32(-np.inf))[:, None, None, :]
    p = softmax(s)
    return np.matmul(p, V).reshape(B, n_head * dv)

