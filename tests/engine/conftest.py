"""Tiny random decoder models in GGUF (written with gguf.GGUFWriter), one per architecture."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]

# a byte-fallback SPM vocabulary: specials, 256 byte tokens, a few pieces
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
PIECES = ["▁", "▁the", "▁a", "th", "he", "e", "t", "h", "a", "▁t", "s", "n", "▁s", "in", "an"]


def vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    scores = [0.0] * 4 + [0.0] * 256 + [-float(i) for i in range(len(PIECES))]
    types = [3, 3, 3, 2] + [6] * 256 + [1] * len(PIECES)
    return tokens, scores, types


def write_model(path: Path, arch: str, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                n_head_kv: int = 2, head_dim: int = 16, n_ff: int = 96, sliding_window: int = 0,
                swa_pattern: int = 2, tied: bool = True, qtype: str = "F32", seed: int = 0,
                zero_output: bool = False, bias: bool | None = None) -> Path:
    """A random model of `arch`; weights N(0, 0.15^2), norms near 1. qtype quantizes the 2-D
    layer weights (Q8_0 needs rows of 32)."""
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocab()
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0 if arch != "gemma3" else 1e6)
    if arch == "gemma3" and sliding_window:
        w.add_sliding_window(sliding_window)
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", swa_pattern)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(arch == "llama")

    def mat(rows: int, cols: int, scale: float = 0.15) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def add(name: str, arr: np.ndarray, quantize: bool = False) -> None:
        if quantize and qtype != "F32":
            qt = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, arr)

    add("token_embd.weight", mat(n_vocab, n_embd), quantize=True)
    add("output_norm.weight", norm(n_embd))
    if not tied:
        out = np.zeros((n_vocab, n_embd), np.float32) if zero_output else mat(n_vocab, n_embd)
        add("output.weight", out, quantize=True)
    with_bias = (arch == "qwen2") if bias is None else bias
    for il in range(n_layer):
        p = f"blk.{il}."
        add(p + "attn_norm.weight", norm(n_embd))
        add(p + "attn_q.weight", mat(n_head * head_dim, n_embd), quantize=True)
        add(p + "attn_k.weight", mat(n_head_kv * head_dim, n_embd), quantize=True)
        add(p + "attn_v.weight", mat(n_head_kv * head_dim, n_embd), quantize=True)
        add(p + "attn_output.weight", mat(n_embd, n_head * head_dim), quantize=True)
        if with_bias:
            add(p + "attn_q.bias", mat(1, n_head * head_dim)[0])
            add(p + "attn_k.bias", mat(1, n_head_kv * head_dim)[0])
            add(p + "attn_v.bias", mat(1, n_head_kv * head_dim)[0])
        if arch in ("qwen3", "gemma3"):
            add(p + "attn_q_norm.weight", norm(head_dim))
            add(p + "attn_k_norm.weight", norm(head_dim))
        if arch == "gemma3":
            add(p + "post_attention_norm.weight", norm(n_embd))
            add(p + "post_ffw_norm.weight", norm(n_embd))
        add(p + "ffn_norm.weight", norm(n_embd))
        add(p + "ffn_gate.weight", mat(n_ff, n_embd), quantize=True)
        add(p + "ffn_up.weight", mat(n_ff, n_embd), quantize=True)
        add(p + "ffn_down.weight", mat(n_embd, n_ff), quantize=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_model(tmp_path: Path):
    """tiny_model(arch, **kw) -> path of a freshly written random model."""
    count = [0]

    def make(arch: str, **kw) -> Path:
        count[0] += 1
        return write_model(tmp_path / f"{arch}-{count[0]}.gguf", arch, **kw)

    return make
