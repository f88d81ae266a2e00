"""Token ids against llama.cpp's (`llama-tokenize --ids`), for SPM and byte-level BPE vocabularies."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import pytest

from quantcli.engine.tokenizer import Tokenizer, vocab_from_meta

DATA = Path(__file__).parent.parent / "data" / "engine"
SAMPLE = (DATA / "tokenizer-sample.txt").read_bytes().decode("utf-8")  # keep \r\n


def _meta(vocab: dict, extra: dict):
    d = {"tokenizer.ggml.model": vocab["model"], "tokenizer.ggml.tokens": vocab["tokens"],
         "tokenizer.ggml.token_type": vocab["types"], "tokenizer.ggml.bos_token_id": vocab["bos"],
         "tokenizer.ggml.eos_token_id": vocab["eos"]}
    if vocab.get("merges"):
        d["tokenizer.ggml.merges"] = vocab["merges"]
    if vocab.get("scores"):
        d["tokenizer.ggml.scores"] = vocab["scores"]
    d.update(extra)
    return lambda key, default=None: d.get(key, default)


CASES = {  # as make_vocab_refs.py built the vocab-only GGUFs
    "bpe-llama-bpe": ("bpe", {"tokenizer.ggml.pre": "llama-bpe"}),
    "bpe-qwen2": ("bpe", {"tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.add_bos_token": False}),
    "bpe-gpt2": ("bpe", {"tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.add_bos_token": True}),
    "spm-prefix": ("spm", {"tokenizer.ggml.add_space_prefix": True, "tokenizer.ggml.add_bos_token": True}),
}


@pytest.mark.parametrize("parse_special", [True, False], ids=["parse", "noparse"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_small_vocab_matches_llama_tokenize(case: str, parse_special: bool) -> None:
    kind, extra = CASES[case]
    vocab = json.loads((DATA / f"vocab-{kind}.json").read_text(encoding="utf-8"))
    tok = Tokenizer(vocab_from_meta(_meta(vocab, extra)))
    suffix = "" if parse_special else "-noparse"
    ref = json.loads((DATA / f"tokens-vocab-{case}{suffix}.txt").read_text())
    assert tok.encode(SAMPLE, parse_special=parse_special) == ref


def test_bpe_round_trip_and_no_bos_without_special() -> None:
    vocab = json.loads((DATA / "vocab-bpe.json").read_text(encoding="utf-8"))
    tok = Tokenizer(vocab_from_meta(_meta(vocab, {"tokenizer.ggml.pre": "llama-bpe"})))
    ids = tok.encode(SAMPLE, add_special=False)
    assert ids[0] != vocab["bos"]
    assert tok.detokenize(ids) == SAMPLE


def test_unknown_pre_tokenizer_is_refused() -> None:
    from quantcli.errors import InputError

    vocab = json.loads((DATA / "vocab-bpe.json").read_text(encoding="utf-8"))
    with pytest.raises(InputError, match="pre-tokenizer 'no-such-pre'"):
        Tokenizer(vocab_from_meta(_meta(vocab, {"tokenizer.ggml.pre": "no-such-pre"})))


@pytest.fixture(scope="module")
def gemma_tokenizer(real_model: Path) -> Tokenizer:
    from quantcli.formats import open_model

    with open_model(real_model) as m:
        return Tokenizer.from_model(m)


@pytest.mark.parametrize("book", ["genesis", "exodus"])
def test_gemma_ids_equal_llama_tokenize(gemma_tokenizer: Tokenizer, book: str) -> None:
    text = (DATA / f"{book}.txt").read_bytes().decode("utf-8")
    ref = ast.literal_eval((DATA / f"tokens-{book}.txt").read_text())
    t0 = time.perf_counter()
    ids = gemma_tokenizer.encode(text)
    assert time.perf_counter() - t0 < 10  # ~0.3 s here: seconds, not minutes
    assert ids == ref
