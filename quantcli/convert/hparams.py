"""config.json as llama.cpp's converter sees it, without transformers.

convert_hf_to_gguf reads `AutoConfig.from_pretrained(dir).to_dict()`, not the raw file: the config
class fills in defaults (Llama's `head_dim`, Gemma 3's `max_position_embeddings`, ...) and, since
transformers 5, folds `rope_theta` / `rope_scaling` / `rope_local_base_freq` into `rope_parameters`.
Those defaults change what lands in the GGUF (a Llama config without `head_dim` still gets
`llama.attention.key_length`), so they are reproduced here for the supported model types, as
transformers 5.23 computes them.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

# model_type -> defaults of its config class (only the keys the converter can read)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, rope_theta=10000.0),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
                    sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, rope_theta=10000.0),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                  max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True,
                        rope_theta=1_000_000.0, rope_local_base_freq=10000.0, sliding_window=4096,
                        final_logit_softcapping=None, attn_logit_softcapping=None,
                        query_pre_attn_scalar=256),
    "bert": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
                 layer_norm_eps=1e-12, pad_token_id=0, tie_word_embeddings=True),
}


def _kv_heads_default(h: dict[str, Any]) -> None:
    # num_key_value_heads=None means multi-head attention (Llama's default; Qwen's default is 32)
    if h.get("num_key_value_heads") is None:
        h["num_key_value_heads"] = h["num_attention_heads"]


def _head_dim_default(h: dict[str, Any]) -> None:
    # LlamaConfig / MistralConfig: head_dim=None means hidden_size // num_attention_heads
    if h.get("head_dim") is None:
        h["head_dim"] = h["hidden_size"] // h["num_attention_heads"]


_FIXUPS: dict[str, tuple[Callable[[dict[str, Any]], None], ...]] = {
    "llama": (_kv_heads_default, _head_dim_default),
    "mistral": (_kv_heads_default, _head_dim_default),
    "qwen2": (_kv_heads_default,),
    "qwen3": (_kv_heads_default,),
}


def _standard_rope(h: dict[str, Any], defaults: dict[str, Any]) -> None:
    """transformers 5 `standardize_rope_params`: rope_theta + rope_scaling -> rope_parameters."""
    theta = h.pop("rope_theta", None)
    scaling = h.pop("rope_scaling", None)
    if h.get("rope_parameters") is not None:
        return
    params = dict(scaling or {})
    params["rope_theta"] = theta if theta is not None else defaults["rope_theta"]
    params.setdefault("rope_type", params.get("type", "default"))
    h["rope_parameters"] = params


def _gemma3_rope(h: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Gemma 3: one set of parameters per attention kind (global layers and sliding-window layers)."""
    theta = h.pop("rope_theta", None)
    local = h.pop("rope_local_base_freq", None)
    scaling = h.pop("rope_scaling", None)
    if h.get("rope_parameters") is not None:
        return
    full = dict(scaling or {})
    full.setdefault("rope_type", full.get("type", "default"))
    full["rope_theta"] = theta if theta is not None else defaults["rope_theta"]
    sliding = {"rope_type": "default",
               "rope_theta": local if local is not None else defaults["rope_local_base_freq"]}
    h["rope_parameters"] = {"sliding_attention": sliding, "full_attention": full}


def converter_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """`config.json` -> the dict the converter works from (defaults filled, rope standardized)."""
    h = copy.deepcopy(config)
    if "text_config" in h and isinstance(h["text_config"], dict):
        h = {**h, **h["text_config"]}  # TextModel moves text_config to the root
    model_type = h.get("model_type")
    defaults = _DEFAULTS.get(model_type, {})
    for key, value in defaults.items():
        h.setdefault(key, value)
    if model_type == "gemma3_text":
        _gemma3_rope(h, defaults)
    elif "rope_theta" in defaults:
        _standard_rope(h, defaults)
    for fix in _FIXUPS.get(model_type, ()):
        fix(h)
    labels = h.get("id2label")
    if isinstance(labels, dict):  # JSON keys are strings; the config class makes them ints
        h["id2label"] = {int(k): v for k, v in labels.items()}
    else:
        h["id2label"] = {0: "LABEL_0", 1: "LABEL_1"}  # PretrainedConfig's num_labels=2
    return h
