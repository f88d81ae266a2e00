"""Tiny, seeded Hugging Face checkpoints (config, safetensors, tokenizer) for the converter tests.

Everything is written with numpy and json alone, so the same bytes come out wherever the tests run;
`tests/data/convert/make_refs.py` runs llama.cpp's real converter on them to record the references.
The tokenizers reuse the engine fixtures: `vocab-bpe.json` (a 1500-token byte-level BPE) and
`vocab-spm.json` (3260 pieces of Gemma 3's SentencePiece vocabulary).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "data"

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class Spec:
    arch: str  # config.json architectures[0]
    model_type: str
    tokenizer: str  # "spm" | "bpe-llama3" | "bpe-qwen2" | "llama-hf"
    dtype: str = "F32"  # F32 | F16 | BF16
    shards: int = 1
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int | None = None
    layers: int = 2
    ffn: int = 96
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    extra_vocab: int = 0  # config vocab_size beyond the tokenizer's
    config: dict[str, Any] = field(default_factory=dict)  # more config.json keys
    seed: int = 0


SPECS: dict[str, Spec] = {
    "llama-spm": Spec("LlamaForCausalLM", "llama", "spm", config={"rms_norm_eps": 1e-5}),
    "llama3-bpe": Spec("LlamaForCausalLM", "llama", "bpe-llama3", dtype="BF16", shards=2, tied=True,
                       head_dim=16, config={"rope_theta": 500000.0, "rope_scaling": {
                           "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                           "max_position_embeddings": 131072}, seed=1),
    "mistral-hf": Spec("MistralForCausalLM", "mistral", "llama-hf", dtype="F16", kv_heads=1,
                       config={"sliding_window": 4096, "rope_theta": 1000000.0}, seed=2),
    "qwen2": Spec("Qwen2ForCausalLM", "qwen2", "bpe-qwen2", tied=True, qkv_bias=True,
                  config={"rope_theta": 1000000.0, "max_position_embeddings": 32768,
                          "rope_scaling": {"type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 8192}}, seed=3),
    "qwen3": Spec("Qwen3ForCausalLM", "qwen3", "bpe-qwen2", dtype="BF16", head_dim=32, qk_norm=True,
                  config={"rope_theta": 1000000, "max_position_embeddings": 40960}, seed=4),
    "gemma3": Spec("Gemma3ForCausalLM", "gemma3_text", "spm", dtype="F16", heads=2, kv_heads=1,
                   head_dim=32, qk_norm=True, tied=True,
                   config={"sliding_window": 512, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                           "query_pre_attn_scalar": 32, "max_position_embeddings": 32768,
                           "rms_norm_eps": 1e-6}, seed=5),
    "gemma3-bpe": Spec("Gemma3ForCausalLM", "gemma3_text", "bpe-llama3", dtype="BF16", heads=2,
                       kv_heads=1, head_dim=32, qk_norm=True, tied=True, extra_vocab=36,
                       config={"sliding_window": 512, "final_logit_softcapping": 30.0,
                               "rope_scaling": {"rope_type": "linear", "factor": 8.0}}, seed=6),
}


# -- weights -------------------------------------------------------------------------------------


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch's .to(torch.bfloat16) does for finite values."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _weights(spec: Spec, n_vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    hd = spec.head_dim or spec.hidden // spec.heads
    h, f = spec.hidden, spec.ffn
    gemma = spec.model_type == "gemma3_text"

    def mat(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    def norm() -> np.ndarray:  # Gemma stores weight - 1: small values around 0
        return (rng.standard_normal(h) * 0.1 + (0.0 if gemma else 1.0)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(n_vocab, h), "model.norm.weight": norm()}
    if not spec.tied:
        w["lm_head.weight"] = mat(n_vocab, h)
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = mat(spec.heads * hd, h)
        w[p + "self_attn.k_proj.weight"] = mat(spec.kv_heads * hd, h)
        w[p + "self_attn.v_proj.weight"] = mat(spec.kv_heads * hd, h)
        w[p + "self_attn.o_proj.weight"] = mat(h, spec.heads * hd)
        if spec.qkv_bias:
            w[p + "self_attn.q_proj.bias"] = mat(spec.heads * hd)
            w[p + "self_attn.k_proj.bias"] = mat(spec.kv_heads * hd)
            w[p + "self_attn.v_proj.bias"] = mat(spec.kv_heads * hd)
        if spec.qk_norm:
            w[p + "self_attn.q_norm.weight"] = (rng.standard_normal(hd) * 0.1 + (0 if gemma else 1)).astype(np.float32)
            w[p + "self_attn.k_norm.weight"] = (rng.standard_normal(hd) * 0.1 + (0 if gemma else 1)).astype(np.float32)
        if gemma:
            w[p + "pre_feedforward_layernorm.weight"] = norm()
            w[p + "post_feedforward_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = mat(f, h)
        w[p + "mlp.up_proj.weight"] = mat(f, h)
        w[p + "mlp.down_proj.weight"] = mat(h, f)
    if spec.model_type == "llama":
        w["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(hd // 2, np.float32)  # dropped
    return w


def _stored(x: np.ndarray, dtype: str) -> tuple[str, bytes]:
    if dtype == "BF16":
        return "BF16", f32_to_bf16_bits(x).tobytes()
    if dtype == "F16":
        return "F16", x.astype(np.float16).tobytes()
    return "F32", x.astype(np.float32).tobytes()


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos, chunks = 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


# -- tokenizers ----------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes | int) -> bytes:
    key = _varint(num << 3 | wire)
    if wire == 0:
        return key + _varint(payload)
    if wire == 5:
        return key + payload
    return key + _varint(len(payload)) + payload


def spm_model_bytes(pieces: list[str], scores: list[float], types: list[int], *, unk: int, bos: int,
                    eos: int, pad: int) -> bytes:
    """A SentencePiece ModelProto (BPE, byte fallback, identity normalizer with a dummy prefix)."""
    out = bytearray()
    for p, s, t in zip(pieces, scores, types):
        msg = _field(1, 2, p.encode()) + _field(2, 5, struct.pack("<f", s)) + _field(3, 0, t)
        out += _field(1, 2, msg)
    trainer = (_field(3, 0, 2) + _field(4, 0, len(pieces)) + _field(35, 0, 1) + _field(40, 0, unk)
               + _field(41, 0, bos) + _field(42, 0, eos) + _field(43, 0, pad))
    out += _field(2, 2, trainer)
    normalizer = _field(1, 2, b"identity") + _field(3, 0, 1) + _field(4, 0, 0) + _field(5, 0, 1)
    out += _field(3, 2, normalizer)
    return bytes(out)


def _spm_vocab() -> dict[str, Any]:
    v = json.loads((DATA / "engine" / "vocab-spm.json").read_text())
    types = list(v["types"])
    types[v["tokens"].index("<unk>")] = 2  # UNKNOWN
    return {"tokens": v["tokens"], "scores": v["scores"], "types": types}


def write_spm_tokenizer(d: Path, model_type: str) -> int:
    v = _spm_vocab()
    ids = {t: i for i, t in enumerate(v["tokens"])}
    (d / "tokenizer.model").write_bytes(spm_model_bytes(
        v["tokens"], v["scores"], v["types"], unk=ids["<unk>"], bos=ids["<bos>"], eos=ids["<eos>"],
        pad=ids["<pad>"]))
    decoder = {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True}
               for t in ("<pad>", "<eos>", "<bos>", "<unk>")}
    cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
           "pad_token": "<pad>", "unk_token": "<unk>", "added_tokens_decoder": decoder,
           "tokenizer_class": "GemmaTokenizer" if model_type == "gemma3_text" else "LlamaTokenizer",
           "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return len(v["tokens"])


def _added(i: int, content: str, special: bool = True, normalized: bool = False) -> dict[str, Any]:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": special}


def write_bpe_tokenizer(d: Path, style: str) -> int:
    v = json.loads((DATA / "engine" / "vocab-bpe.json").read_text())
    tokens = v["tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    n = len(tokens)
    added = [_added(0, tokens[0]), _added(1, tokens[1]), _added(n, "<tool>", special=False, normalized=True)]
    regex = LLAMA3_REGEX if style == "bpe-llama3" else QWEN2_REGEX
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if style == "bpe-llama3":
        post = {"type": "Sequence", "processors": [
            {**byte_level, "trim_offsets": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": tokens[0], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": tokens[0], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": tokens[0], "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {tokens[0]: {"id": tokens[0], "ids": [0], "tokens": [tokens[0]]}}}]}
    else:
        post = byte_level
    data = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": style == "bpe-llama3", "vocab": vocab,
                  "merges": [m.split(" ") for m in v["merges"]]},
    }
    (d / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=1))
    if style == "bpe-llama3":
        cfg = {"bos_token": tokens[0], "eos_token": tokens[1], "clean_up_tokenization_spaces": True,
               "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}
    else:
        cfg = {"bos_token": None, "eos_token": tokens[1], "pad_token": tokens[1], "unk_token": None,
               "add_prefix_space": False,
               "errors": "replace", "model_max_length": 32768, "tokenizer_class": "Qwen2Tokenizer",
               "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=1))
    return n + 1


def write_llama_hf_tokenizer(d: Path) -> int:
    """A Llama/Mistral-style tokenizer.json: BPE over SentencePiece pieces with byte fallback."""
    v = _spm_vocab()
    tokens = v["tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for t in tokens[260:]:  # pieces: every split whose halves are pieces, best-ranked first
        for cut in range(1, len(t)):
            if t[:cut] in vocab and t[cut:] in vocab:
                merges.append([t[:cut], t[cut:]])
                break
    specials = [_added(i, t) for i, t in enumerate(tokens[:4])]
    data = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": specials,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<bos>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    (d / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=1))
    cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
           "unk_token": "<unk>", "pad_token": None, "legacy": False, "tokenizer_class": "LlamaTokenizer",
           "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in t if k != "id"} for t in specials}}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=1))
    return len(tokens)


# -- the checkpoint ------------------------------------------------------------------------------


def build(name: str, root: Path) -> Path:
    """Write checkpoint `name` (a key of SPECS) into root/name and return that directory."""
    spec = SPECS[name]
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    if spec.tokenizer == "spm":
        n_tok = write_spm_tokenizer(d, spec.model_type)
        special = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    elif spec.tokenizer == "llama-hf":
        n_tok = write_llama_hf_tokenizer(d)
        special = {"bos_token_id": 2, "eos_token_id": 1}
    else:
        n_tok = write_bpe_tokenizer(d, spec.tokenizer)
        special = {"bos_token_id": 0, "eos_token_id": 1}
    n_vocab = n_tok + spec.extra_vocab
    config = {"architectures": [spec.arch], "model_type": spec.model_type, "hidden_size": spec.hidden,
              "intermediate_size": spec.ffn, "num_attention_heads": spec.heads,
              "num_key_value_heads": spec.kv_heads, "num_hidden_layers": spec.layers,
              "vocab_size": n_vocab, "tie_word_embeddings": spec.tied, "torch_dtype": {
                  "F32": "float32", "F16": "float16", "BF16": "bfloat16"}[spec.dtype], **special}
    if spec.head_dim is not None:
        config["head_dim"] = spec.head_dim
    config.update(spec.config)
    (d / "config.json").write_text(json.dumps(config, indent=1))
    if name == "llama-spm":  # authorship metadata from a model card, sampling from generation_config
        (d / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\ntags:\n- test\n"
                                     "base_model: example/tiny-base\n---\n# Tiny Llama\n")
        (d / "generation_config.json").write_text(json.dumps(
            {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1, "do_sample": True}))
    tensors = {k: (*_stored(x, spec.dtype)[:1], x.shape, _stored(x, spec.dtype)[1])
               for k, x in _weights(spec, n_vocab).items()}
    if spec.shards == 1:
        write_safetensors(d / "model.safetensors", tensors)
        return d
    names = list(tensors)
    per = -(-len(names) // spec.shards)
    weight_map = {}
    for s in range(spec.shards):
        fname = f"model-{s + 1:05d}-of-{spec.shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s * per:(s + 1) * per]}
        write_safetensors(d / fname, part)
        weight_map.update({k: fname for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return d


# -- writing and reading back --------------------------------------------------------------------


def write_converted(view, out: Path, outtype: str) -> Path:
    """The GGUF `convert_hf_to_gguf.py --outtype {f32,f16,q8_0}` writes, made from a converter view
    with quantcli's writer (a stand-in for the pipelines, which do the same per tensor)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from quantcli.convert import converter_keeps_f32
    from quantcli.formats import TensorSpec, create_writer
    from quantcli.formats.base import KV

    want = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[outtype]
    plan = [(name, info.shape, Q.F32 if converter_keeps_f32(name, len(info.shape)) else want)
            for name, info in view.tensors.items()]
    meta = dict(view.kv)
    meta["general.file_type"] = KV(gguf.GGUFValueType.UINT32,
                                   {"f32": 0, "f16": 1, "q8_0": 7}[outtype])
    with create_writer("gguf", out, meta, [TensorSpec(n, shape, q.name) for n, shape, q in plan]) as w:
        for name, _, qtype in plan:
            w.write(name, gguf.quants.quantize(view.load_f32(name), qtype))
        w.finish()
    return out


def record_gguf(path: Path) -> tuple[dict, dict]:
    """(kv, tensors) of a GGUF file in the form `tests/data/convert/make_refs.py` records."""
    import hashlib

    from gguf import GGUFReader, GGUFValueType

    r = GGUFReader(path)
    kv = {}
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.file_type":
            continue
        if f.types[0] == GGUFValueType.ARRAY:
            if f.types[-1] == GGUFValueType.STRING:
                values = [bytes(f.parts[i]).decode("utf-8", "surrogateescape") for i in f.data]
            else:
                values = [f.parts[i].tolist()[0] for i in f.data]
            blob = json.dumps(values).encode("utf-8", "surrogateescape")
            kv[key] = {"type": "ARRAY", "item": f.types[-1].name, "len": len(values),
                       "sha256": hashlib.sha256(blob).hexdigest()}
        else:
            kv[key] = {"type": f.types[0].name, "value": f.contents()}
    tensors = {t.name: {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape],
                        "sha256": hashlib.sha256(bytes(t.data)).hexdigest()} for t in r.tensors}
    return kv, tensors
