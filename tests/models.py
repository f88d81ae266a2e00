"""The one builder of synthetic models for tests: a random decoder of a supported architecture in
GGUF, written with gguf-py's own GGUFWriter (independent of the code under test).

`write_model` covers every caller: the engine's per-architecture models (with a byte-fallback SPM
vocabulary), plain llamas with 256-divisible rows for quantize/verify/profiles (no vocabulary,
untied output, F32 or F16), and the partial 4-tensor model the format and report tests read
(`tensors=`). The crafted *corrupt* files stay in conftest (gguf_bytes, safetensors_bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import gguf
import numpy as np

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]

# a byte-fallback SPM vocabulary: specials, 256 byte tokens, a few pieces
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
PIECES = ["▁", "▁the", "▁a", "th", "he", "e", "t", "h", "a", "▁t", "s", "n", "▁s", "in", "an"]
N_VOCAB = len(SPECIALS) + 256 + len(PIECES)  # 275

# a plain llama as llama-quantize's k-quant rules see it: rows of 256, 4 KV heads (no GQA), an
# untied output and no vocabulary; pass n_layer (and any override) beside it
PLAIN_LLAMA = dict(n_embd=256, n_head_kv=4, n_ff=512, n_vocab=512, tokenizer=False, tied=False)


def vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    scores = [0.0] * 4 + [0.0] * 256 + [-float(i) for i in range(len(PIECES))]
    types = [3, 3, 3, 2] + [6] * 256 + [1] * len(PIECES)
    return tokens, scores, types


def write_model(
    path: Path,
    arch: str = "llama",
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int | None = None,  # None: n_embd // n_head
    n_ff: int = 96,
    n_vocab: int | None = None,  # rows of token_embd/output; None: the SPM vocabulary's 275
    tokenizer: bool = True,  # write the SPM vocabulary (the engine needs it); n_vocab must then be 275
    tied: bool = True,  # no output.weight: the head reuses token_embd
    dtype: str = "F32",  # type of the 2-D weights: F32, F16 or any type gguf-py quantizes (Q8_0: rows of 32)
    bias: bool | None = None,  # q/k/v biases; None: only qwen2 has them
    sliding_window: int = 0,  # gemma3 only
    swa_pattern: int = 2,  # gemma3: every swa_pattern-th layer is global
    seed: int = 0,
    scale: float = 0.15,  # standard deviation of the 2-D weights; norms are 1 + N(0, 0.1^2)
    zero_output: bool = False,  # an all-zero output.weight (untied): uniform logits
    tensors: Collection[str] | None = None,  # keep only these names (a partial model); None: all
    edit: Callable[[str, np.ndarray], np.ndarray] | None = None,  # (name, float32 array) -> the array written
) -> Path:
    """A random model of `arch`: 2-D weights N(0, scale^2), norms near 1, one generator drawn in
    file order (token_embd, output_norm, output, then each layer), so a model's weights depend
    only on its shapes and seed; `tensors` drops names after they are drawn."""
    head_dim = n_embd // n_head if head_dim is None else head_dim
    if n_vocab is None:
        n_vocab = N_VOCAB
    if tokenizer and n_vocab != N_VOCAB:
        raise ValueError(f"the SPM vocabulary has {N_VOCAB} tokens, n_vocab is {n_vocab}; "
                         "pass tokenizer=False for another size")
    rng = np.random.default_rng(seed)
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
    if tokenizer:
        tokens, scores, types = vocab()
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(arch == "llama")

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def add(name: str, arr: np.ndarray, weight: bool = False) -> None:
        if tensors is not None and name not in tensors:
            return
        if edit is not None:
            arr = edit(name, arr)
        if not weight or dtype == "F32":
            w.add_tensor(name, arr)
        elif dtype == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            qt = gguf.GGMLQuantizationType[dtype]
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)

    add("token_embd.weight", mat(n_vocab, n_embd), weight=True)
    add("output_norm.weight", norm(n_embd))
    if not tied:
        out = np.zeros((n_vocab, n_embd), np.float32) if zero_output else mat(n_vocab, n_embd)
        add("output.weight", out, weight=True)
    with_bias = (arch == "qwen2") if bias is None else bias
    for il in range(n_layer):
        p = f"blk.{il}."
        add(p + "attn_norm.weight", norm(n_embd))
        add(p + "attn_q.weight", mat(n_head * head_dim, n_embd), weight=True)
        add(p + "attn_k.weight", mat(n_head_kv * head_dim, n_embd), weight=True)
        add(p + "attn_v.weight", mat(n_head_kv * head_dim, n_embd), weight=True)
        add(p + "attn_output.weight", mat(n_embd, n_head * head_dim), weight=True)
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
        add(p + "ffn_gate.weight", mat(n_ff, n_embd), weight=True)
        add(p + "ffn_up.weight", mat(n_ff, n_embd), weight=True)
        add(p + "ffn_down.weight", mat(n_embd, n_ff), weight=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
