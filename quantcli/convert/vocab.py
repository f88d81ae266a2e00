"""Vocabularies as llama.cpp's converter writes them, read from tokenizer files without transformers.

Ported from convert_hf_to_gguf (conversion/base.py, llama-cpp-python 0.3.36 vendor tree):
`_set_vocab_sentencepiece` / `_create_vocab_sentencepiece` (tokenizer.model), `_set_vocab_llama_hf`
(gguf's `LlamaHfVocab`: a BPE tokenizer.json with byte fallback), `_set_vocab_gpt2` /
`get_vocab_base` (byte-level BPE and WordPiece tokenizer.json) and `get_vocab_base_pre`.

Where the converter asks transformers' `AutoTokenizer`, the same facts are read from tokenizer.json
(`model.vocab` plus `added_tokens`) and tokenizer_config.json. Two steps cannot be reproduced
exactly without the tokenizer itself and are approximated:

- an added token whose `normalized` is false is passed through `decode(encode(token))` by the
  converter; here it is kept as it is (the two agree for special tokens, the usual case);
- the pre-tokenizer name (`tokenizer.ggml.pre`) is chosen by hashing the token ids of a fixed text.
  With the `tokenizers` package installed the ids are computed exactly as transformers does
  (tokenizer.json with its padding and truncation switched off) and looked up in the converter's
  table. Without it, or for a hash the table does not know, the name is inferred from
  tokenizer.json: the pre-tokenizer's split regex (Llama 3, Qwen 2, GPT-2, ...) or, for WordPiece,
  the name the standard BERT vocabularies hash to.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

from gguf import TokenType

from quantcli.convert import spm
from quantcli.convert._special_vocab import SpecialVocab
from quantcli.convert.pretokenizers import CHECK_TEXT, PRE_TOKENIZER_BY_HASH
from quantcli.errors import InputError


def read_json(path: Path) -> Any:
    from quantcli.inputs import read_small_json

    return read_small_json(path, "JSON")


def does_token_look_special(token: str) -> bool:
    """TextModel.does_token_look_special: added tokens that ought to be control tokens."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


# -- tokenizer.json ------------------------------------------------------------------------------


@dataclass
class HFTokenizer:
    """tokenizer.json (+ tokenizer_config.json) seen as transformers' fast tokenizer sees it."""

    path: Path  # the model directory
    data: dict[str, Any]
    config: dict[str, Any]  # tokenizer_config.json, or {}

    @classmethod
    def load(cls, directory: Path) -> "HFTokenizer":
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise InputError(f"{directory}: no tokenizer.json or tokenizer.model",
                             hint="copy the tokenizer files from the original model into this directory")
        data = read_json(path)
        cfg_path = directory / "tokenizer_config.json"
        config = read_json(cfg_path) if cfg_path.is_file() else {}
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise InputError(f"{path}: no 'model' object")
        return cls(directory, data, config if isinstance(config, dict) else {})

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    def base_vocab(self) -> dict[str, int]:
        """The model's own vocabulary (get_vocab(with_added_tokens=False))."""
        vocab = self.model.get("vocab")
        if isinstance(vocab, dict):
            return {str(k): int(v) for k, v in vocab.items()}
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
            return {str(item[0]): i for i, item in enumerate(vocab)}
        raise InputError(f"{self.path / 'tokenizer.json'}: model.vocab is neither an object nor a list")

    def added_tokens(self) -> list[dict[str, Any]]:
        return [t for t in self.data.get("added_tokens") or [] if isinstance(t, dict) and "id" in t]

    def vocab(self) -> dict[str, int]:
        """get_vocab(with_added_tokens=True)."""
        out = self.base_vocab()
        for tok in self.added_tokens():
            out[str(tok["content"])] = int(tok["id"])
        return out

    def special_tokens(self) -> list[str]:
        """all_special_tokens: the named special tokens of tokenizer_config, then the extra ones."""
        names = []
        for attr in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                     "mask_token"):
            value = self.config.get(attr)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names.append(value)
        for key in ("additional_special_tokens", "extra_special_tokens"):
            extra = self.config.get(key)
            if isinstance(extra, dict):
                extra = list(extra.values())
            for value in extra or []:
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    names.append(value)
        return list(dict.fromkeys(names))


def pre_tokenizer_name(tok: HFTokenizer) -> str:
    """tokenizer.ggml.pre: the converter's hash of the check text's ids, else the split regex."""
    ids = _check_ids(tok)
    if ids is not None:
        name = PRE_TOKENIZER_BY_HASH.get(sha256(str(ids).encode()).hexdigest())
        if name is not None:
            return name
    name = _pre_from_json(tok.data)
    if name is None:
        raise InputError(f"{tok.path / 'tokenizer.json'}: BPE pre-tokenizer not recognized "
                         "(llama.cpp's converter would stop here too)",
                         hint="convert this model with llama.cpp's convert_hf_to_gguf.py after adding it to "
                              "convert_hf_to_gguf_update.py, then quantize the GGUF")
    return name


def _check_ids(tok: HFTokenizer) -> list[int] | None:
    try:
        from tokenizers import Tokenizer  # optional: present wherever transformers is
    except ImportError:
        return None
    try:
        backend = Tokenizer.from_str(json.dumps(tok.data))
        backend.no_truncation()
        backend.no_padding()
        return backend.encode(CHECK_TEXT).ids
    except Exception:  # a tokenizer.json this tokenizers version cannot load: use the fallback
        return None


# split regexes of well-known pre-tokenizers -> llama.cpp names (llama-vocab.cpp)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_REGEX_NAMES = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}


def _pre_from_json(data: dict[str, Any]) -> str | None:
    pre = data.get("pre_tokenizer") or {}
    if data["model"].get("type") == "WordPiece" or pre.get("type") == "BertPreTokenizer":
        return "jina-v2-en"  # what bert-base-uncased, bge-small and MiniLM hash to
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    regexes = [r for r in regexes if r]
    if len(regexes) == 1 and regexes[0] in _REGEX_NAMES:
        return _REGEX_NAMES[regexes[0]]
    if not regexes and any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts):
        return "gpt-2"
    return None


def vocab_base(tok: HFTokenizer, vocab_size: int | None) -> tuple[list[str], list[int]]:
    """TextModel.get_vocab_base without the pre-tokenizer: every id's text and type."""
    vocab = tok.vocab()
    n_vocab = vocab_size if vocab_size is not None else len(vocab)
    if vocab and max(vocab.values()) >= n_vocab:
        raise InputError(f"{tok.path}: tokenizer has id {max(vocab.values())} but config.json's "
                         f"vocab_size is {n_vocab}")
    reverse = {i: t for t, i in vocab.items()}
    added = {int(t["id"]): t for t in tok.added_tokens()}
    added_texts = {str(t["content"]) for t in added.values()}
    tokens: list[str] = []
    toktypes: list[int] = []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            toktypes.append(TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added_texts and i in added:
            if added[i].get("special") or does_token_look_special(token):
                toktypes.append(TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # pre-normalize user-defined spaces
                toktypes.append(TokenType.USER_DEFINED)
        else:
            toktypes.append(TokenType.NORMAL)
        tokens.append(token)
    return tokens, toktypes


def set_vocab_gpt2(gw, directory: Path, hparams: dict[str, Any]) -> None:
    """TextModel._set_vocab_gpt2: byte-level BPE from tokenizer.json."""
    tok = HFTokenizer.load(directory)
    tokens, toktypes = vocab_base(tok, hparams.get("vocab_size"))
    gw.add_tokenizer_model("gpt2")
    gw.add_tokenizer_pre(pre_tokenizer_name(tok))
    gw.add_token_list(tokens)
    gw.add_token_types(toktypes)
    SpecialVocab(directory, load_merges=True).add_to_gguf(gw)


def set_vocab_bert(gw, directory: Path, hparams: dict[str, Any]) -> None:
    """BertModel.set_vocab: WordPiece with llama.cpp's phantom-space spelling."""
    tok = HFTokenizer.load(directory)
    tokens, toktypes = vocab_base(tok, hparams.get("vocab_size"))
    tokpre = pre_tokenizer_name(tok)
    gw.add_token_type_count(hparams.get("type_vocab_size", 1))

    def phantom(text: str, toktype: int) -> str:
        if toktype == TokenType.CONTROL:
            return text
        return text[2:] if text.startswith("##") else "\u2581" + text

    tokens = [phantom(t, k) for t, k in zip(tokens, toktypes)]
    gw.add_tokenizer_model("bert")
    gw.add_tokenizer_pre(tokpre)
    gw.add_token_list(tokens)
    gw.add_token_types(toktypes)
    SpecialVocab(directory, n_vocab=len(tokens)).add_to_gguf(gw)


# -- SentencePiece -------------------------------------------------------------------------------


def sentencepiece_tokens(directory: Path, hparams: dict[str, Any]) -> tuple[list[bytes], list[float], list[int]]:
    """TextModel._create_vocab_sentencepiece from tokenizer.model, added_tokens.json and
    tokenizer_config.json's added_tokens_decoder."""
    model = spm.load_sentencepiece(directory / "tokenizer.model")
    n_pieces = len(model.pieces)
    vocab_size = hparams.get("vocab_size_per_layer_input") or hparams.get("vocab_size") or n_pieces
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    toktypes = [int(TokenType.UNUSED)] * vocab_size
    for i in range(min(n_pieces, vocab_size)):
        kind = model.types[i]
        # IsUnknown / IsControl / IsUnused / IsByte; user-defined pieces stay NORMAL
        toktypes[i] = kind if kind in (spm.UNKNOWN, spm.CONTROL, spm.UNUSED, spm.BYTE) else spm.NORMAL
        tokens[i] = model.pieces[i].encode("utf-8", errors="surrogateescape")
        scores[i] = model.scores[i]
    added_file = directory / "added_tokens.json"
    if added_file.is_file():
        for text, token_id in read_json(added_file).items():
            if token_id < vocab_size:
                tokens[token_id] = text.encode("utf-8")
                scores[token_id] = -1000.0
                toktypes[token_id] = int(TokenType.USER_DEFINED)
    cfg_file = directory / "tokenizer_config.json"
    if cfg_file.is_file():
        decoder = read_json(cfg_file).get("added_tokens_decoder", {}) or {}
        for key, entry in decoder.items():
            token_id = int(key)
            if token_id >= vocab_size:
                continue
            text = entry["content"]
            if entry.get("special") or does_token_look_special(text):
                toktypes[token_id] = int(TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                toktypes[token_id] = int(TokenType.USER_DEFINED)
            scores[token_id] = -1000.0
            tokens[token_id] = text.encode("utf-8")
    return tokens, scores, toktypes


def set_vocab_sentencepiece(gw, directory: Path, hparams: dict[str, Any]) -> None:
    """TextModel._set_vocab_sentencepiece."""
    tokens, scores, toktypes = sentencepiece_tokens(directory, hparams)
    gw.add_tokenizer_model("llama")
    gw.add_tokenizer_pre("default")
    gw.add_token_list(tokens)
    gw.add_token_scores(scores)
    gw.add_token_types(toktypes)
    SpecialVocab(directory, n_vocab=len(tokens)).add_to_gguf(gw)


# -- Llama BPE with byte fallback (gguf.LlamaHfVocab) ----------------------------------------------


def is_llama_hf(tok: HFTokenizer) -> bool:
    """LlamaHfVocab's test: BPE with byte fallback and a Sequence decoder (not Llama 3's BPE)."""
    m = tok.model
    if m.get("type") == "BPE" and m.get("ignore_merges", False) and not m.get("byte_fallback", True):
        return False  # Llama 3: BpeVocab
    decoder = tok.data.get("decoder") or {}
    return m.get("type") == "BPE" and bool(m.get("byte_fallback", False)) and decoder.get("type") == "Sequence"


_LLAMA_DEFAULT_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def set_vocab_llama_hf(gw, directory: Path, hparams: dict[str, Any]) -> None:
    """TextModel._set_vocab_llama_hf through gguf.LlamaHfVocab: base pieces, then added tokens."""
    tok = HFTokenizer.load(directory)
    if tok.config.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast"):
        tok.config = {**_LLAMA_DEFAULT_SPECIALS, **tok.config}  # the tokenizer class's defaults
    vocab = tok.vocab()
    base_size = len(tok.base_vocab())
    extra = sorted((int(t["id"]), str(t["content"])) for t in tok.added_tokens())
    extra = [(i, text) for text, i in {text: i for i, text in extra}.items() if i >= base_size]
    extra_ids = {i for i, _ in extra}
    specials = {text: vocab[text] for text in tok.special_tokens() if text in vocab}
    special_ids = set(specials.values())
    reverse = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    toktypes: list[int] = []
    for i in range(base_size):
        if i in extra_ids:
            continue
        text = reverse[i]
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            toktypes.append(TokenType.BYTE)
        else:
            toktypes.append(TokenType.CONTROL if i in special_ids else TokenType.NORMAL)
        tokens.append(text)
    for i, text in sorted(extra):
        tokens.append(text)
        toktypes.append(TokenType.CONTROL if text in specials else TokenType.USER_DEFINED)
    gw.add_tokenizer_model("llama")
    gw.add_tokenizer_pre("default")
    gw.add_token_list(tokens)
    gw.add_token_scores([-1000.0] * len(tokens))
    gw.add_token_types(toktypes)
    SpecialVocab(directory, n_vocab=len(tokens)).add_to_gguf(gw)


def n_vocab_real(directory: Path, hparams: dict[str, Any]) -> int:
    """Gemma3Model.modify_tensors: the embedding rows the tokenizer can produce."""
    if (directory / "tokenizer.model").is_file():
        return len(sentencepiece_tokens(directory, hparams)[0])
    tok = HFTokenizer.load(directory)
    return len(tok.model.get("vocab") or ()) + len(tok.data.get("added_tokens") or ())
