"""One class per llama.cpp converter class: tensor names, tensor changes, hyperparameters, vocabulary.

Each mirrors its model class in llama.cpp's convert_hf_to_gguf (conversion/llama.py, qwen.py,
gemma.py, bert.py and the TextModel base in base.py, llama-cpp-python 0.3.36 vendor tree). A class
registers the Hugging Face `architectures` names it handles; `converter_for(config)` picks one.
Tensor changes are described, not applied: `plan_tensor` returns the GGUF name and a list of `ops`
that `view.py` applies to one tensor when it is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable

import gguf
import numpy as np

from quantcli.convert import vocab as V
from quantcli.errors import InputError

# -- tensor operations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Permute:
    """LlamaModel.permute: undo HF's rotary layout of q/k rows (per head: halves interleaved).

    `x.reshape(n_head, 2, d, ...).swapaxes(1, 2).reshape(x.shape)` only moves rows, so it is kept as
    the row index it amounts to and applied while the tensor is read.
    """

    n_head: int
    elementwise: ClassVar[bool] = False

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if not shape or shape[0] % (2 * self.n_head):
            raise InputError(f"cannot permute rows of a {shape} tensor for {self.n_head} heads: "
                             f"rows are not a multiple of {2 * self.n_head}")
        return shape

    def rows(self, n: int) -> np.ndarray:
        # output row r takes input row idx[r]: (n_head, 2, d) -> (n_head, d, 2)
        return np.arange(n).reshape(self.n_head, 2, n // self.n_head // 2).swapaxes(1, 2).reshape(n)


@dataclass(frozen=True)
class Shift:
    """`data + value` in the tensor's working dtype (Gemma's RMSNorm stores weight - 1)."""

    value: float
    elementwise: ClassVar[bool] = True

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x + x.dtype.type(self.value)


@dataclass(frozen=True)
class FirstRows:
    """`data[:n]`: Gemma 3 drops embedding rows the tokenizer never produces."""

    n: int
    elementwise: ClassVar[bool] = False

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (min(self.n, shape[0]), *shape[1:])

    def rows(self, n: int) -> np.ndarray:
        return np.arange(min(self.n, n))


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: where it comes from and what is done to it."""

    name: str  # GGUF name
    source: str | None  # HF tensor name; None for a generated tensor
    ops: tuple = ()


# -- the registry --------------------------------------------------------------------------------


class Converter:
    """TextModel: what every supported architecture shares."""

    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    registry: ClassVar[dict[str, type["Converter"]]] = {}

    def __init_subclass__(cls, hf_architectures: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.hf_architectures = hf_architectures
        for name in hf_architectures:
            Converter.registry[name] = cls

    def __init__(self, directory: Path, hparams: dict[str, Any], hf_arch: str) -> None:
        self.dir = directory
        self.hparams = hparams
        self.hf_arch = hf_arch
        self.block_count = self.find_hparam(["n_layers", "num_hidden_layers", "n_layer", "num_layers"])
        self.tensor_map = gguf.get_tensor_name_map(self.gguf_arch, self.block_count)
        self.rope_parameters = dict(hparams.get("rope_parameters", hparams.get("rope_scaling")) or {})
        rp = self.rope_parameters
        # TextModel.__init__: mirror top-level rope settings into rope_parameters
        if "full_attention" not in rp and "sliding_attention" not in rp:
            theta = self.find_hparam(["global_rope_theta", "rope_global_theta", "rope_theta_global",
                                      "rope_theta", "rotary_emb_base"], optional=True)
            local = self.find_hparam(["local_rope_theta", "rope_local_theta", "rope_theta_local",
                                      "swa_rope_theta", "rope_local_base_freq"], optional=True)
            partial = self.find_hparam(["partial_rotary_factor", "rope_pct", "rope_percent"], optional=True)
            orig = self.find_hparam(["original_max_position_embeddings"], optional=True)
            if local is not None:
                rp["sliding_attention"] = {"rope_theta": local}
            if "rope_theta" not in rp and theta is not None:
                rp["rope_theta"] = theta
            if "rope_type" not in rp and (kind := rp.get("type")) is not None:
                rp["rope_type"] = kind
            if "partial_rotary_factor" not in rp and partial is not None:
                rp["partial_rotary_factor"] = partial
            if "original_max_position_embeddings" not in rp and orig is not None:
                rp["original_max_position_embeddings"] = orig

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def find_hparam(self, keys: Iterable[str], optional: bool = False) -> Any:
        keys = list(keys)
        for key in keys:
            if key in self.hparams:
                return self.hparams[key]
        if optional:
            return None
        raise InputError(f"{self.dir / 'config.json'}: none of {', '.join(keys)} is set")

    # -- tensors ---------------------------------------------------------------------------------

    def rename(self, name: str) -> str | None:
        """ModelBase/TextModel.filter_tensors: None drops the tensor."""
        if name.startswith(("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.",
                            "sound_encoder.", "sound_projection.", "speech_embeddings.")) \
                or any(s in name for s in (
                    "visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.",
                    "code2wav.", "projector.", "pre_mm_projector_norm", "image_newline",
                    "view_seperator", "patch_embed", "patch_embedding", "patch_merger.",
                    "patch_merge_mlp.", "model.connector.")):
            return None
        if name.endswith("e_score_correction_bias"):
            name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        return name.replace("language_model.", "") if "language_model." in name else name

    def map_name(self, name: str) -> str:
        new = self.tensor_map.get_name(key=name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise InputError(f"{self.dir}: cannot map tensor '{name}' to a llama.cpp name for "
                             f"{self.hf_arch}", hint="llama.cpp's converter stops on it too")
        return new

    def modify(self, name: str, shape: tuple[int, ...]) -> tuple[str, tuple]:
        """modify_tensors: (HF name to map, ops) for one tensor."""
        return name, ()

    def plan_tensor(self, name: str, shape: tuple[int, ...]) -> TensorPlan | None:
        if name.endswith((".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")):
            return None
        renamed = self.rename(name)
        if renamed is None:
            return None
        mapped_from, ops = self.modify(renamed, shape)
        return TensorPlan(self.map_name(mapped_from), name, ops)

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        """generate_extra_tensors: (GGUF name, float32 data) made from the config alone."""
        return []

    # -- metadata --------------------------------------------------------------------------------

    def set_gguf_parameters(self, gw: gguf.GGUFWriter) -> None:
        """TextModel.set_gguf_parameters (general.file_type left to the caller)."""
        h = self.hparams
        gw.add_block_count(self.block_count)
        if (n_ctx := self.find_hparam(["max_position_embeddings", "n_ctx", "n_positions", "max_length",
                                       "max_sequence_length", "model_max_length"], optional=True)) is not None:
            gw.add_context_length(n_ctx)
        if (n_embd := self.find_hparam(["hidden_size", "n_embd", "dim"], optional=True)) is not None:
            gw.add_embedding_length(n_embd)
        if (n_ff := self.find_hparam(["prefix_dense_intermediate_size", "dense_intermediate_size",
                                      "intermediate_size", "n_inner", "hidden_dim"], optional=True)) is not None:
            gw.add_feed_forward_length(n_ff)
        if (n_head := self.find_hparam(["num_attention_heads", "n_head", "n_heads"], optional=True)) is not None:
            gw.add_head_count(n_head)
        if (n_head_kv := self.find_hparam(["num_key_value_heads", "n_kv_heads"], optional=True)) is not None:
            gw.add_head_count_kv(n_head_kv)
        if h.get("is_causal") is False:
            gw.add_causal_attention(False)
        rope = self.rope_parameters.get("full_attention", self.rope_parameters)
        if (rope_type := rope.get("rope_type")) is not None:
            factor = rope.get("factor")
            if rope_type == "linear" and factor is not None:
                gw.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                gw.add_rope_scaling_factor(factor)
            elif rope_type == "yarn" and factor is not None:
                gw.add_rope_scaling_type(gguf.RopeScalingType.YARN)
                gw.add_rope_scaling_factor(factor)
                gw.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
                if (v := rope.get("extrapolation_factor")) is not None:
                    gw.add_rope_scaling_yarn_ext_factor(v)
                if (v := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
                    gw.add_rope_scaling_yarn_attn_factor(v)
                if (v := rope.get("beta_fast")) is not None:
                    gw.add_rope_scaling_yarn_beta_fast(v)
                if (v := rope.get("beta_slow")) is not None:
                    gw.add_rope_scaling_yarn_beta_slow(v)
            elif rope_type in ("su", "longrope"):
                gw.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        if (theta := rope.get("rope_theta")) is not None:
            gw.add_rope_freq_base(theta)
        if (local := self.rope_parameters.get("sliding_attention", {}).get("rope_theta")) is not None:
            gw.add_rope_freq_base_swa(local)
        if (eps := self.find_hparam(["rms_norm_eps", "norm_eps"], optional=True)) is not None:
            gw.add_layer_norm_rms_eps(eps)
        if (eps := self.find_hparam(["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"], optional=True)) is not None:
            gw.add_layer_norm_eps(eps)
        if self.find_hparam(["num_local_experts", "num_experts", "n_routed_experts"], optional=True):
            raise InputError(f"{self.dir}: mixture-of-experts checkpoints are not supported")
        if (head_dim := h.get("head_dim")) is not None:
            gw.add_key_length(head_dim)
            gw.add_value_length(head_dim)

    def set_vocab(self, gw: gguf.GGUFWriter) -> None:
        V.set_vocab_gpt2(gw, self.dir, self.hparams)

    def try_set_pooling_type(self, gw: gguf.GGUFWriter) -> None:
        """TextModel._try_set_pooling_type: sentence-transformers pooling from modules.json."""
        modules_path = self.dir / "modules.json"
        pooling_path = None
        if modules_path.is_file():
            for mod in V.read_json(modules_path):
                if str(mod.get("type", "")).endswith("Pooling"):
                    pooling_path = mod["path"]
                    break
        modes = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS,
                 "lasttoken": gguf.PoolingType.LAST}
        if pooling_path is not None:
            pooling = V.read_json(self.dir / pooling_path / "config.json")
            if pooling.get("pooling_mode_mean_tokens"):
                kind = gguf.PoolingType.MEAN
            elif pooling.get("pooling_mode_cls_token"):
                kind = gguf.PoolingType.CLS
            elif pooling.get("pooling_mode_lasttoken"):
                kind = gguf.PoolingType.LAST
            elif (mode := pooling.get("pooling_mode")) in modes:
                kind = modes[mode]
            else:
                raise InputError(f"{self.dir / pooling_path / 'config.json'}: only mean, cls and "
                                 "last-token pooling are supported")
            gw.add_pooling_type(kind)
        if (classifier := self.hparams.get("classifier_pooling")) is not None:
            if classifier not in ("cls", "mean"):
                raise InputError(f"{self.dir}: classifier_pooling '{classifier}' is not supported")
            gw.add_classifier_pooling_type(modes[classifier])


def converter_for(directory: Path, hparams: dict[str, Any]) -> Converter:
    archs = hparams.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    text = hparams.get("text_config") or {}
    if isinstance(text, dict) and text.get("architectures"):
        arch = text["architectures"][0]
    known = ", ".join(sorted(Converter.registry))
    if arch is None:
        raise InputError(f"{directory / 'config.json'}: no 'architectures' entry; supported: {known}")
    cls = Converter.registry.get(arch)
    if cls is None:
        raise InputError(f"{directory}: architecture '{arch}' is not supported; supported: {known}",
                         hint="convert it with llama.cpp's convert_hf_to_gguf.py, then quantize the GGUF")
    return cls(directory, hparams, arch)


# -- architectures -------------------------------------------------------------------------------


class Llama(Converter, hf_architectures=("LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM")):
    """LlamaModel (conversion/llama.py); Mistral checkpoints in HF format use it too."""

    gguf_arch = gguf.MODEL_ARCH.LLAMA

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        if "draft_vocab_size" in self.hparams and self.hparams.get("num_hidden_layers") == 1:
            raise InputError(f"{self.dir}: EAGLE-3 draft models are not supported")
        if self.hparams.get("num_local_experts"):
            raise InputError(f"{self.dir}: Mixtral (mixture of experts) is not supported")

    def rename(self, name: str) -> str | None:
        name = name.replace("text_model.", "") if "text_model." in name else name
        return super().rename(name)

    def modify(self, name: str, shape: tuple[int, ...]) -> tuple[str, tuple]:
        n_head = self.find_hparam(["n_heads", "num_attention_heads"])
        n_kv = self.find_hparam(["n_kv_heads", "num_key_value_heads"])
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return name, (Permute(n_head),)
        if name.endswith(("k_proj.weight", "k_proj.bias")):
            return name, (Permute(n_kv if n_kv is not None and n_kv != n_head else n_head),)
        return name, ()

    def set_gguf_parameters(self, gw: gguf.GGUFWriter) -> None:
        super().set_gguf_parameters(gw)
        h = self.hparams
        gw.add_vocab_size(h["vocab_size"])
        rope_dim = h.get("head_dim")
        if rope_dim is None:
            rope_dim = h["hidden_size"] // h["num_attention_heads"]
        gw.add_rope_dimension_count(rope_dim)

    def set_vocab(self, gw: gguf.GGUFWriter) -> None:
        if (self.dir / "tekken.json").is_file() and not (self.dir / "tokenizer.json").is_file():
            raise InputError(f"{self.dir}: Mistral tekken tokenizers are not supported",
                             hint="use a checkpoint with tokenizer.json or tokenizer.model")
        cfg_file = self.dir / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = V.read_json(cfg_file)
            if (add_prefix_space := cfg.get("add_prefix_space")) is not None:
                gw.add_add_space_prefix(add_prefix_space)
            if cfg.get("tokenizer_class") == "HybridDNATokenizer":
                raise InputError(f"{self.dir}: HybridDNA tokenizers are not supported")
        if (self.dir / "tokenizer.model").is_file():
            V.set_vocab_sentencepiece(gw, self.dir, self.hparams)
        elif (self.dir / "tokenizer.json").is_file() and V.is_llama_hf(V.HFTokenizer.load(self.dir)):
            V.set_vocab_llama_hf(gw, self.dir, self.hparams)
        else:
            V.set_vocab_gpt2(gw, self.dir, self.hparams)
        if self.hparams.get("vocab_size", 32000) == 32016:  # CodeLlama's infill tokens
            special = V.SpecialVocab(self.dir, load_merges=False,
                                     special_token_types=["prefix", "suffix", "middle", "eot"])
            for kind, token_id in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
                special._set_special_token(kind, token_id)
            special.add_to_gguf(gw)
        if self.hparams.get("vocab_size", 32000) == 49152:  # granite small models
            gw.add_add_bos_token(False)

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        rope = self.rope_parameters.get("full_attention", self.rope_parameters)
        if not rope or rope.get("rope_type", "").lower() != "llama3":
            return []
        dim = self.hparams.get("head_dim") or self.hparams["hidden_size"] // self.hparams["num_attention_heads"]
        factors = llama3_rope_factors(
            rope.get("rope_theta", 10000.0), dim, rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0),
            rope.get("high_freq_factor", 4.0), rope.get("original_max_position_embeddings", 8192))
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)]


def llama3_rope_factors(base: float, dim: int, factor: float, low_freq_factor: float,
                        high_freq_factor: float, old_context_len: int) -> np.ndarray:
    """LlamaModel.generate_extra_tensors: per-frequency scaling of Llama 3.1+ rope, in float32."""
    f32 = np.float32
    exponent = np.arange(0, dim, 2, dtype=f32) / f32(dim)  # (dim/2,)
    freqs = f32(1.0) / np.power(f32(base), exponent, dtype=f32)
    low_wavelen = old_context_len / low_freq_factor
    high_wavelen = old_context_len / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = f32(2 * math.pi) / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (f32(old_context_len) / wavelen - f32(low_freq_factor)) / f32(high_freq_factor - low_freq_factor)
            out.append(f32(1) / ((f32(1) - smooth) / f32(factor) + smooth))
    return np.array(out, dtype=np.float32)


class Qwen2(Converter, hf_architectures=("Qwen2ForCausalLM",)):
    """Qwen2Model (conversion/qwen.py)."""

    gguf_arch = gguf.MODEL_ARCH.QWEN2

    def set_vocab(self, gw: gguf.GGUFWriter) -> None:
        if (self.dir / "tokenizer.model").is_file():
            V.set_vocab_sentencepiece(gw, self.dir, self.hparams)
        else:
            V.set_vocab_gpt2(gw, self.dir, self.hparams)

    def set_gguf_parameters(self, gw: gguf.GGUFWriter) -> None:
        super().set_gguf_parameters(gw)
        self.try_set_pooling_type(gw)


class Qwen3(Qwen2, hf_architectures=("Qwen3ForCausalLM",)):
    """Qwen3Model (conversion/qwen.py); its reranker variant is not supported."""

    gguf_arch = gguf.MODEL_ARCH.QWEN3

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        readme = self.dir / "README.md"
        text = readme.read_text(encoding="utf-8", errors="replace").lower() if readme.is_file() else ""
        hints = [str(self.dir.name), str(self.hparams.get("_name_or_path", "")),
                 str(self.hparams.get("model_type", "")), self.hf_arch]
        if ("# qwen3-reranker" in text or "# qwen3-vl-reranker" in text
                or any("qwen3-reranker" in s.lower() or "qwen3-vl-reranker" in s.lower() for s in hints)):
            raise InputError(f"{self.dir}: Qwen3 reranker models are not supported",
                             hint="convert it with llama.cpp's convert_hf_to_gguf.py, then quantize the GGUF")


class Gemma3(Converter, hf_architectures=("Gemma3ForCausalLM",)):
    """Gemma3Model (conversion/gemma.py): norms stored as weight - 1, rows past the vocabulary dropped."""

    gguf_arch = gguf.MODEL_ARCH.GEMMA3

    def set_vocab(self, gw: gguf.GGUFWriter) -> None:
        if (self.dir / "tokenizer.model").is_file():
            V.set_vocab_sentencepiece(gw, self.dir, self.hparams)
            gw.add_add_space_prefix(False)
        else:
            V.set_vocab_gpt2(gw, self.dir, self.hparams)

    def set_gguf_parameters(self, gw: gguf.GGUFWriter) -> None:
        super().set_gguf_parameters(gw)
        h = self.hparams
        gw.add_context_length(h.get("max_position_embeddings", 131072))
        gw.add_head_count(h.get("num_attention_heads", 8))
        gw.add_layer_norm_rms_eps(h.get("rms_norm_eps", 1e-6))
        gw.add_key_length(h.get("head_dim", 256))
        gw.add_value_length(h.get("head_dim", 256))
        gw.add_rope_freq_base(self.rope_parameters.get("full_attention", self.rope_parameters)
                              .get("rope_theta", 1_000_000.0))
        if h.get("attn_logit_softcapping") is not None:
            raise InputError(f"{self.dir / 'config.json'}: Gemma 3 has no attn_logit_softcapping")
        if softcap := h.get("final_logit_softcapping"):
            gw.add_final_logit_softcapping(softcap)
        if h.get("sliding_window_pattern") != 1:
            gw.add_sliding_window(h["sliding_window"])
        gw.add_head_count_kv(h.get("num_key_value_heads", 4))

    def modify(self, name: str, shape: tuple[int, ...]) -> tuple[str, tuple]:
        ops: tuple = ()
        if "embed_tokens.weight" in name:
            ops += (FirstRows(V.n_vocab_real(self.dir, self.hparams)),)
        if name.endswith("norm.weight"):  # Gemma3RMSNorm: output * (1.0 + weight)
            ops += (Shift(1.0),)
        return name, ops


class Bert(Converter, hf_architectures=("BertModel", "BertForMaskedLM", "BertForSequenceClassification")):
    """BertModel (conversion/bert.py): an encoder, WordPiece vocabulary, no pooler or MLM head."""

    gguf_arch = gguf.MODEL_ARCH.BERT

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        labels = self.hparams.get("id2label")
        if labels and len(labels) == 2 and labels.get(0) == "LABEL_0":
            labels = None  # the dummy labels PretrainedConfig adds
        self.cls_out_labels = labels

    def set_gguf_parameters(self, gw: gguf.GGUFWriter) -> None:
        super().set_gguf_parameters(gw)
        gw.add_causal_attention(False)
        self.try_set_pooling_type(gw)
        if self.cls_out_labels:
            gw.add_classifier_output_labels([v for _, v in sorted(self.cls_out_labels.items())])

    def set_vocab(self, gw: gguf.GGUFWriter) -> None:
        V.set_vocab_bert(gw, self.dir, self.hparams)

    def rename(self, name: str) -> str | None:
        if name.startswith("bert."):
            name = name[5:]
        if name.endswith(".gamma"):
            name = name[:-6] + ".weight"
        if name.endswith(".beta"):
            name = name[:-5] + ".bias"
        if name in ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"):
            return None
        if name.startswith(("cls.predictions", "cls.seq_relationship")):
            return None
        return super().rename(name)

    def modify(self, name: str, shape: tuple[int, ...]) -> tuple[str, tuple]:
        if self.cls_out_labels and name in ("classifier.weight", "classifier.bias"):
            name = "classifier.out_proj." + name.split(".")[-1]
        return name, ()


SUPPORTED_ARCHITECTURES = tuple(sorted(Converter.registry))
