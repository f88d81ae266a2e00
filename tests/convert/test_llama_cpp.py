"""The converted GGUF runs in llama.cpp and gives the logits of the original weights.

Optional: skipped unless `llama_cpp` (llama-cpp-python) is importable. The reference is a numpy
forward pass over the checkpoint's own tensors with Hugging Face's conventions (rotate-half rope on
unpermuted q/k), so a wrong q/k permutation, norm offset or name shows up as different logits.
"""

from __future__ import annotations

import numpy as np
import pytest

from quantcli.convert import hf_to_gguf_view
from quantcli.formats import SafetensorsReader
from tests.convert.checkpoints import build, write_converted

llama_cpp = pytest.importorskip("llama_cpp")

TOKENS = [2, 10, 300, 500, 1000, 42, 77, 1200, 5, 901]


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    # [..., d] -> [..., d]
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, theta: float) -> np.ndarray:
    """HF rotate_half rope. x: [T, n_head, hd] -> [T, n_head, hd]."""
    t, _, hd = x.shape
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(t)[:, None] * inv[None, :]  # [T, hd/2]
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1)[:, None, :]
    rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], axis=-1)
    return x * cos + rot * sin


def forward(w: dict[str, np.ndarray], cfg: dict, ids: list[int]) -> np.ndarray:
    """Llama / Mistral / Qwen3 decoder in float64. ids: [T] -> logits [T, n_vocab]."""
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    eps, theta = cfg.get("rms_norm_eps", 1e-6), cfg.get("rope_theta", 10000.0)
    x = w["model.embed_tokens.weight"][ids]  # [T, H]
    t = len(ids)
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, nh, hd)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, nkv, hd)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, nkv, hd)
        if p + "self_attn.q_norm.weight" in w:
            q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = rope(q, theta), rope(k, theta)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask  # [nh, T, T]
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", att, v).reshape(t, nh * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


@pytest.mark.parametrize("name", ["llama-spm", "mistral-hf", "qwen3"])
def test_logits_match_numpy_forward(name, tmp_path):
    import json

    d = build(name, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    with SafetensorsReader(d) as src:
        w = {n: src.load_f32(n).astype(np.float64) for n in src.tensors}
    with hf_to_gguf_view(SafetensorsReader(d)) as view:
        out = write_converted(view, tmp_path / f"{name}.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=32, n_batch=32, logits_all=True, n_threads=1,
                          type_k=0, type_v=0, verbose=False)  # F32 KV cache: no F16 rounding
    llm.eval(TOKENS)
    got = np.array(llm.scores[:len(TOKENS)], dtype=np.float64)
    want = forward(w, cfg, TOKENS)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())
