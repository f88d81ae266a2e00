"""Hyperparameters of a llama-family decoder, read from GGUF metadata as llama.cpp reads them.

Sources: `llama_model_base::load_hparams` (src/llama-model.cpp) for the shared keys and defaults,
`src/models/{llama,qwen2,qwen3,gemma3}.cpp` for what each architecture adds, and
`llama_model_rope_type` for NORM (llama) vs NEOX (qwen2, qwen3, gemma3) rotary embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from quantcli.errors import InputError

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int  # n_embd_head_k (= v for these architectures)
    head_dim_v: int
    n_ff: int
    n_vocab: int
    norm_eps: float
    n_rot: int  # rotary dimensions (the rest of a head passes through)
    rope_neox: bool  # NEOX pairs (i, i + n_rot/2) instead of (2i, 2i+1)
    rope_base: float
    rope_scale: float  # freq_scale = 1 / rope.scaling.factor (linear scaling)
    rope_base_swa: float  # gemma3 local layers
    rope_scale_swa: float
    attn_scale: float  # multiplies q·k
    embed_scale: float  # gemma: sqrt(n_embd)
    qk_norm: bool  # RMS norm over each head of q and k (qwen3, gemma3)
    post_norms: bool  # gemma3: norm after attention and after the FFN, before the residual add
    act: str  # "silu" (SwiGLU) or "gelu" (GeGLU, ggml's tanh approximation)
    sliding_window: int  # 0: none
    swa_layers: tuple[bool, ...]  # per layer: uses the sliding window
    final_logit_softcap: float  # 0: none
    bos_id: int | None
    add_bos: bool

    def is_swa(self, il: int) -> bool:
        return self.sliding_window > 0 and self.swa_layers[il]

    @classmethod
    def from_reader(cls, reader: Any) -> "ModelConfig":
        return config_from_meta(reader.meta, reader.tensors)


def _int(v: Any, what: str) -> int:
    """A per-layer array must be uniform here (the engine has one shape for all layers)."""
    if isinstance(v, (list, tuple, np.ndarray)):
        vals = {int(x) for x in v}
        if len(vals) != 1:
            raise InputError(f"{what} varies per layer ({sorted(vals)}); not supported by the engine")
        return vals.pop()
    return int(v)


def config_from_meta(meta: Any, tensors: dict) -> ModelConfig:
    """Build the config from `meta(key, default)` and the tensor table (for vocab size, tying)."""
    arch = meta("general.architecture", None)
    if arch not in ARCHITECTURES:
        raise InputError(f"architecture '{arch}' is not supported by the calibration engine; "
                         f"supported: {', '.join(ARCHITECTURES)}")

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        v = meta(f"{arch}.{name}", None)
        if v is None:
            if required:
                raise InputError(f"metadata key '{arch}.{name}' is missing")
            return default
        return v

    n_layer = _int(key("block_count", required=True), "block_count")
    n_embd = _int(key("embedding_length", required=True), "embedding_length")
    n_head = _int(key("attention.head_count", required=True), "head_count")
    n_head_kv = _int(key("attention.head_count_kv", n_head), "head_count_kv")
    n_ff = _int(key("feed_forward_length", required=True), "feed_forward_length")
    head_dim = int(key("attention.key_length", n_embd // n_head))
    head_dim_v = int(key("attention.value_length", n_embd // n_head))
    n_rot = int(key("rope.dimension_count", head_dim))
    eps = float(key("attention.layer_norm_rms_epsilon", required=True))

    if "token_embd.weight" not in tensors:
        raise InputError("the model has no token_embd.weight")
    n_vocab = int(tensors["token_embd.weight"].shape[0])

    scaling = key("rope.scaling.type", "linear")
    if scaling not in ("linear", "none"):
        raise InputError(f"rope scaling '{scaling}' is not supported by the engine (linear, none are)")
    factor = float(key("rope.scaling.factor", 0.0) or key("rope.scale_linear", 0.0) or 0.0)
    rope_scale = 1.0 if factor == 0.0 else 1.0 / factor

    sliding_window = 0
    swa_layers = (False,) * n_layer
    attn_scale = 1.0 / math.sqrt(head_dim)
    embed_scale = 1.0
    if arch == "gemma3":
        sliding_window = int(key("attention.sliding_window", 0) or 0)
        pattern = key("attention.sliding_window_pattern", 6)
        if isinstance(pattern, (list, tuple, np.ndarray)):
            swa_layers = tuple(bool(p) for p in pattern)[:n_layer]
        else:  # llama_hparams::set_swa_pattern(n_pattern, dense_first=false)
            p = int(pattern)
            swa_layers = tuple(p == 0 or (il % p < p - 1) for il in range(n_layer))
        if n_layer == 62:  # Gemma 3 27B scales by n_embd / n_head (gemma3.cpp)
            attn_scale = 1.0 / math.sqrt(n_embd / n_head)
        embed_scale = math.sqrt(n_embd)
    bos = meta("tokenizer.ggml.bos_token_id", None)
    add_bos = meta("tokenizer.ggml.add_bos_token", None)
    if add_bos is None:  # llama.cpp's defaults: SPM adds BOS, BPE only with the llama3 family
        from quantcli.engine.tokenizer import BPE_ADDS_BOS

        add_bos = (meta("tokenizer.ggml.model", "llama") == "llama"
                   or meta("tokenizer.ggml.pre", "") in BPE_ADDS_BOS)
    return ModelConfig(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        head_dim=head_dim, head_dim_v=head_dim_v, n_ff=n_ff, n_vocab=n_vocab, norm_eps=eps,
        n_rot=n_rot, rope_neox=arch != "llama",
        rope_base=float(key("rope.freq_base", 10000.0)), rope_scale=rope_scale,
        rope_base_swa=float(key("rope.freq_base_swa", 10000.0)), rope_scale_swa=1.0,
        attn_scale=attn_scale, embed_scale=embed_scale,
        qk_norm=arch in ("qwen3", "gemma3"), post_norms=arch == "gemma3",
        act="gelu" if arch == "gemma3" else "silu",
        sliding_window=sliding_window, swa_layers=swa_layers,
        final_logit_softcap=float(key("final_logit_softcapping", 0.0) or 0.0),
        bos_id=None if bos is None else int(bos), add_bos=bool(add_bos),
    )
