"""GGUF-shaped models back to Hugging Face checkpoints: the inverse of `convert/models.py`.

    layout = HFLayout.of(reader, config)      # architecture, heads, config.json's vocabulary size
    layout.name("blk.3.attn_q.weight")        # "model.layers.3.self_attn.q_proj.weight" (None: llama.cpp's own)
    layout.module("blk.3.attn_q.weight")      # "model.layers.3.self_attn.q_proj"
    layout.to_hf("blk.3.attn_q.weight", x)    # the values the HF checkpoint holds
    hf_config(reader)                         # config.json from GGUF metadata (a GGUF source)

Names are gguf-py's tensor mapping read backwards, for llama (and Mistral), qwen2, qwen3 and gemma3
(text only: Gemma3ForCausalLM). Values undo exactly what the converter does to them: llama's q/k
rows go back from llama.cpp's rotary layout (`Permute`) to HF's, Gemma's norm weights lose the 1
the converter adds (`Shift(1.0)`) and Gemma's embedding gets back, as zero rows, the rows past the
tokenizer that the converter drops (`FirstRows`). `rope_freqs.weight`, which llama.cpp's converter
makes from Llama 3's `rope_scaling`, has no HF tensor: it goes back into `rope_scaling` instead.

Reading such a directory with `hf_to_gguf_view` gives the source's tensors again, bit for bit
(a tensor stored in a quantized GGML type: its F16 rounding), except a Gemma norm below 0.5 in
F32 or F16 (x - 1 + 1 can round there; the converter's own `+ 1` of an F16 norm already rounds)
— Gemma's norms are near 1 in GGUF, so in practice none.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
from gguf import Keys

from quantcli.convert.models import Converter, Permute, llama3_rope_factors
from quantcli.errors import InputError

# GGUF architecture -> (config.json `architectures[0]`, `model_type`) written for a GGUF source
HF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}

# stored dtype -> config.json's torch_dtype; anything else (a quantized GGML type) is written F16
TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
# blk.N.<linear>.{weight,bias} -> model.layers.N.<module>.{weight,bias}
LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_LLAMA_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
# blk.N.<norm>.weight -> model.layers.N.<module>.weight, per architecture (gguf-py's tensor_mapping)
_NORMS = {
    "llama": _LLAMA_NORMS,
    "qwen2": _LLAMA_NORMS,
    "qwen3": {**_LLAMA_NORMS, **_QK_NORMS},
    "gemma3": {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
               **_QK_NORMS},
}
_SKIPPED = ("rope_freqs.weight",)  # llama.cpp's Llama 3 rope factors: config.json's rope_scaling in HF
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Llama 3.1-3.3's rope_scaling besides `factor` (its model cards' config.json): the values tried when
# rope_freqs.weight has to be put back into config.json
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _meta(reader: Any, key: str, default: Any = None) -> Any:
    kv = reader.kv.get(key)
    return default if kv is None else kv.value


def _f32(value: Any) -> float:
    """A GGUF float32 as the decimal it was written from (1e-06, not 9.999999974752427e-07)."""
    return float(str(np.float32(value)))


def stored_dtype(dtype: str) -> str:
    """The safetensors dtype a non-quantized tensor is written in: F32, F16 and BF16 as stored, a
    quantized GGML type (Q8_0, Q4_K, ...) decoded and written F16."""
    return dtype if dtype in TORCH_DTYPES else "F16"


def block_linear(name: str) -> tuple[int, str] | None:
    """(layer, kind) of a block linear's weight (`blk.3.attn_q.weight` -> (3, "attn_q")), else None."""
    m = _BLOCK.fullmatch(name)
    if m is None or m.group(3) != "weight" or m.group(2) not in LINEARS:
        return None
    return int(m.group(1)), m.group(2)


@dataclass(frozen=True)
class HFLayout:
    """How one model's GGUF tensors become Hugging Face tensors: names, row order, values."""

    arch: str  # GGUF architecture: llama, qwen2, qwen3 or gemma3
    n_head: int
    n_head_kv: int
    vocab_size: int | None = None  # config.json's; Gemma 3's embedding is padded back to it

    @classmethod
    def of(cls, reader: Any, config: Mapping[str, Any] | None = None) -> "HFLayout":
        """The layout of `reader`'s model; `config` (the config.json written beside it) must be of
        an HF architecture llama.cpp converts to the reader's architecture."""
        arch = _meta(reader, "general.architecture")
        if arch not in HF_ARCHITECTURES:
            raise InputError(f"{reader.path}: architecture '{arch}' cannot be written as a Hugging Face "
                             f"checkpoint; supported: {', '.join(HF_ARCHITECTURES)}")
        if config is not None:
            archs = config.get("architectures") or [None]
            conv = Converter.registry.get(archs[0])
            if conv is None or gguf.MODEL_ARCH_NAMES[conv.gguf_arch] != arch:
                raise InputError(f"config.json's architecture {archs[0]!r} is not the model's ({arch}: "
                                 f"{HF_ARCHITECTURES[arch][0]})", hint="pass the source model's own config.json")
        n_head = _meta(reader, Keys.Attention.HEAD_COUNT.format(arch=arch))
        if n_head is None:
            raise InputError(f"{reader.path}: metadata key '{arch}.attention.head_count' is missing")
        n_head_kv = _meta(reader, Keys.Attention.HEAD_COUNT_KV.format(arch=arch), n_head)
        vocab = config.get("vocab_size") if config is not None else None
        return cls(arch, int(n_head), int(n_head_kv), None if vocab is None else int(vocab))

    def name(self, name: str) -> str | None:
        """The HF name of a GGUF tensor; None for a tensor HF does not store (`rope_freqs.weight`)."""
        if name in _GLOBAL:
            return _GLOBAL[name]
        if name in _SKIPPED:
            return None
        m = _BLOCK.fullmatch(name)
        if m is not None:
            layer, kind, suffix = m.groups()
            module = LINEARS.get(kind) or (_NORMS[self.arch].get(kind) if suffix == "weight" else None)
            if module is not None:
                return f"model.layers.{layer}.{module}.{suffix}"
        raise InputError(f"tensor '{name}' has no Hugging Face name in a {self.arch} model")

    def module(self, name: str) -> str:
        """The HF module of a block linear's weight (what compressed-tensors' `ignore` lists)."""
        if block_linear(name) is None:
            raise InputError(f"'{name}' is not a block linear's weight (blk.N.attn_q.weight, ...)")
        return self.name(name).removesuffix(".weight")  # type: ignore[union-attr]

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF shape of a GGUF tensor of `shape` (numpy order)."""
        pad = self._padded_rows(name, shape)
        return (pad, *shape[1:]) if pad else tuple(shape)

    def to_hf(self, name: str, x: np.ndarray) -> np.ndarray:
        """A GGUF tensor's float32 values as the HF checkpoint holds them (a new array)."""
        x = np.array(x, dtype=np.float32)  # (rows, cols) or (n,)
        hf = self.name(name) or ""
        heads = self._permuted_heads(hf)
        if heads:
            Permute(heads).shape(x.shape)  # rows must split into heads: an InputError otherwise
            x = x[np.argsort(Permute(heads).rows(x.shape[0]))]  # gguf[r] = hf[idx[r]]
        if self.arch == "gemma3" and hf.endswith("norm.weight"):  # Gemma3Model.modify_tensors adds 1
            x -= np.float32(1.0)
        if (rows := self._padded_rows(name, x.shape)):
            x = np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), np.float32)])
        return x

    def _permuted_heads(self, hf_name: str) -> int:
        """LlamaModel.modify_tensors: q rows permuted over n_head, k rows over n_head_kv; 0: none."""
        if self.arch != "llama":
            return 0
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return self.n_head
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return self.n_head_kv
        return 0

    def _padded_rows(self, name: str, shape: tuple[int, ...]) -> int:
        """Gemma3Model.modify_tensors keeps the embedding rows the tokenizer can produce: the rows up
        to config.json's vocab_size come back (as zeros). 0: the shape stays."""
        if self.arch == "gemma3" and name == "token_embd.weight" and self.vocab_size and self.vocab_size > shape[0]:
            return self.vocab_size
        return 0


# -- config.json ---------------------------------------------------------------------------------


def hf_config(reader: Any) -> dict[str, Any]:
    """config.json for a GGUF model, from its metadata read as `engine/config.py` reads it, in the
    transformers 4 form the Hub's configs have (`rope_theta`, `rope_scaling`, `rope_local_base_freq`,
    which transformers 5 folds into `rope_parameters` itself). Converting it back with
    `hf_to_gguf_view` gives the same `{arch}.*` metadata, but for a Gemma sliding-window pattern
    other than 6: llama.cpp's converter writes none (llama.cpp assumes 6), while `layer_types`
    here is the model's own."""
    arch = _meta(reader, "general.architecture")
    if arch not in HF_ARCHITECTURES:
        raise InputError(f"{reader.path}: architecture '{arch}' cannot be written as a Hugging Face "
                         f"checkpoint; supported: {', '.join(HF_ARCHITECTURES)}")

    def key(template: str, default: Any = None, required: bool = False) -> Any:
        name = template.format(arch=arch)
        value = _meta(reader, name, default)
        if value is None and required:
            raise InputError(f"{reader.path}: metadata key '{name}' is missing")
        return value

    if "token_embd.weight" not in reader.tensors:
        raise InputError(f"{reader.path}: the model has no token_embd.weight")
    embd = reader.tensors["token_embd.weight"]
    n_embd = int(key(Keys.LLM.EMBEDDING_LENGTH, required=True))
    n_head = int(key(Keys.Attention.HEAD_COUNT, required=True))
    n_layer = int(key(Keys.LLM.BLOCK_COUNT, required=True))
    head_dim = int(key(Keys.Attention.KEY_LENGTH, n_embd // n_head))
    if int(key(Keys.Rope.DIMENSION_COUNT, head_dim)) != head_dim:
        raise InputError(f"{reader.path}: rotary embeddings over part of a head "
                         f"({key(Keys.Rope.DIMENSION_COUNT)} of {head_dim}) are not supported")
    hf_arch, model_type = HF_ARCHITECTURES[arch]
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": n_embd,
        "intermediate_size": int(key(Keys.LLM.FEED_FORWARD_LENGTH, required=True)),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": int(key(Keys.Attention.HEAD_COUNT_KV, n_head)),
        "rms_norm_eps": _f32(key(Keys.Attention.LAYERNORM_RMS_EPS, required=True)),
        "rope_theta": _f32(key(Keys.Rope.FREQ_BASE, 1e6 if arch == "gemma3" else 10000.0)),
        "max_position_embeddings": int(key(Keys.LLM.CONTEXT_LENGTH, required=True)),
        "vocab_size": int(embd.shape[0]),
        "tie_word_embeddings": "output.weight" not in reader.tensors,
        "torch_dtype": TORCH_DTYPES[stored_dtype(embd.dtype)],
    }
    # the converter writes key_length exactly when config.json has head_dim (after the config class's
    # defaults: Qwen 3's and Gemma 3's are 128 and 256, not hidden_size / heads)
    if key(Keys.Attention.KEY_LENGTH) is not None or arch in ("qwen3", "gemma3"):
        cfg["head_dim"] = head_dim
    for field, gguf_key in (("bos_token_id", Keys.Tokenizer.BOS_ID), ("eos_token_id", Keys.Tokenizer.EOS_ID),
                            ("pad_token_id", Keys.Tokenizer.PAD_ID)):
        if (token := _meta(reader, gguf_key)) is not None:
            cfg[field] = int(token)
    if (scaling := _rope_scaling(reader, arch, key, head_dim)) is not None:
        cfg["rope_scaling"] = scaling
    has_bias = "blk.0.attn_q.bias" in reader.tensors
    if arch == "gemma3":
        cfg.update(_gemma3(key, n_embd, n_head, n_layer, head_dim))
    else:
        cfg["hidden_act"] = "silu"
    if arch in ("llama", "qwen3"):
        cfg["attention_bias"] = has_bias
    if arch == "llama":
        cfg["mlp_bias"] = "blk.0.ffn_gate.bias" in reader.tensors
    if arch == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


def _rope_scaling(reader: Any, arch: str, key: Any, head_dim: int) -> dict[str, Any] | None:
    """Converter.set_gguf_parameters' rope scaling read backwards; Llama 3's from rope_freqs.weight."""
    kind = key(Keys.Rope.SCALING_TYPE, "none")
    factor = key(Keys.Rope.SCALING_FACTOR) or key("{arch}.rope.scale_linear")
    if "rope_freqs.weight" in reader.tensors:
        return _llama3_rope(reader, key, head_dim)
    if kind in ("none", None) or (kind == "linear" and not factor):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": _f32(factor),
               "original_max_position_embeddings": int(key(Keys.Rope.SCALING_ORIG_CTX_LEN, required=True))}
        for field, gguf_key in (("extrapolation_factor", Keys.Rope.SCALING_YARN_EXT_FACTOR),
                                ("attention_factor", Keys.Rope.SCALING_YARN_ATTN_FACTOR),
                                ("beta_fast", Keys.Rope.SCALING_YARN_BETA_FAST),
                                ("beta_slow", Keys.Rope.SCALING_YARN_BETA_SLOW)):
            if (value := key(gguf_key)) is not None:
                out[field] = _f32(value)
        return out
    raise InputError(f"{reader.path}: rope scaling '{kind}' cannot be written to config.json "
                     "(linear, yarn and Llama 3's can)", hint="pass the source model's own config.json")


def _llama3_rope(reader: Any, key: Any, head_dim: int) -> dict[str, Any]:
    """The rope_scaling that llama3_rope_factors turns into this rope_freqs.weight: `factor` is its
    largest entry; the other parameters must be Llama 3.1's (the tensor does not determine them)."""
    freqs = reader.load_f32("rope_freqs.weight").reshape(-1)  # (head_dim / 2,)
    theta = _f32(key(Keys.Rope.FREQ_BASE, 10000.0))
    scaling = {"rope_type": "llama3", "factor": _f32(freqs.max()), **_LLAMA3_ROPE}
    want = llama3_rope_factors(theta, head_dim, scaling["factor"], _LLAMA3_ROPE["low_freq_factor"],
                               _LLAMA3_ROPE["high_freq_factor"], _LLAMA3_ROPE["original_max_position_embeddings"])
    if want.shape != freqs.shape or not np.allclose(want, freqs, rtol=1e-6, atol=0):
        raise InputError(f"{reader.path}: rope_freqs.weight is not Llama 3's rope scaling with factor "
                         f"{scaling['factor']}, low/high frequency factors 1 and 4 and 8192 original positions",
                         hint="pass the source model's own config.json")
    return scaling


def _gemma3(key: Any, n_embd: int, n_head: int, n_layer: int, head_dim: int) -> dict[str, Any]:
    """Gemma3TextConfig's own fields, from the keys engine/config.py reads (and its defaults)."""
    window = int(key(Keys.Attention.SLIDING_WINDOW, 0) or 0)
    pattern = key(Keys.Attention.SLIDING_WINDOW_PATTERN, 6)
    if isinstance(pattern, (list, tuple, np.ndarray)):
        sliding = [bool(p) for p in pattern][:n_layer]
    else:  # llama_hparams::set_swa_pattern: every pattern-th layer is global (transformers: (i+1) % p)
        p = int(pattern)
        sliding = [p == 0 or il % p < p - 1 for il in range(n_layer)]
    if not window:
        sliding = [False] * n_layer
    out: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        # attention scores times query_pre_attn_scalar**-0.5: head_dim, except Gemma 3 27B (gemma3.cpp)
        "query_pre_attn_scalar": n_embd // n_head if n_layer == 62 else head_dim,
        "sliding_window": window or None,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_local_base_freq": _f32(key(Keys.Rope.FREQ_BASE_SWA, 10000.0)),
        "final_logit_softcapping": _f32(v) if (v := key(Keys.LLM.FINAL_LOGIT_SOFTCAPPING)) else None,
        "attn_logit_softcapping": None,  # Gemma 3 has none (the converter refuses one)
    }
    if not window:
        out["sliding_window_pattern"] = 1  # the converter then writes no sliding window
    elif not isinstance(pattern, (list, tuple, np.ndarray)):
        out["sliding_window_pattern"] = int(pattern)
    return out
