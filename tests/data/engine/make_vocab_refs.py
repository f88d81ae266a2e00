"""Regenerate the small tokenizer fixtures in this directory (not run by the tests).

    python tests/data/engine/make_vocab_refs.py /path/to/llama-build/bin /path/to/gemma3-f32.gguf

- `vocab-bpe.json`: a byte-level BPE (1500 tokens) trained with Hugging Face `tokenizers` on
  the Genesis text (needs the `tokenizers` package, a dev tool, not a quantcli dependency);
- `vocab-spm.json`: Gemma 3's SPM vocabulary cut to its byte tokens, specials and the 3000
  best-scoring pieces, to be used with `add_space_prefix` true (the Llama 2 convention);
- `tokens-vocab-<name>[-noparse].txt`: `llama-tokenize --ids [--no-parse-special]` on
  `tokenizer-sample.txt` with a vocab-only GGUF built from each (pre-tokenizers llama-bpe, qwen2,
  gpt-2 for the BPE one). llama-tokenize parses special tokens by default; llama-perplexity and
  llama-imatrix do not.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np

HERE = Path(__file__).parent
SAMPLE = HERE / "tokenizer-sample.txt"


def write_vocab_gguf(path: Path, vocab: dict, pre: str | None, extra: dict | None = None) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(vocab["model"])
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab.get("scores"):
        w.add_token_scores(vocab["scores"])
    if vocab.get("merges"):
        w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    for k, v in (extra or {}).items():
        getattr(w, k)(v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def bpe_vocab() -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<|begin|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    genesis = (HERE / "genesis.txt").read_text(encoding="utf-8")
    tok.train_from_iterator([genesis, SAMPLE.read_text(encoding="utf-8")], trainer)
    model = json.loads(tok.to_str())["model"]
    inv = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in inv]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in ("<|begin|>", "<|end|>") else 1 for t in tokens]
    return {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges,
            "bos": tokens.index("<|begin|>"), "eos": tokens.index("<|end|>")}


def spm_vocab(gemma_path: str) -> dict:
    r = gguf.GGUFReader(gemma_path)
    f = r.fields
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode("utf-8")
              for i in f["tokenizer.ggml.tokens"].data]
    scores = np.array([f["tokenizer.ggml.scores"].parts[i][0] for i in f["tokenizer.ggml.scores"].data])
    types = np.array([f["tokenizer.ggml.token_type"].parts[i][0] for i in f["tokenizer.ggml.token_type"].data])
    keep = set(range(4)) | set(np.nonzero(types == 6)[0].tolist())
    normal = np.nonzero(types == 1)[0]
    keep |= set(normal[np.argsort(-scores[normal], kind="stable")[:3000]].tolist())
    ids = sorted(keep)
    return {"model": "llama", "tokens": [tokens[i] for i in ids], "types": [int(types[i]) for i in ids],
            "scores": [float(scores[i]) for i in ids], "bos": ids.index(2), "eos": ids.index(1)}


def main(bin_dir: str, gemma_path: str) -> None:
    bpe = bpe_vocab()
    spm = spm_vocab(gemma_path)
    (HERE / "vocab-bpe.json").write_text(json.dumps(bpe, ensure_ascii=False))
    (HERE / "vocab-spm.json").write_text(json.dumps(spm, ensure_ascii=False))
    cases = {
        "bpe-llama-bpe": (bpe, "llama-bpe", {}),
        "bpe-qwen2": (bpe, "qwen2", {"add_add_bos_token": False}),
        "bpe-gpt2": (bpe, "gpt-2", {"add_add_bos_token": True}),
        "spm-prefix": (spm, None, {"add_add_space_prefix": True, "add_add_bos_token": True}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, (vocab, pre, extra) in cases.items():
            path = Path(tmp) / f"{name}.gguf"
            write_vocab_gguf(path, vocab, pre, extra)
            for suffix, flags in (("", []), ("-noparse", ["--no-parse-special"])):
                out = subprocess.run([f"{bin_dir}/llama-tokenize", "-m", str(path), "-f", str(SAMPLE),
                                      "--ids", "--log-disable", *flags],
                                     capture_output=True, text=True, check=True)
                ids = out.stdout.strip().splitlines()[-1]
                (HERE / f"tokens-vocab-{name}{suffix}.txt").write_text(ids + "\n")
                print(name + suffix, len(json.loads(ids)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
