"""Hugging Face checkpoints seen as the GGUF llama.cpp's `convert_hf_to_gguf.py` would write.

    view = hf_to_gguf_view(SafetensorsReader(model_dir))
    view.kv                    # general.*, {arch}.*, tokenizer.ggml.* (general.file_type: the caller's)
    view.tensors               # GGUF names; numpy-order shapes; dtype = the checkpoint's (F32/F16/BF16)
    view.load_f32(name)        # the values the converter writes with --outtype f32
    converter_keeps_f32(name, n_dims)   # True where the converter keeps F32 under --outtype f16

Supported: LlamaForCausalLM (and Mistral), Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM,
BertModel. Everything else is an `InputError` that names these.
"""

from __future__ import annotations

import re

import gguf

from quantcli.convert.models import SUPPORTED_ARCHITECTURES
from quantcli.convert.view import HFModelView, hf_to_gguf_view

__all__ = ["HFModelView", "SUPPORTED_ARCHITECTURES", "converter_keeps_f32", "hf_to_gguf_view"]

# TextModel.prepare_tensors: tensor kinds the converter always writes as F32
_F32_KINDS = ("FFN_GATE_INP", "FFN_GATE_INP_SHEXP", "POS_EMBD", "TOKEN_TYPES", "SSM_CONV1D",
              "SHORTCONV_CONV", "TIME_MIX_FIRST", "TIME_MIX_W1", "TIME_MIX_W2", "TIME_MIX_DECAY_W1",
              "TIME_MIX_DECAY_W2", "TIME_MIX_LERP_FUSED", "POSNET_NORM1", "POSNET_NORM2",
              "V_ENC_EMBD_POS", "A_ENC_EMBD_POS", "ALTUP_CORRECT_COEF", "ALTUP_PREDICT_COEF",
              "SSM_CONV1D_Q", "SSM_CONV1D_K", "SSM_CONV1D_V", "INDEXER_PROJ")


def _f32_pattern() -> re.Pattern[str]:
    names = []
    for kind in _F32_KINDS:
        key = getattr(gguf.MODEL_TENSOR, kind, None)  # older gguf releases lack some kinds
        if key is not None and key in gguf.TENSOR_NAMES:
            names.append(re.escape(gguf.TENSOR_NAMES[key]).replace(re.escape("{bid}"), r"\d+"))
    return re.compile(r"(?:%s)\.weight" % "|".join(names))


_F32_NAMES = _f32_pattern()


def converter_keeps_f32(name: str, n_dims: int) -> bool:
    """Whether convert_hf_to_gguf writes this GGUF tensor as F32 whatever --outtype asks for:
    1-D tensors, norms, anything not named `.weight`, and the kinds llama.cpp keeps in F32
    (position and token-type embeddings, MoE routers, conv kernels ...)."""
    if n_dims <= 1 or name.endswith("_norm.weight"):
        return True
    if name[-7:] not in (".weight", ".lora_a", ".lora_b"):
        return True
    return _F32_NAMES.fullmatch(name) is not None
