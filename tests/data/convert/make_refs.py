"""Regenerate the converter references in this directory (not run by the tests).

    python tests/data/convert/make_refs.py /path/to/llama.cpp [/path/to/minilm]

Needs torch, transformers, sentencepiece and `tokenizers` (dev tools, not quantcli dependencies) and
the llama.cpp tree of the llama-cpp-python 0.3.36 sdist (`vendor/llama.cpp`), whose
`convert_hf_to_gguf.py` is the reference. For every checkpoint of `tests/convert/checkpoints.py` it
runs the converter with `--outtype f32` and `--outtype f16` and records, in `<name>.json`:

- `kv`: every metadata key but `general.file_type`: scalars as values, arrays as their length, item
  type and the sha256 of their JSON (`json.dumps(list)`);
- `tensors`: for f32 and f16, each tensor's GGML type, GGUF shape and the sha256 of its bytes.

The test tokenizers are not in the converter's pre-tokenizer hash table, so for them (and only when
the converter raises) `get_vocab_base_pre` answers with the name of the pre-tokenizer they were built
with (`llama-bpe` or `qwen2`); `pre_tokenizer_supplied` records this. With `minilm` given, the same
metadata record is made for all-MiniLM-L6-v2 as `minilm-kv.json`.

`configs.json` pairs typical config.json files with what `AutoConfig.from_pretrained(d).to_dict()`
makes of them (the `expected` part is rewritten here; keys the converter never reads are left out).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))

from tests.convert.checkpoints import SPECS, build, record_gguf  # noqa: E402

RUNNER = r"""
import sys
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
sys.path.insert(0, {root!r})
import conversion.base as base
orig = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        return {pre!r}
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def convert(llama_cpp: Path, model: Path, outtype: str, out: Path, pre: str) -> None:
    code = RUNNER.format(root=str(llama_cpp), pre=pre)
    subprocess.run([sys.executable, "-c", code, str(llama_cpp), str(model), "--outtype", outtype,
                    "--outfile", str(out)], check=True, cwd=llama_cpp, capture_output=True)


# AutoConfig keys no converter path of the supported architectures reads
UNREAD = {"transformers_version", "output_hidden_states", "return_dict", "dtype", "torch_dtype",
          "chunk_size_feed_forward", "is_encoder_decoder", "label2id", "problem_type", "_name_or_path",
          "output_attentions", "hidden_act", "hidden_activation", "initializer_range", "use_cache",
          "pad_token_id", "bos_token_id", "eos_token_id", "pretraining_tp", "attention_bias",
          "attention_dropout", "mlp_bias", "classifier_dropout", "is_decoder", "add_cross_attention",
          "hidden_dropout_prob", "attention_probs_dropout_prob", "use_bidirectional_attention",
          "_sliding_window_pattern", "layer_types", "use_sliding_window", "max_window_layers"}


def record_configs(root: Path) -> None:
    from transformers import AutoConfig

    path = HERE / "configs.json"
    doc = json.loads(path.read_text())
    for name, entry in doc.items():
        d = root / "configs" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(entry["config"]))
        full = AutoConfig.from_pretrained(d).to_dict()
        if full.get("sliding_window") is None or full.get("model_type") != "gemma3_text":
            full.pop("sliding_window", None)  # read for Gemma 3 only
        entry["expected"] = {k: v for k, v in full.items() if k not in UNREAD}
    path.write_text(json.dumps(doc, indent=1) + "\n")


def main() -> None:
    llama_cpp = Path(sys.argv[1]).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        record_configs(root)
        for name, spec in SPECS.items():
            d = build(name, root)
            pre = "qwen2" if spec.tokenizer == "bpe-qwen2" else "llama-bpe"
            doc: dict = {"checkpoint": name, "tensors": {}}
            for outtype in ("f32", "f16"):
                out = root / f"{name}-{outtype}.gguf"
                convert(llama_cpp, d, outtype, out, pre)
                kv, tensors = record_gguf(out)
                doc["kv"] = kv
                doc["tensors"][outtype] = tensors
            doc["pre_tokenizer_supplied"] = spec.tokenizer.startswith("bpe")
            (HERE / f"{name}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
            print(name, len(doc["kv"]), "keys,", len(doc["tensors"]["f32"]), "tensors")
        if len(sys.argv) > 2:
            out = root / "minilm-f32.gguf"
            convert(llama_cpp, Path(sys.argv[2]).resolve(), "f32", out, "none")
            kv, _ = record_gguf(out)
            (HERE / "minilm-kv.json").write_text(json.dumps({"kv": kv}, indent=1, ensure_ascii=False) + "\n")
            print("minilm", len(kv), "keys")


if __name__ == "__main__":
    main()
