"""Tokenizers built from a GGUF vocabulary, giving the ids llama.cpp gives.

Two models, as llama.cpp's `src/llama-vocab.cpp`:
- `llama` (SentencePiece-style, Gemma / Llama 2): `llm_tokenizer_spm_session` — merge the
  highest-scoring adjacent pair present in the vocabulary until none is left, then byte fallback
  `<0xXX>` for pieces that are not tokens.
- `gpt2` (byte-level BPE, Llama 3 / Qwen2): split with the pre-tokenizer of `tokenizer.ggml.pre`
  (ports of `unicode_regex_split_custom_{llama3,qwen2,gpt2}` in `src/unicode.cpp`, hand-written
  scanners, so no `regex` module), map bytes to GPT-2's printable alphabet, then merge by rank.

Before either, `tokenizer_st_partition` cuts the text at special tokens: user-defined tokens
always, control and unknown tokens only with `parse_special`.
"""

from __future__ import annotations

import heapq
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from quantcli.errors import InputError

# GGUF token types (llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# texts llama.cpp turns into control tokens whatever their stored type (EOT/EOG detection in
# llama_vocab::impl::load); it matters only for whether the partition step skips them
_CONTROL_LOOKING = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>", "<|eom_id|>",
    "</s>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|repo_name|>",
    "<|file_sep|>",
}

# texts llama_vocab adds to its end-of-generation set (special_eog_ids) when the vocabulary has them
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
              "_<EOT>", "<｜end▁of▁sentence｜>", "<|end_of_text|>", "<end_of_utterance>")

# pre-tokenizer names (tokenizer.ggml.pre) -> the scanner that implements them
_PRE_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
               "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"}
_PRE_QWEN2 = {"qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2", "hunyuan", "solar-open"}
_PRE_GPT2 = {"gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
             "mellum", "modern-bert", "mpt", "olmo", "trillion", "granite-docling"}
_IGNORE_MERGES = _PRE_LLAMA3 - {"dbrx", "smaug-bpe"}  # these also set add_bos by default
BPE_ADDS_BOS = frozenset(_IGNORE_MERGES)

_WHITESPACE = frozenset(map(chr, [
    0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, 0x2000, 0x2001, 0x2002, 0x2003, 0x2004,
    0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000]))


@dataclass(frozen=True)
class Vocab:
    """The vocabulary part of a GGUF file's metadata."""

    model: str  # tokenizer.ggml.model: "llama" (SPM) or "gpt2" (byte-level BPE)
    pre: str  # tokenizer.ggml.pre
    tokens: tuple[str, ...]
    scores: np.ndarray | None  # float32 (n_vocab,), SPM merge priorities
    token_types: np.ndarray  # int32 (n_vocab,)
    merges: tuple[str, ...]  # BPE: "left right", rank = position
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    eot_id: int | None = None  # tokenizer.ggml.eot_token_id
    eom_id: int | None = None  # tokenizer.ggml.eom_token_id


def vocab_from_meta(meta: Callable[[str, Any], Any]) -> Vocab:
    """Read the vocabulary from `meta(key, default)` (a model reader's `meta`), with llama.cpp's
    defaults for keys a file leaves out."""
    model = meta("tokenizer.ggml.model", None)
    tokens = meta("tokenizer.ggml.tokens", None)
    if model is None or tokens is None:
        raise InputError("the model has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)",
                         hint="pass a GGUF converted with its vocabulary")
    if model not in ("llama", "gpt2"):
        raise InputError(f"tokenizer model '{model}' is not supported; supported: llama (SPM), gpt2 (BPE)")
    n = len(tokens)
    types = meta("tokenizer.ggml.token_type", None)
    types = np.full(n, TOKEN_NORMAL, np.int32) if types is None else np.asarray(types, np.int32)
    scores = meta("tokenizer.ggml.scores", None)
    scores = None if scores is None else np.asarray(scores, np.float32)
    pre = meta("tokenizer.ggml.pre", None) or "default"
    if model == "llama":  # llama.cpp: SPM defaults
        add_bos, add_space_prefix, bos, eos = True, True, 1, 2
    else:
        add_bos, add_space_prefix, bos, eos = pre in _IGNORE_MERGES, False, 11, 11
    add_bos = bool(meta("tokenizer.ggml.add_bos_token", add_bos))
    add_eos = bool(meta("tokenizer.ggml.add_eos_token", False))
    if model == "llama":
        add_space_prefix = bool(meta("tokenizer.ggml.add_space_prefix", add_space_prefix))
    bos = meta("tokenizer.ggml.bos_token_id", bos)
    eos = meta("tokenizer.ggml.eos_token_id", eos)
    eot = meta("tokenizer.ggml.eot_token_id", None)
    eom = meta("tokenizer.ggml.eom_token_id", None)

    def tid(i: Any) -> int | None:
        return None if i is None or not 0 <= int(i) < n else int(i)

    return Vocab(model=model, pre=pre, tokens=tuple(tokens), scores=scores, token_types=types,
                 merges=tuple(meta("tokenizer.ggml.merges", None) or ()),
                 bos_id=tid(bos), eos_id=tid(eos), add_bos=add_bos, add_eos=add_eos,
                 add_space_prefix=add_space_prefix, eot_id=tid(eot), eom_id=tid(eom))


def _spm_word_split(tokens: Sequence[str]) -> "re.Pattern[str]":
    """Where an SPM fragment can be cut into words without changing its ids: before a "▁" whose
    preceding character never precedes "▁" inside a vocabulary token. SPM only merges neighbours
    whose joined text is a token, so no merge crosses such a cut; each side's merges happen in
    the same order alone as in the whole (the heap orders by score, then position). For Gemma 3
    only ">" precedes "▁" inside a token, so nearly every space starts a word."""
    joined = "\0".join(tokens)  # "\0" keeps pairs across token ends out (conservative if a token has one)
    glue = set(re.findall("(.)\u2581", joined, re.S))
    if not glue:
        return re.compile("(?<=.)(?=\u2581)", re.S)
    return re.compile("(?<=[^" + "".join(re.escape(c) for c in sorted(glue)) + "])(?=\u2581)")


class Tokenizer:
    """`Tokenizer(vocab).encode(text)` -> the ids `llama-tokenize` prints (BOS as the file says)."""

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        # token_to_id: a later duplicate overwrites an earlier one, as llama.cpp's map assignment
        self.token_to_id = dict(zip(vocab.tokens, range(len(vocab.tokens))))
        self._special = self._special_tokens()
        if vocab.model == "llama":
            scores = vocab.scores if vocab.scores is not None else np.zeros(len(vocab.tokens), np.float32)
            self._scores = scores.tolist()
            self._byte_ids = [self._spm_byte_token(b) for b in range(256)]
            self._spm_words = _spm_word_split(vocab.tokens)
            self._spm_cache: dict[str, list[int]] = {}
        else:
            if vocab.pre in _PRE_LLAMA3:
                self._split = _split_llama3
            elif vocab.pre in _PRE_QWEN2:
                self._split = _split_qwen2
            elif vocab.pre in _PRE_GPT2:
                self._split = _split_gpt2
            else:
                raise InputError(f"BPE pre-tokenizer '{vocab.pre}' is not supported; supported: "
                                 f"{', '.join(sorted(_PRE_LLAMA3 | _PRE_QWEN2 | _PRE_GPT2))}")
            self._ignore_merges = vocab.pre in _IGNORE_MERGES
            self._ranks: dict[tuple[str, str], int] = {}
            for rank, merge in enumerate(vocab.merges):
                pos = merge.find(" ", 1)
                pair = (merge[:pos], merge[pos + 1:]) if pos >= 0 else ("", "")
                self._ranks.setdefault(pair, rank)  # std::map::emplace keeps the first
            self._byte_enc = _bytes_to_unicode()
            self._byte_dec = {c: b for b, c in self._byte_enc.items()}
            self._word_cache: dict[str, list[int]] = {}

    @classmethod
    def from_model(cls, reader: Any) -> "Tokenizer":
        """From an open model reader (anything with `meta(key, default)`)."""
        return cls(vocab_from_meta(reader.meta))

    # -- public ----------------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """llama_tokenize(text, add_special, parse_special)."""
        v = self.vocab
        out: list[int] = []
        fragments = self._partition(text, parse_special) if text else []
        if v.model == "llama":
            prev_special = True
            if add_special and v.add_bos:
                out.append(self._need(v.bos_id, "BOS"))
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if v.add_space_prefix and prev_special:
                    frag = " " + frag
                self._spm_words_of(frag.replace(" ", "\u2581"), out)
                prev_special = False
        else:
            if add_special and v.add_bos:
                out.append(self._need(v.bos_id, "BOS"))
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    self._bpe(frag, out)
        if add_special and v.add_eos:
            out.append(self._need(v.eos_id, "EOS"))
        return out

    def piece(self, tid: int) -> bytes:
        """llama_token_to_piece(tid, special=false): the bytes a token stands for — SPM pieces
        with U+2581 as a space and <0xXX> as that byte, BPE pieces through GPT-2's byte alphabet,
        user-defined ones as they are; control and unknown tokens are empty."""
        v = self.vocab
        if not 0 <= tid < len(v.tokens):
            raise InputError(f"token id {tid} is outside the vocabulary of {len(v.tokens)}")
        kind, text = int(v.token_types[tid]), v.tokens[tid]
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN):  # attr_special: nothing without special=true
            return b""
        if v.model == "llama":
            if kind == TOKEN_BYTE and len(text) == 6 and text.startswith("<0x"):
                return bytes([int(text[3:5], 16)])
            if kind == TOKEN_USER_DEFINED:
                return text.encode()
            return text.replace("\u2581", " ").encode()
        if kind == TOKEN_USER_DEFINED:
            return text.encode()
        dec = self._byte_dec
        return bytes(dec[c] for c in text if c in dec)

    def detokenize(self, ids: list[int]) -> str:
        """The text of generated tokens as llama.cpp prints them: their pieces' bytes joined, then
        decoded as UTF-8 (a character split over tokens comes out whole; broken bytes as U+FFFD)."""
        return b"".join(self.piece(int(t)) for t in ids).decode("utf-8", errors="replace")

    def eog_ids(self) -> frozenset[int]:
        """End-of-generation tokens, as llama_vocab collects them: EOS, EOT/EOM when the file names
        them, and the tokens whose text ends a turn in the common chat templates."""
        v = self.vocab
        out = {i for i in (v.eos_id, v.eot_id, v.eom_id) if i is not None}
        out.update(self.token_to_id[t] for t in _EOG_TEXTS if t in self.token_to_id)
        return frozenset(out)

    # -- special-token partition ------------------------------------------------------------------
    def _special_tokens(self) -> list[tuple[str, int, int]]:
        """(text, id, type) of control/user-defined/unknown tokens, longest first."""
        types = self.vocab.token_types
        ids = np.nonzero(np.isin(types, (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)))[0]
        special = []
        for i in ids.tolist():
            text = self.vocab.tokens[i]
            kind = int(types[i])
            if text in _CONTROL_LOOKING:
                kind = TOKEN_CONTROL  # llama.cpp ORs in the control attribute
            special.append((text, i, kind))
        special.sort(key=lambda s: -len(s[0].encode("utf-8")))  # stable: ties keep id order
        return special

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """tokenizer_st_partition: for each special token (longest first) split every raw
        fragment at its occurrences. Raw fragments are str, special tokens their id."""
        frags: list[str | int] = [text]
        for tok, tid, kind in self._special:
            if kind != TOKEN_USER_DEFINED and not parse_special:
                continue
            if not tok or tok not in text:
                continue
            new: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or tok not in frag:
                    new.append(frag)
                    continue
                pieces = frag.split(tok)
                for k, piece in enumerate(pieces):
                    if k:
                        new.append(tid)
                    if piece:
                        new.append(piece)
            frags = new
        return frags

    def _need(self, tid: int | None, what: str) -> int:
        if tid is None:
            raise InputError(f"the vocabulary adds a {what} token but defines none")
        return tid

    # -- SPM ------------------------------------------------------------------------------------
    def _spm_byte_token(self, b: int) -> int | None:
        tid = self.token_to_id.get(f"<0x{b:02X}>")
        if tid is None and b < 128:
            tid = self.token_to_id.get(chr(b))
        return tid

    def _spm_words_of(self, text: str, out: list[int]) -> None:
        """SPM on a fragment, one word at a time, each word's ids remembered (see `_spm_word_split`:
        the words are cut only where no token can merge across, so the ids are the fragment's)."""
        cache = self._spm_cache
        if len(cache) > 200_000:
            cache.clear()
        for word in self._spm_words.split(text):
            ids = cache.get(word)
            if ids is None:
                ids = []
                self._spm(word, ids)
                cache[word] = ids
            out.extend(ids)

    def _spm(self, text: str, out: list[int]) -> None:
        """llm_tokenizer_spm_session::tokenize on one fragment (spaces already escaped)."""
        n = len(text)
        if n == 0:
            return
        t2i, scores = self.token_to_id, self._scores
        start = list(range(n))
        size = [1] * n  # in characters; a merged-away symbol has size 0
        nbytes = [len(c.encode("utf-8")) if ord(c) > 127 else 1 for c in text]
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, int]] = []  # (-score, left, right, byte size)
        rev_merge: dict[str, tuple[int, int]] = {}

        def try_add(left: int, right: int) -> None:
            if left == -1 or right == -1:
                return
            piece = text[start[left]:start[left] + size[left] + size[right]]
            tid = t2i.get(piece)
            if tid is None:
                return
            heapq.heappush(heap, (-scores[tid], left, right, nbytes[left] + nbytes[right]))
            rev_merge[piece] = (left, right)

        for i in range(1, n):
            try_add(i - 1, i)
        while heap:
            _, left, right, nb = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or nbytes[left] + nbytes[right] != nb:
                continue  # stale: one side has merged since
            size[left] += size[right]
            nbytes[left] += nbytes[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            try_add(prev[left], left)
            try_add(left, nxt[left])

        def resegment(i: int) -> None:
            piece = text[start[i]:start[i] + size[i]]
            tid = t2i.get(piece)
            if tid is not None:
                out.append(tid)
                return
            pair = rev_merge.get(piece)
            if pair is None:  # byte fallback
                for b in piece.encode("utf-8"):
                    bid = self._byte_ids[b]
                    if bid is None:
                        raise InputError(f"the vocabulary has no byte token for 0x{b:02X}")
                    out.append(bid)
                return
            resegment(pair[0])
            resegment(pair[1])

        i = 0
        while i != -1:
            resegment(i)
            i = nxt[i]

    # -- BPE ------------------------------------------------------------------------------------
    def _bpe(self, text: str, out: list[int]) -> None:
        cache = self._word_cache
        for word in self._split(text):
            ids = cache.get(word)
            if ids is None:
                ids = self._bpe_word("".join(self._byte_enc[b] for b in word.encode("utf-8")))
                if len(cache) < 1 << 16:
                    cache[word] = ids
            out.extend(ids)

    def _bpe_word(self, word: str) -> list[int]:
        """llm_tokenizer_bpe_session::tokenize for one pre-tokenized, byte-encoded word."""
        t2i, ranks = self.token_to_id, self._ranks
        if self._ignore_merges and word in t2i:
            return [t2i[word]]
        syms = list(word)
        n = len(syms)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[int, int, int, str]] = []

        def add(left: int, right: int) -> None:
            if left == -1 or right == -1:
                return
            rank = ranks.get((syms[left], syms[right]))
            if rank is not None:
                heapq.heappush(heap, (rank, left, right, syms[left] + syms[right]))

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, joined = heapq.heappop(heap)
            if not syms[left] or not syms[right] or syms[left] + syms[right] != joined:
                continue
            syms[left] = joined
            syms[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        ids: list[int] = []
        for s in syms:
            if not s:
                continue
            tid = t2i.get(s)
            if tid is not None:
                ids.append(tid)
                continue
            for b in s.encode("utf-8"):  # as llama.cpp: single bytes of the encoded text
                bid = t2i.get(chr(b)) if b < 128 else None
                if bid is not None:
                    ids.append(bid)
        return ids


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (unicode_byte_to_utf8_map)."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


# -- pre-tokenizer scanners (ports of unicode_regex_split_custom_*) --------------------------------

_FLAG_CACHE: dict[str, int] = {}
_LETTER, _NUMBER, _SPACE, _DEFINED = 1, 2, 4, 8


def _flags(text: str) -> list[int]:
    """Per character: letter (\\p{L}), number (\\p{N}), whitespace, defined (any category) bits,
    plus a trailing 0 standing for 'past the end' (llama.cpp's empty flags)."""
    cache = _FLAG_CACHE
    out = []
    for ch in text:
        f = cache.get(ch)
        if f is None:
            cat = unicodedata.category(ch)
            f = _DEFINED
            if cat[0] == "L":
                f |= _LETTER
            elif cat[0] == "N":
                f |= _NUMBER
            if ch in _WHITESPACE:
                f |= _SPACE
            cache[ch] = f
        out.append(f)
    out.append(0)
    return out


def _contraction(text: str, pos: int, end: int, fold: bool) -> int:
    """Length of 's 't 're 've 'm 'll 'd at pos (0 if none); case-insensitive when fold."""
    if text[pos] != "'" or pos + 1 >= end:
        return 0
    a = text[pos + 1].lower() if fold else text[pos + 1]
    if a in "stmd":
        return 2
    if pos + 2 < end:
        b = text[pos + 2].lower() if fold else text[pos + 2]
        if (a, b) in (("r", "e"), ("v", "e"), ("l", "l")):
            return 3
    return 0


def _split_llama3(text: str, max_digits: int = 3) -> list[str]:
    """(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}|
    ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"""
    fl = _flags(text)
    end = len(text)
    words: list[str] = []
    prev_end = 0
    pos = 0

    def emit(stop: int) -> int:
        nonlocal prev_end
        length = stop - prev_end
        if length > 0:
            words.append(text[prev_end:stop])
        prev_end = stop
        return length

    while pos < end:
        cpt = text[pos]
        f = fl[pos]
        k = _contraction(text, pos, end, fold=True)
        if k:
            pos += emit(pos + k)
            continue
        # [^\r\n\p{L}\p{N}]?\p{L}+
        if not (cpt == "\r" or cpt == "\n" or f & _NUMBER):
            if f & _LETTER or fl[pos + 1] & _LETTER:
                pos += 1
                while fl[pos] & _LETTER:
                    pos += 1
                emit(pos)
                continue
        # \p{N}{1,3}  (qwen2: \p{N})
        if f & _NUMBER:
            ini = pos
            while fl[pos] & _NUMBER:
                pos += 1
                if pos - ini >= max_digits:
                    emit(pos)
                    ini = pos
            emit(pos)
            continue
        # <space>?[^\s\p{L}\p{N}]+[\r\n]*
        f2 = fl[pos + 1] if cpt == " " else f
        if not (f2 & (_SPACE | _LETTER | _NUMBER)) and f:
            pos += cpt == " "
            while not (f2 & (_SPACE | _LETTER | _NUMBER)) and f2:
                pos += 1
                f2 = fl[pos]
            while pos < end and text[pos] in "\r\n":
                pos += 1
            emit(pos)
            continue
        n_ws = 0
        last_rn = 0
        while fl[pos + n_ws] & _SPACE:
            if text[pos + n_ws] in "\r\n":
                last_rn = pos + n_ws + 1
            n_ws += 1
        if last_rn > 0:  # \s*[\r\n]+
            pos = last_rn
            emit(pos)
            continue
        if n_ws > 1 and pos + n_ws < end:  # \s+(?!\S)
            pos += n_ws - 1
            emit(pos)
            continue
        if n_ws > 0:  # \s+
            pos += n_ws
            emit(pos)
            continue
        pos += 1
        emit(pos)
    return words


def _split_qwen2(text: str) -> list[str]:
    """As llama3 with single digits: ...|\\p{N}|..."""
    return _split_llama3(text, max_digits=1)


def _split_gpt2(text: str) -> list[str]:
    """'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    fl = _flags(text)
    end = len(text)
    words: list[str] = []
    prev_end = 0
    pos = 0

    def emit(stop: int) -> int:
        nonlocal prev_end
        length = stop - prev_end
        if length > 0:
            words.append(text[prev_end:stop])
        prev_end = stop
        return length

    while pos < end:
        cpt = text[pos]
        k = _contraction(text, pos, end, fold=False)
        if k:
            pos += emit(pos + k)
            continue
        f2 = fl[pos + 1] if cpt == " " else fl[pos]
        for cls in (_LETTER, _NUMBER):
            if f2 & cls:
                pos += cpt == " "
                while f2 & cls:
                    pos += 1
                    f2 = fl[pos]
                emit(pos)
                break
        else:
            if not (f2 & (_SPACE | _LETTER | _NUMBER)) and f2:
                pos += cpt == " "
                while not (f2 & (_SPACE | _LETTER | _NUMBER)) and f2:
                    pos += 1
                    f2 = fl[pos]
                emit(pos)
                continue
            n_ws = 0
            while fl[pos + n_ws] & _SPACE:
                n_ws += 1
            if n_ws > 1 and pos + n_ws < end:
                pos += n_ws - 1
                emit(pos)
                continue
            if n_ws > 0:
                pos += n_ws
                emit(pos)
                continue
            pos += 1
            emit(pos)
    return words
