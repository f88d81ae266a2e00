"""llama-quantize's presets: which type every tensor gets, exactly as llama.cpp chooses it.

A port of `src/llama-quant.cpp` (`tensor_allows_quantization`, `llama_tensor_get_type`,
`llama_tensor_get_type_impl`, `tensor_type_fallback`, `tensor_requires_imatrix`,
`llama_ftype_get_default_type`, the preliminary loop of `llama_model_quantize_impl`) and of the preset
table in `tools/quantize/quantize.cpp`, from the llama.cpp vendored in llama-cpp-python 0.3.36.

    preset = get_preset("Q4_K_M")                    # .ftype 15, .default_type "Q4_K"
    choices = plan(reader.tensors.values(), reader.meta, "Q4_K_M", PresetOptions(has_imatrix=True))
    choices[0]  # TensorChoice(name="token_embd.weight", type="Q8_0", reason="...", fallback=False)

Shapes are numpy order (rows, cols); llama.cpp's ne[0] (the row length) is `shape[-1]`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, Sequence

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType as FT

from quantcli import names
from quantcli.errors import InputError, UsageError

# -- GGML types ------------------------------------------------------------------------------------

_UNQUANTIZED = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}  # ggml_is_quantized() false
_IQ_LOW = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"}  # need an imatrix (tensor_requires_imatrix)


def _block(type_name: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]


def is_quantized(type_name: str) -> bool:
    """ggml_is_quantized; False for dtypes GGML has no type for (safetensors' U8, BOOL)."""
    return type_name in GGMLQuantizationType.__members__ and type_name not in _UNQUANTIZED


def ggml_type_name(name: str, what: str = "type") -> str:
    """A GGML type name as gguf spells it ("q4_k" -> "Q4_K"); llama-quantize matches case-insensitively."""
    for t in GGMLQuantizationType:
        if t.name.lower() == str(name).lower():
            return t.name
    known = ", ".join(t.name for t in GGMLQuantizationType)
    raise UsageError(f"unknown {what} '{name}'; known: {known}", hint="use a GGML type name such as Q8_0 or Q4_K")


# -- presets ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """One of llama-quantize's QUANT_OPTIONS."""

    name: str  # as llama-quantize prints it (aliases keep their own name: "Q4_K")
    ftype: int  # llama_ftype, written as general.file_type (COPY: the input's file type, see file_type())
    default_type: str  # llama_ftype_get_default_type
    description: str
    requires_imatrix: bool  # llama-quantize refuses to run it without --imatrix (for usual models)


# name, ftype, default type, description (tools/quantize/quantize.cpp QUANT_OPTIONS, in order)
_PRESETS: list[tuple[str, FT, str, str]] = [
    ("Q4_0", FT.MOSTLY_Q4_0, "Q4_0", " 4.34G, +0.4685 ppl @ Llama-3-8B"),
    ("Q4_1", FT.MOSTLY_Q4_1, "Q4_1", " 4.78G, +0.4511 ppl @ Llama-3-8B"),
    ("Q5_0", FT.MOSTLY_Q5_0, "Q5_0", " 5.21G, +0.1316 ppl @ Llama-3-8B"),
    ("Q5_1", FT.MOSTLY_Q5_1, "Q5_1", " 5.65G, +0.1062 ppl @ Llama-3-8B"),
    ("IQ2_XXS", FT.MOSTLY_IQ2_XXS, "IQ2_XXS", " 2.06 bpw quantization"),
    ("IQ2_XS", FT.MOSTLY_IQ2_XS, "IQ2_XS", " 2.31 bpw quantization"),
    ("IQ2_S", FT.MOSTLY_IQ2_S, "IQ2_XS", " 2.5  bpw quantization"),
    ("IQ2_M", FT.MOSTLY_IQ2_M, "IQ2_S", " 2.7  bpw quantization"),
    ("IQ1_S", FT.MOSTLY_IQ1_S, "IQ1_S", " 1.56 bpw quantization"),
    ("IQ1_M", FT.MOSTLY_IQ1_M, "IQ1_M", " 1.75 bpw quantization"),
    ("TQ1_0", FT.MOSTLY_TQ1_0, "TQ1_0", " 1.69 bpw ternarization"),
    ("TQ2_0", FT.MOSTLY_TQ2_0, "TQ2_0", " 2.06 bpw ternarization"),
    ("Q2_K", FT.MOSTLY_Q2_K, "Q2_K", " 2.96G, +3.5199 ppl @ Llama-3-8B"),
    ("Q2_K_S", FT.MOSTLY_Q2_K_S, "Q2_K", " 2.96G, +3.1836 ppl @ Llama-3-8B"),
    ("IQ3_XXS", FT.MOSTLY_IQ3_XXS, "IQ3_XXS", " 3.06 bpw quantization"),
    ("IQ3_S", FT.MOSTLY_IQ3_S, "IQ3_S", " 3.44 bpw quantization"),
    ("IQ3_M", FT.MOSTLY_IQ3_M, "IQ3_S", " 3.66 bpw quantization mix"),
    ("Q3_K", FT.MOSTLY_Q3_K_M, "Q3_K", "alias for Q3_K_M"),
    ("IQ3_XS", FT.MOSTLY_IQ3_XS, "IQ3_S", " 3.3 bpw quantization"),
    ("Q3_K_S", FT.MOSTLY_Q3_K_S, "Q3_K", " 3.41G, +1.6321 ppl @ Llama-3-8B"),
    ("Q3_K_M", FT.MOSTLY_Q3_K_M, "Q3_K", " 3.74G, +0.6569 ppl @ Llama-3-8B"),
    ("Q3_K_L", FT.MOSTLY_Q3_K_L, "Q3_K", " 4.03G, +0.5562 ppl @ Llama-3-8B"),
    ("IQ4_NL", FT.MOSTLY_IQ4_NL, "IQ4_NL", " 4.50 bpw non-linear quantization"),
    ("IQ4_XS", FT.MOSTLY_IQ4_XS, "IQ4_XS", " 4.25 bpw non-linear quantization"),
    ("Q4_K", FT.MOSTLY_Q4_K_M, "Q4_K", "alias for Q4_K_M"),
    ("Q4_K_S", FT.MOSTLY_Q4_K_S, "Q4_K", " 4.37G, +0.2689 ppl @ Llama-3-8B"),
    ("Q4_K_M", FT.MOSTLY_Q4_K_M, "Q4_K", " 4.58G, +0.1754 ppl @ Llama-3-8B"),
    ("Q5_K", FT.MOSTLY_Q5_K_M, "Q5_K", "alias for Q5_K_M"),
    ("Q5_K_S", FT.MOSTLY_Q5_K_S, "Q5_K", " 5.21G, +0.1049 ppl @ Llama-3-8B"),
    ("Q5_K_M", FT.MOSTLY_Q5_K_M, "Q5_K", " 5.33G, +0.0569 ppl @ Llama-3-8B"),
    ("Q6_K", FT.MOSTLY_Q6_K, "Q6_K", " 6.14G, +0.0217 ppl @ Llama-3-8B"),
    ("Q8_0", FT.MOSTLY_Q8_0, "Q8_0", " 7.96G, +0.0026 ppl @ Llama-3-8B"),
    ("F16", FT.MOSTLY_F16, "F16", "14.00G, +0.0020 ppl @ Mistral-7B"),
    ("BF16", FT.MOSTLY_BF16, "BF16", "14.00G, -0.0050 ppl @ Mistral-7B"),
    ("F32", FT.ALL_F32, "F32", "26.00G              @ 7B"),
    ("COPY", FT.ALL_F32, "F32", "only copy tensors, no quantizing"),  # after F32 so "0" parses as F32
]
# presets whose usual plan holds a type that tensor_requires_imatrix() flags (IQ3_XS: attn_q/attn_k -> IQ3_XXS)
_NEED_IMATRIX = {FT.MOSTLY_IQ1_S, FT.MOSTLY_IQ1_M, FT.MOSTLY_IQ2_XXS, FT.MOSTLY_IQ2_XS, FT.MOSTLY_IQ2_S,
                 FT.MOSTLY_IQ2_M, FT.MOSTLY_IQ3_XXS, FT.MOSTLY_IQ3_XS, FT.MOSTLY_Q2_K_S}

PRESETS: dict[str, Preset] = {
    name: Preset(name, int(ftype), default, desc.strip(), ftype in _NEED_IMATRIX)
    for name, ftype, default, desc in _PRESETS
}


def get_preset(name: str | int) -> Preset:
    """A preset by name (case-insensitive) or by ftype id, as llama-quantize's try_parse_ftype."""
    key = str(name).strip().upper()
    if key in PRESETS:
        return PRESETS[key]
    if key.isdigit():
        for preset in PRESETS.values():
            if preset.ftype == int(key):
                return preset
    raise UsageError(f"unknown preset '{name}'; known: {', '.join(PRESETS)}",
                     hint="pick one of llama-quantize's presets, e.g. Q4_K_M, Q8_0 or IQ4_XS")


# -- inputs ----------------------------------------------------------------------------------------


class TensorLike(Protocol):
    name: str
    shape: tuple[int, ...]  # numpy order
    dtype: str  # GGML type name


@dataclass(frozen=True)
class PresetOptions:
    """llama-quantize's flags that change the plan."""

    pure: bool = False  # --pure: no k-quant mixture, every quantized tensor gets the default type
    leave_output_tensor: bool = False  # --leave-output-tensor: output.weight is kept as it is
    output_tensor_type: str | None = None  # --output-tensor-type: output.weight's type
    token_embedding_type: str | None = None  # --token-embedding-type: token_embd's type
    tensor_types: tuple[tuple[str, str], ...] = ()  # --tensor-type REGEX=TYPE; first match wins
    has_imatrix: bool = False  # --imatrix given and not emptied by --include/--exclude-weights
    imatrix_names: frozenset[str] | None = None  # tensors the imatrix covers; None: all of them
    dry_run: bool = False  # --dry-run: imatrix problems stay in the choices, no error


@dataclass(frozen=True)
class TensorChoice:
    name: str
    type: str  # GGML type name; the tensor's own dtype when it is kept
    reason: str  # short and precise, for the dry-run table
    fallback: bool = False  # the row length did not fit the chosen type (llama-quantize counts these)
    requires_imatrix: bool = False  # tensor_requires_imatrix(): quantizing it needs imatrix data


@dataclass(frozen=True)
class _Model:
    """The hparams llama-quantize consults."""

    arch: str
    n_layer_all: int  # {arch}.block_count
    n_head: int  # of layer 0
    n_head_kv: int  # of layer 0
    n_expert: int
    is_70b: bool  # llm_type == LLM_TYPE_70B

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


def _getter(metadata: Any):
    def get(key: str) -> Any:
        if callable(getattr(metadata, "meta", None)):
            value = metadata.meta(key)
        elif callable(metadata) and not isinstance(metadata, Mapping):
            value = metadata(key)
        else:
            value = metadata.get(key)
        value = getattr(value, "value", value)  # a formats.base.KV
        if hasattr(value, "tolist"):
            value = value.tolist()
        return value
    return get


def _first(value: Any, default: int) -> int:
    """A scalar, or layer 0 of a per-layer array (get_key_or_arr)."""
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else default
    return int(value)


def _model(metadata: Any) -> _Model:
    get = _getter(metadata)
    arch = get("general.architecture")
    if not arch:
        raise InputError("model metadata has no general.architecture",
                         hint="llama-quantize needs the architecture to pick per-tensor types")
    n_layer = get(f"{arch}.block_count")
    if n_layer is None:
        raise InputError(f"model metadata has no {arch}.block_count", hint="the layer count is required")
    n_layer = _first(n_layer, 0)
    n_head = _first(get(f"{arch}.attention.head_count"), 0)
    n_head_kv = _first(get(f"{arch}.attention.head_count_kv"), n_head)
    n_expert = _first(get(f"{arch}.expert_count"), 0)
    n_layer_main = n_layer - _first(get(f"{arch}.nextn_predict_layers"), 0)  # hparams.n_layer()
    # the architectures whose load_arch_hparams can set LLM_TYPE_70B (src/models/*.cpp)
    is_70b = ((arch in ("llama", "llama-embed") and n_expert != 8 and n_layer_main == 80 and n_head != n_head_kv)
              or (arch in ("deci", "olmo", "qwen2") and n_layer_main == 80)
              or (arch == "jais2" and n_layer_main == 68))
    return _Model(arch, n_layer, n_head, n_head_kv, n_expert, is_70b)


# -- which tensors are quantized at all (tensor_allows_quantization) -------------------------------

# substrings that keep a tensor as it is, with a word for the reason
_KEEP_SUBSTRINGS = [
    ("_norm.weight", "norm"),
    ("ffn_gate_inp.weight", "expert router"),
    ("ffn_gate_tid2eid.weight", "expert routing table"),
    ("altup", "altup"),
    ("laurel", "laurel"),
    ("per_layer_model_proj", "per_layer_model_proj"),
    ("ssm_conv1d", "ssm_conv1d"),
    ("shortconv.conv.weight", "shortconv"),
    ("indexer.k_proj.weight", "indexer projection"),
    ("indexer.q_proj.weight", "indexer projection"),
    *((f"time_mix_{s}.weight", "RWKV time_mix") for s in
      ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2", "decay_w1", "decay_w2",
       "lerp_fused")),
    ("attn_rel_b.weight", "relative position bias"),
    (".position_embd", "multimodal position embedding"),
    ("sam.pos_embd", "multimodal"),
    ("sam.neck.", "multimodal"),
    ("sam.net_", "multimodal"),
    (".rel_pos", "multimodal"),
    (".patch_embd", "multimodal"),
    (".patch_merger", "multimodal"),
    ("a.rvq.codebook", "audio codebook"),
    ("mm.a.code_embd", "audio codebook"),
]
_KEEP_GLM5_NEXT = ["hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                   "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
                   "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
                   "attn_v_b.weight"]


def _n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing ne of 1 do not count ((1, 640) is 1-D)."""
    ne = list(reversed(shape))
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def _keep_reason(name: str, shape: Sequence[int], arch: str, preset: Preset, opts: PresetOptions) -> str | None:
    """Why tensor_allows_quantization() is false, or None when the tensor is quantized."""
    if preset.name == "COPY":
        return "COPY: kept"
    if _n_dims(shape) < 2:
        return "1-D: kept"
    # name.rfind("weight") == name.size() - 6, which a 5-character name also passes (npos)
    if not (name.endswith("weight") or len(name) == 5):
        return "not a weight: kept"
    for sub, why in _KEEP_SUBSTRINGS[:1]:
        if sub in name:
            return f"{why}: kept"
    if opts.leave_output_tensor and name == "output.weight":
        return "--leave-output-tensor: kept"
    for sub, why in _KEEP_SUBSTRINGS[1:]:
        if sub in name:
            return f"{why}: kept"
    if name in ("position_embd.weight", "token_types.weight"):
        return "position/token-type embedding: kept"
    if arch == "glm5-next" and any(s in name for s in _KEEP_GLM5_NEXT):
        return "glm5-next small tensor: kept"
    return None


# -- categories (tensor_get_category, in quantcli.names) ------------------------------------------

OUTPUT, TOKEN_EMBD, QKV, KV_B, ATTN_V, ATTN_K, ATTN_Q, ATTN_OUT, FFN_UP, FFN_GATE, FFN_DOWN = (
    names.OUTPUT, names.TOKEN_EMBD, names.QKV, names.KV_B, names.ATTN_V, names.ATTN_K, names.ATTN_Q,
    names.ATTN_OUT, names.FFN_UP, names.FFN_GATE, names.FFN_DOWN)
_category = names.category


def _is_attn_v(cat: str) -> bool:
    return cat in (ATTN_V, QKV, KV_B)


_layer_number = names.block_number


def _sort_key(name: str) -> tuple[int, bytes]:
    """llama_model_loader's weight_name_comparer: by layer number, then by name (bytes)."""
    layer = _layer_number(name)
    return -1 if layer is None else layer, name.encode()


# -- the mixture rules (llama_tensor_get_type_impl) ------------------------------------------------


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass
class _State:
    """quantize_state_impl's counters."""

    n_attention_wv: int = 0
    n_ffn: int = 0  # n_ffn_down = n_ffn_gate = n_ffn_up = n_layer_all
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    n_fallback: int = 0
    has_tied_embeddings: bool = True


_IQ2_MIX = {FT.MOSTLY_IQ2_XXS, FT.MOSTLY_IQ2_XS, FT.MOSTLY_IQ1_S, FT.MOSTLY_IQ2_S, FT.MOSTLY_IQ2_M, FT.MOSTLY_IQ1_M}
_Q5K_OUTPUT = {FT.MOSTLY_IQ2_XXS, FT.MOSTLY_IQ2_XS, FT.MOSTLY_IQ3_XXS, FT.MOSTLY_IQ1_S, FT.MOSTLY_IQ2_S,
               FT.MOSTLY_IQ2_M, FT.MOSTLY_IQ1_M}
_Q5K_ATTN_OUT_MOE = {FT.MOSTLY_Q2_K, FT.MOSTLY_IQ3_XS, FT.MOSTLY_IQ3_XXS, FT.MOSTLY_Q3_K_S, FT.MOSTLY_Q3_K_M,
                     FT.MOSTLY_IQ4_NL, FT.MOSTLY_Q4_K_S, FT.MOSTLY_Q4_K_M, FT.MOSTLY_IQ3_S, FT.MOSTLY_IQ3_M,
                     FT.MOSTLY_IQ4_XS}


def _layer_info(i_layer: int, n_layer: int, name: str, model: _Model) -> tuple[int, int]:
    """MoE experts are not consecutive: the layer comes from the name (layer_info in llama-quant.cpp)."""
    if max(1, model.n_expert) > 1:
        layer = _layer_number(name)
        if layer is None:
            raise InputError(f"Failed to determine layer for tensor {name}",
                             hint="MoE tensors must be named blk.N.*")
        if not 0 <= layer < n_layer:
            raise InputError(f"Bad layer {layer} for tensor {name}. Must be in [0, {n_layer})")
        return layer, n_layer
    return i_layer, n_layer


def _mix(qs: _State, t: str, name: str, ne0: int, ftype: int, cat: str, model: _Model,
         opts: PresetOptions, has_imatrix: bool) -> tuple[str, str | None]:
    """llama_tensor_get_type_impl: (type, why), why None when the default type stays."""
    why: str | None = None
    gqa, n_exp = model.n_gqa, model.n_expert
    falcon = model.arch == "falcon"

    def to(new: str, note: str = "", what: str = cat) -> None:
        nonlocal t, why
        t, why = new, f"{what} -> {new}" + (f" ({note})" if note else "")

    if model.arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if t not in ("F32", "BF16", "F16"):
            return "Q8_0", "glm5-next: at least Q8_0"

    if cat == OUTPUT or (qs.has_tied_embeddings and cat == TOKEN_EMBD):
        what = "output" if cat == OUTPUT else "token_embd (tied output)"
        if opts.output_tensor_type is not None:
            to(ggml_type_name(opts.output_tensor_type), "--output-tensor-type", what)
        elif falcon:
            to("Q8_0", "falcon", what)
        elif ne0 % _block(t):
            to("Q8_0", f"{ne0} not divisible by {_block(t)}", what)
        elif ftype in _Q5K_OUTPUT:
            to("Q5_K", "", what)
        elif t != "Q8_0":
            to("Q6_K", "", what)
        return t, why
    if cat == TOKEN_EMBD:  # (--token-embedding-type never reaches here: llama_tensor_get_type returns first)
        if ftype in (FT.MOSTLY_IQ2_XXS, FT.MOSTLY_IQ2_XS, FT.MOSTLY_IQ1_S, FT.MOSTLY_IQ1_M):
            to("Q2_K")
        elif ftype in (FT.MOSTLY_IQ2_S, FT.MOSTLY_IQ2_M, FT.MOSTLY_IQ3_XXS):
            to("IQ3_S")
        elif ftype in (FT.MOSTLY_TQ1_0, FT.MOSTLY_TQ2_0):
            to("Q4_K")
        return t, why

    if ftype in _IQ2_MIX:
        iq3 = "IQ3_S" if ftype in (FT.MOSTLY_IQ2_S, FT.MOSTLY_IQ2_M) else None
        if _is_attn_v(cat):
            if gqa >= 4 or n_exp >= 4:
                to("Q4_K", f"n_gqa {gqa} >= 4" if gqa >= 4 else f"n_expert {n_exp} >= 4")
            else:
                to(iq3 or "Q2_K")
            qs.i_attention_wv += 1
        elif n_exp == 8 and cat == ATTN_K:
            to("Q4_K", "8 experts")
        elif cat == FFN_DOWN:
            if qs.i_ffn_down < qs.n_ffn // 8:
                to(iq3 or "Q2_K", f"#{qs.i_ffn_down} < n_layer/8")
            qs.i_ffn_down += 1
        elif cat == ATTN_OUT:
            if n_exp == 8:
                to("Q5_K", "8 experts")
            elif ftype in (FT.MOSTLY_IQ1_S, FT.MOSTLY_IQ1_M):
                to("IQ2_XXS")
            elif iq3:
                to(iq3)
        return t, why

    if _is_attn_v(cat):
        i, n = qs.i_attention_wv, qs.n_attention_wv
        if ftype == FT.MOSTLY_Q2_K:
            to("Q4_K", f"n_gqa {gqa} >= 4") if gqa >= 4 else to("Q3_K")
        elif ftype == FT.MOSTLY_Q2_K_S and gqa >= 4:
            to("Q4_K", f"n_gqa {gqa} >= 4")
        elif ftype == FT.MOSTLY_IQ3_XXS:
            if gqa >= 4:
                to("Q4_K", f"n_gqa {gqa} >= 4")
            elif not has_imatrix:
                to("IQ3_S", "no imatrix")
            else:
                to("IQ3_XXS")
        elif ftype in (FT.MOSTLY_IQ3_XS, FT.MOSTLY_IQ3_S) and gqa >= 4:
            to("Q4_K", f"n_gqa {gqa} >= 4")
        elif ftype == FT.MOSTLY_IQ3_M:
            to("Q4_K")
        elif ftype == FT.MOSTLY_Q3_K_M:
            to("Q5_K", f"#{i} < 2") if i < 2 else to("Q4_K")
        elif ftype == FT.MOSTLY_Q3_K_L:
            to("Q5_K")
        elif ftype in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS) and gqa >= 4:
            to("Q5_K", f"n_gqa {gqa} >= 4")
        elif ftype in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and _use_more_bits(i, n):
            to("Q6_K", f"use_more_bits #{i} of {n}")
        elif ftype == FT.MOSTLY_Q4_K_S and i < 4:
            to("Q5_K", f"#{i} < 4")
        if model.is_70b and t in ("Q3_K", "Q4_K"):
            to("Q5_K", "70B: 8 heads share attn_v")
        if n_exp == 8:
            to("Q8_0", "8 experts")
        qs.i_attention_wv += 1
    elif cat == ATTN_K:
        if n_exp == 8:
            to("Q8_0", "8 experts")
        elif ftype == FT.MOSTLY_IQ3_XS:
            to("IQ3_XXS")
        elif ftype == FT.MOSTLY_IQ3_XXS:
            to("IQ2_S")
    elif cat == ATTN_Q:
        if ftype == FT.MOSTLY_IQ3_XS:
            to("IQ3_XXS")
        elif ftype == FT.MOSTLY_IQ3_XXS:
            to("IQ2_S")
    elif cat == FFN_DOWN:
        il, nl = _layer_info(qs.i_ffn_down, qs.n_ffn, name, model)
        at = f"layer {il} of {nl}"
        if ftype == FT.MOSTLY_Q2_K:
            to("Q3_K")
        elif ftype == FT.MOSTLY_Q2_K_S:
            if il < nl // 8:
                to("Q4_K", f"{at} < n/8")
        elif ftype == FT.MOSTLY_IQ3_XXS and not has_imatrix:
            to("Q4_K", f"{at} < n/8, no imatrix") if il < nl // 8 else to("Q3_K", "no imatrix")
        elif ftype == FT.MOSTLY_Q3_K_M:
            if il < nl // 16:
                to("Q5_K", f"{at} < n/16")
            elif not falcon:
                to("Q4_K")
            else:
                to("Q4_K", f"falcon, use_more_bits {at}") if _use_more_bits(il, nl) else to("Q3_K", "falcon")
        elif ftype == FT.MOSTLY_IQ3_M and (il < nl // 8 or (n_exp == 8 and _use_more_bits(il, nl))):
            to("Q4_K", f"{at} < n/8" if il < nl // 8 else f"8 experts, use_more_bits {at}")
        elif ftype == FT.MOSTLY_Q3_K_L:
            to("Q4_K", "falcon") if falcon else to("Q5_K")
        elif ftype == FT.MOSTLY_Q4_K_M:
            if falcon:
                if il < nl // 16:
                    to("Q6_K", f"falcon, {at} < n/16")
                elif _use_more_bits(il, nl):
                    to("Q5_K", f"falcon, use_more_bits {at}")
                else:
                    to("Q4_K", "falcon")
            elif _use_more_bits(il, nl):
                to("Q6_K", f"use_more_bits {at}")
        elif il < nl // 8 and ftype in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS) and not has_imatrix:
            to("Q5_K", f"{at} < n/8, no imatrix")
        elif ftype == FT.MOSTLY_Q5_K_M and _use_more_bits(il, nl):
            to("Q6_K", f"use_more_bits {at}")
        elif ftype == FT.MOSTLY_Q4_K_S and not falcon and il < nl // 8:
            to("Q5_K", f"{at} < n/8")
        elif ftype in (FT.MOSTLY_Q4_0, FT.MOSTLY_Q5_0) and has_imatrix and il < nl // 8:
            to("Q4_1" if ftype == FT.MOSTLY_Q4_0 else "Q5_1", f"{at} < n/8, imatrix")
        qs.i_ffn_down += 1
    elif cat == ATTN_OUT:
        if not falcon:
            if n_exp == 8:
                if ftype in _Q5K_ATTN_OUT_MOE:
                    to("Q5_K", "8 experts")
            else:
                bump = {FT.MOSTLY_Q2_K: "Q3_K", FT.MOSTLY_IQ3_XXS: "IQ3_S", FT.MOSTLY_Q3_K_M: "Q4_K",
                        FT.MOSTLY_Q3_K_L: "Q5_K", FT.MOSTLY_IQ3_M: "Q4_K"}.get(ftype)
                if bump:
                    to(bump)
        elif ftype == FT.MOSTLY_Q3_K_L:
            to("Q4_K", "falcon")
    # (llama.cpp's ATTENTION_QKV branch comes next and is unreachable: attn_qkv took the attn_v rules)
    elif cat in (FFN_GATE, FFN_UP):
        counter = "i_ffn_gate" if cat == FFN_GATE else "i_ffn_up"
        il, nl = _layer_info(getattr(qs, counter), qs.n_ffn, name, model)
        if ftype == FT.MOSTLY_IQ3_XS and nl // 8 <= il < 7 * nl // 8:
            to("IQ3_XXS", f"layer {il} of {nl}, not first/last eighth")
        setattr(qs, counter, getattr(qs, counter) + 1)
    return t, why


# -- shape fallback (tensor_type_fallback) ---------------------------------------------------------

_FALLBACK = {**dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
             **dict.fromkeys(("Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
             "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def fallback_type(t: str, ne0: int) -> tuple[str, str | None]:
    """tensor_type_fallback: the type used when `t`'s blocks do not divide rows of `ne0`, and why
    (None when no fallback is needed)."""
    qk = _block(t)
    if ne0 % qk == 0:
        return t, None
    if t in _FALLBACK:
        new = _FALLBACK[t]
    elif qk <= 32:
        new = t
    else:
        raise UsageError(f"no tensor type fallback is defined for type {t}",
                         hint=f"rows of {ne0} do not fit {t}'s blocks of {qk}; choose a type with 32-blocks")
    if ne0 % _block(new):
        return "F16", f"fallback: {ne0} not divisible by {qk} ({t}) -> F16 (unusual shape)"
    return new, f"fallback: {ne0} not divisible by {qk} ({t}) -> {new}"


def _fallback(qs: _State, t: str, ne0: int) -> tuple[str, str | None]:
    new, why = fallback_type(t, ne0)
    if why is not None:
        qs.n_fallback += 1
    return new, why


# -- the plan --------------------------------------------------------------------------------------


def _requires_imatrix(name: str, t: str, ftype: int) -> bool:
    """tensor_requires_imatrix."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return t in _IQ_LOW or (t == "Q2_K" and ftype == FT.MOSTLY_Q2_K_S)


def _compile(opts: PresetOptions) -> list[tuple[re.Pattern[str], str, str]]:
    """--tensor-type patterns: llama-quantize lower-cases the name part; std::regex ECMAScript search."""
    out = []
    for pattern, type_name in opts.tensor_types:
        if not pattern:
            raise UsageError("--tensor-type: missing tensor name", hint="use NAME_REGEX=TYPE, e.g. attn_v=q8_0")
        try:
            out.append((re.compile(pattern.lower()), ggml_type_name(type_name, "--tensor-type type"),
                        f"{pattern.lower()}={ggml_type_name(type_name)}"))
        except re.error as exc:
            raise UsageError(f"--tensor-type '{pattern}': bad regex ({exc})",
                             hint="the name part is a regular expression, e.g. 'blk\\.[0-3]\\.ffn_down'") from None
    return out


def _choose(qs: _State, info: TensorLike, model: _Model, preset: Preset, opts: PresetOptions,
            patterns: list, has_imatrix: bool) -> TensorChoice:
    """llama_tensor_get_type for one tensor, with its reason."""
    name, shape, dtype = info.name, tuple(info.shape), str(info.dtype)
    keep = _keep_reason(name, shape, model.arch, preset, opts)
    if keep is not None:
        return TensorChoice(name, dtype, keep)
    cat = _category(name)
    ne0 = shape[-1] if shape else 1
    ftype = preset.ftype

    def done(t: str, reason: str, fb: str | None = None) -> TensorChoice:
        full = reason if fb is None else f"{reason}; {fb}"
        return TensorChoice(name, t, full, fb is not None, _requires_imatrix(name, t, ftype))

    if opts.token_embedding_type is not None and cat == TOKEN_EMBD:
        # per_layer_token_embd may still be named by a --tensor-type pattern
        named = name == "per_layer_token_embd.weight" and any(p.search(name) for p, _, _ in patterns)
        if not named:
            return done(ggml_type_name(opts.token_embedding_type), "--token-embedding-type")
    if opts.output_tensor_type is not None and cat == OUTPUT:
        return done(ggml_type_name(opts.output_tensor_type), "--output-tensor-type")

    t = preset.default_type
    if not is_quantized(t):
        return done(t, f"preset {preset.name}")
    reason = None
    for pattern, qtype, spec in patterns:
        if pattern.search(name):
            t, reason = qtype, f"--tensor-type {spec}"
            break
    if reason is None:
        if opts.pure:
            reason = f"--pure: {t}"
        else:
            t, why = _mix(qs, t, name, ne0, ftype, cat, model, opts, has_imatrix)
            reason = f"{preset.name}: {why}" if why else f"{preset.name}: default {t}"
    t, fb = _fallback(qs, t, ne0)
    return done(t, reason, fb)


def plan(tensors: Iterable[TensorLike], metadata: Any, preset: str | Preset,
         options: PresetOptions = PresetOptions()) -> list[TensorChoice]:
    """Every tensor's type as llama-quantize would choose it, in the order given.

    llama-quantize walks tensors sorted by layer then name; the attn_v / ffn_down counters follow
    that order, so this does too. Raises UsageError where llama-quantize stops: an imatrix-only type
    without an imatrix, a tensor missing from the imatrix, a --token-embedding-type /
    --output-tensor-type that does not fit the rows (llama-quantize skips the fallback for these and
    then fails validation). With dry_run none of these raise. --allow-requantize: see requantized().
    """
    preset = preset if isinstance(preset, Preset) else get_preset(preset)
    tensors = list(tensors)
    model = _model(metadata)
    patterns = _compile(options)
    for flag, value in (("--output-tensor-type", options.output_tensor_type),
                        ("--token-embedding-type", options.token_embedding_type)):
        if value is not None:
            ggml_type_name(value, f"{flag} type")
    has_imatrix = options.has_imatrix and (options.imatrix_names is None or bool(options.imatrix_names))

    qs = _State(n_ffn=model.n_layer_all)
    for info in tensors:  # init_quantize_state_counters
        cat = _category(info.name)
        qs.n_attention_wv += _is_attn_v(cat)
        if cat == OUTPUT:
            qs.has_tied_embeddings = False

    order = sorted(range(len(tensors)), key=lambda k: _sort_key(tensors[k].name))
    choices: list[TensorChoice | None] = [None] * len(tensors)
    for k in order:
        choices[k] = _choose(qs, tensors[k], model, preset, options, patterns, has_imatrix)
    if not options.dry_run:
        _check(tensors, choices, order, preset, options, has_imatrix)
    return choices  # type: ignore[return-value]


def _check(tensors: list, choices: list, order: list[int], preset: Preset, opts: PresetOptions,
           has_imatrix: bool) -> None:
    """The errors llama_model_quantize_impl raises, in its order."""
    if not has_imatrix:
        for k in order:
            c = choices[k]
            if c.requires_imatrix:
                raise UsageError(f"preset {preset.name} requires an importance matrix: tensor {c.name} "
                                 f"would be {c.type}",
                                 hint="pass --imatrix FILE (compute one with the imatrix command), "
                                      "or choose a preset that does not need one, e.g. Q2_K or IQ3_S")
    for k in order:
        info, c = tensors[k], choices[k]
        if c.type == str(info.dtype):
            continue
        if (c.requires_imatrix and has_imatrix and opts.imatrix_names is not None
                and c.name not in opts.imatrix_names):
            raise UsageError(f"missing importance matrix for tensor {c.name} in a very low-bit "
                             f"quantization ({c.type})",
                             hint="the imatrix has no entry for it: check --include-weights/--exclude-weights "
                                  "or compute the imatrix on this model")
        ne0 = info.shape[-1] if len(info.shape) else 1
        if ne0 % _block(c.type):  # only --token-embedding-type / --output-tensor-type skip the fallback
            raise UsageError(f"{c.name}: rows of {ne0} do not fit {c.type} (blocks of {_block(c.type)}), "
                             f"chosen by {c.reason}",
                             hint="pick a type whose block size divides the row length, e.g. Q8_0 or F16")


def requantized(tensors: Sequence[TensorLike], choices: Sequence[TensorChoice]) -> list[TensorChoice]:
    """The choices llama-quantize refuses without --allow-requantize ("requantizing from type X is
    disabled"): a quantized input whose type changes. Kept tensors and same-type copies are fine."""
    return [c for t, c in zip(tensors, choices) if c.type != str(t.dtype) and is_quantized(str(t.dtype))]


def fallback_count(choices: Sequence[TensorChoice]) -> int:
    """llama-quantize's n_fallback: 'N of M tensor(s) required fallback quantization'."""
    return sum(c.fallback for c in choices)


# llama_ftype from the most common tensor type (llama_model_loader), for COPY
_GUESS = {"F32": FT.ALL_F32, "F16": FT.MOSTLY_F16, "BF16": FT.MOSTLY_BF16, "Q4_0": FT.MOSTLY_Q4_0,
          "Q4_1": FT.MOSTLY_Q4_1, "Q5_0": FT.MOSTLY_Q5_0, "Q5_1": FT.MOSTLY_Q5_1, "Q8_0": FT.MOSTLY_Q8_0,
          "Q2_K": FT.MOSTLY_Q2_K, "Q3_K": FT.MOSTLY_Q3_K_M, "Q4_K": FT.MOSTLY_Q4_K_M, "Q5_K": FT.MOSTLY_Q5_K_M,
          "Q6_K": FT.MOSTLY_Q6_K, "TQ1_0": FT.MOSTLY_TQ1_0, "TQ2_0": FT.MOSTLY_TQ2_0,
          "IQ2_XXS": FT.MOSTLY_IQ2_XXS, "IQ2_XS": FT.MOSTLY_IQ2_XS, "IQ2_S": FT.MOSTLY_IQ2_S,
          "IQ3_XXS": FT.MOSTLY_IQ3_XXS, "IQ1_S": FT.MOSTLY_IQ1_S, "IQ1_M": FT.MOSTLY_IQ1_M,
          "IQ4_NL": FT.MOSTLY_IQ4_NL, "IQ4_XS": FT.MOSTLY_IQ4_XS, "IQ3_S": FT.MOSTLY_IQ3_S,
          "NVFP4": FT.MOSTLY_NVFP4, "Q1_0": FT.MOSTLY_Q1_0}


def file_type(preset: str | Preset, tensors: Iterable[TensorLike], metadata: Any) -> int:
    """general.file_type of the output: the preset's ftype; for COPY the input's own (its
    general.file_type, else guessed from the most common tensor type, with the GUESSED bit 1024)."""
    preset = preset if isinstance(preset, Preset) else get_preset(preset)
    if preset.name != "COPY":
        return preset.ftype
    value = _getter(metadata)("general.file_type")
    if value is not None:
        return int(value)
    counts: dict[str, int] = {}
    best, best_n = "F32", 0
    for info in sorted(tensors, key=lambda i: _sort_key(i.name)):
        counts[info.dtype] = counts.get(info.dtype, 0) + 1
        if counts[info.dtype] > best_n:
            best, best_n = info.dtype, counts[info.dtype]
    return int(_GUESS.get(best, FT.ALL_F32)) | int(FT.GUESSED)


__all__ = ["PRESETS", "Preset", "PresetOptions", "TensorChoice", "get_preset", "plan", "file_type",
           "fallback_count", "requantized", "ggml_type_name"]
