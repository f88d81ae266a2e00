"""What a tensor's name says: its layer, its category, the group it belongs to.

One place for this knowledge, so the planner, the presets, the profiles, the report and the
calibration observers agree on it. Imports nothing from quantcli.

    layer_of("blk.12.attn_q.weight")      -> 12      (also HF `model.layers.12.`, BERT `layer.3.`)
    block_number("blk.12.attn_q.weight")  -> 12      (llama.cpp's sscanf "blk.%d.", GGUF names only)
    category("blk.0.attn_v.weight")       -> "attn_v" (llama.cpp's tensor_get_category)
    group("blk.0.ffn_up.weight")          -> "ffn"
"""

from __future__ import annotations

import re

# `blk.12.attn_q.weight` (GGUF), `model.layers.12.mlp...` (HF), `encoder.layer.3...` (BERT), `h.4` (GPT-2)
_LAYER = re.compile(r"(?:^|\.)(?:blk|layers|layer|h|blocks|block)\.(\d+)\.")
_BLOCK = re.compile(r"blk\.\s*([+-]?\d+)")


def layer_of(name: str) -> int | None:
    """The repeated block a tensor belongs to, in any of the common naming schemes; None outside them."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def block_number(name: str) -> int | None:
    """sscanf(name, "blk.%d.", &il) == 1 ? il : None (llama-quantize's test; the "." need not match)."""
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else None


# -- categories (llama.cpp's tensor_get_category) ------------------------------------------------

OUTPUT, TOKEN_EMBD, QKV, KV_B, ATTN_V, ATTN_K, ATTN_Q, ATTN_OUT, FFN_UP, FFN_GATE, FFN_DOWN, OTHER = (
    "output", "token_embd", "attn_qkv", "attn_kv_b", "attn_v", "attn_k", "attn_q", "attn_output",
    "ffn_up", "ffn_gate", "ffn_down", "other")
_CATEGORY_SUBSTRINGS = [("attn_qkv.weight", QKV), ("attn_kv_b.weight", KV_B), ("attn_v.weight", ATTN_V),
                        ("attn_k.weight", ATTN_K), ("attn_q.weight", ATTN_Q), ("attn_output.weight", ATTN_OUT),
                        ("ffn_up", FFN_UP), ("ffn_gate", FFN_GATE), ("ffn_down", FFN_DOWN)]


def category(name: str) -> str:
    """llama.cpp's category of a GGUF tensor name (the first substring that matches, in its order)."""
    if name == "output.weight":
        return OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return TOKEN_EMBD
    for sub, cat in _CATEGORY_SUBSTRINGS:
        if sub in name:
            return cat
    return OTHER


# -- groups: what a feature selects by ------------------------------------------------------------

ATTENTION, FFN, EMBEDDING, HEAD, NORM = "attention", "ffn", "embedding", "output", "norm"
_GROUP_OF = {QKV: ATTENTION, KV_B: ATTENTION, ATTN_V: ATTENTION, ATTN_K: ATTENTION, ATTN_Q: ATTENTION,
             ATTN_OUT: ATTENTION, FFN_UP: FFN, FFN_GATE: FFN, FFN_DOWN: FFN, TOKEN_EMBD: EMBEDDING,
             OUTPUT: HEAD}


def group(name: str) -> str:
    """attention / ffn / embedding / output / norm / other: the coarse kind of a GGUF tensor."""
    cat = category(name)
    if cat in _GROUP_OF:
        return _GROUP_OF[cat]
    if "norm" in name:
        return NORM
    return OTHER

