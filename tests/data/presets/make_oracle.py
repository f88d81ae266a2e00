"""Regenerate oracle.json.gz: llama-quantize --dry-run's type choices on tiny synthetic models.

    python tests/data/presets/make_oracle.py /path/to/llama-quantize [imatrix.gguf]

Each model is a GGUF whose tensors have the real row length (ne0) of the architecture it imitates
but only 2 rows, so only names, ne0 and metadata matter. llama-quantize runs with --dry-run
(no imatrix data is read, but --imatrix still sets has_imatrix). For every case the JSON keeps
each tensor's chosen type (in the model's tensor order), the fallback count llama-quantize warns
about, and whether it warned that the real run would require an imatrix.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

HERE = Path(__file__).resolve().parent
PRESETS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S",
           "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M",
           "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "F16", "BF16", "F32",
           "COPY"]


def dense(arch: str, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int, *, tied=False,
          qkv=False, extra=(), dtype="F32", kv=None):
    t = [("token_embd.weight", (2, n_embd)), ("output_norm.weight", (n_embd,))]
    if not tied:
        t.append(("output.weight", (2, n_embd)))
    for i in range(n_layer):
        p = f"blk.{i}."
        t += [(p + "attn_norm.weight", (n_embd,)), (p + "ffn_norm.weight", (n_embd,)),
              (p + "attn_output.weight", (2, n_embd)), (p + "ffn_up.weight", (2, n_embd)),
              (p + "ffn_gate.weight", (2, n_embd)), (p + "ffn_down.weight", (2, n_ff))]
        t += [(p + "attn_qkv.weight", (2, n_embd))] if qkv else [
            (p + "attn_q.weight", (2, n_embd)), (p + "attn_k.weight", (2, n_embd)), (p + "attn_v.weight", (2, n_embd))]
    t += list(extra)
    meta = {"general.architecture": arch, f"{arch}.block_count": n_layer, f"{arch}.context_length": 4096,
            f"{arch}.embedding_length": n_embd, f"{arch}.feed_forward_length": n_ff,
            f"{arch}.attention.head_count": n_head, f"{arch}.attention.head_count_kv": n_head_kv,
            f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.attention.layer_norm_epsilon": 1e-5,
            f"{arch}.rope.dimension_count": n_embd // n_head, **(kv or {})}
    return {"metadata": meta, "tensors": [{"name": n, "shape": list(s), "dtype": dtype} for n, s in t]}


def moe(n_layer=32, n_embd=1024, n_ff=2816, n_expert=8):
    m = dense("llama", n_layer, n_embd, n_ff, 32, 8, kv={"llama.expert_count": n_expert, "llama.expert_used_count": 2})
    out = []
    for t in m["tensors"]:
        name = t["name"]
        for kind in ("ffn_up", "ffn_gate", "ffn_down"):
            if name.endswith(f".{kind}.weight"):
                t = {**t, "name": name.replace(kind, f"{kind}_exps"), "shape": [n_expert] + t["shape"]}
                if kind == "ffn_gate":
                    out.append({"name": name.replace("ffn_gate", "ffn_gate_inp"), "shape": [n_expert, n_embd],
                                "dtype": t["dtype"]})
        out.append(t)
    m["tensors"] = out
    return m


MODELS = {
    # Llama-3-8B-like: GQA 32/8, 4096-wide rows
    "llama-gqa": dense("llama", 32, 4096, 14336, 32, 8),
    # SmolLM-like: MHA, tied embeddings, rows of 576 (not a multiple of 256)
    "llama-tied-576": dense("llama", 30, 576, 1536, 9, 3, tied=True),
    # Llama-2-70B-like: 80 layers, GQA -> LLM_TYPE_70B
    "llama-70b": dense("llama", 80, 8192, 28672, 64, 8, dtype="F16"),
    # Mixtral-like: 8 experts, 3-D expert tensors
    "llama-moe8": moe(),
    # Falcon-7B-like: fused attn_qkv, rows of 4544
    "falcon": dense("falcon", 32, 4544, 18176, 71, 1),
    # odd shapes and tensors that are never quantized
    "odd": dense("qwen2", 8, 96, 100, 8, 8, extra=[
        ("position_embd.weight", (2, 256)), ("blk.0.attn_rel_b.weight", (2, 256)), ("abcde", (2, 256)),
        ("blk.0.ssm_conv1d.weight", (2, 256)), ("blk.1.extra.bias", (2, 256)), ("per_layer_token_embd.weight", (2, 256)),
        ("blk.2.attn_kv_b.weight", (2, 256)), ("blk.1.flat.weight", (1, 256))]),
}

OPTION_CASES = [  # (model, preset, extra args)
    ("llama-gqa", "Q4_K_M", ["--pure"]),
    ("llama-gqa", "Q4_K_M", ["--leave-output-tensor"]),
    ("llama-gqa", "Q4_K_M", ["--output-tensor-type", "q8_0", "--token-embedding-type", "q4_0"]),
    ("llama-gqa", "Q4_K_M", ["--tensor-type", "attn_v=q8_0", "--tensor-type", "ATTN=q5_k"]),
    ("llama-gqa", "Q3_K_M", ["--tensor-type", r"blk\.1[0-9]\.ffn_down=iq4_xs", "--tensor-type", "ffn_down=q2_k"]),
    ("llama-gqa", "IQ2_XS", ["--tensor-type", "attn_v=iq2_xxs"]),
    ("llama-gqa", "F16", ["--tensor-type", "attn_v=q8_0", "--token-embedding-type", "q4_0"]),
    ("llama-tied-576", "Q4_K_M", ["--output-tensor-type", "q4_k"]),
    ("llama-tied-576", "Q4_K_M", ["--token-embedding-type", "q4_k"]),
    ("llama-tied-576", "Q5_K_M", ["--pure"]),
    ("llama-tied-576", "IQ4_XS", ["--tensor-type", "ffn_up=q4_k", "--tensor-type", "ffn=iq2_xxs"]),
    ("odd", "Q4_K_M", ["--token-embedding-type", "q8_0", "--tensor-type", "per_layer=q4_0"]),
    ("odd", "Q4_K_M", ["--token-embedding-type", "q8_0"]),
    ("odd", "Q8_0", ["--leave-output-tensor", "--pure"]),
]

LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*\], type =\s+(\S+), size =.*?(?:\((\S+)\))?$")


def write_model(spec: dict, path: Path) -> None:
    w = GGUFWriter(str(path), spec["metadata"]["general.architecture"])
    for k, v in spec["metadata"].items():
        if k == "general.architecture":
            continue
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    for t in spec["tensors"]:
        dt = np.float16 if t["dtype"] == "F16" else np.float32
        w.add_tensor(t["name"], np.zeros(t["shape"], dtype=dt))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run(exe: str, model: Path, preset: str, args: list[str]) -> dict:
    out = subprocess.run([exe, "--dry-run", *args, str(model), preset], capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        return {"error": text.strip().splitlines()[-1]}
    types = {}
    for line in text.splitlines():
        m = LINE.match(line.strip())
        if m:
            types[m.group(1)] = (m.group(3) or m.group(2)).upper()
    fb = re.search(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback", text)
    return {"types": types, "fallbacks": int(fb.group(1)) if fb else 0,
            "requires_imatrix": "will require an imatrix" in text}


def main() -> None:
    exe = sys.argv[1]
    imatrix = sys.argv[2] if len(sys.argv) > 2 else str(HERE.parent / "reference/gemma3-270m/imatrix-genesis.gguf")
    doc = {"models": {}, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, spec in MODELS.items():
            paths[name] = Path(tmp) / f"{name}.gguf"
            write_model(spec, paths[name])
            doc["models"][name] = spec
        cases = [(m, p, im) for m in MODELS for p in PRESETS for im in ([], ["--imatrix", imatrix])]
        cases += [(m, p, a) for m, p, a in OPTION_CASES]
        for model, preset, args in cases:
            res = run(exe, paths[model], preset, args)
            names = [t["name"] for t in MODELS[model]["tensors"]]
            case = {"model": model, "preset": preset,
                    "args": ["--imatrix"] if args and args[0] == "--imatrix" else args}
            if "error" in res:
                case["error"] = res["error"]
            else:
                case["types"] = " ".join(res["types"][n] for n in names)
                case["fallbacks"] = res["fallbacks"]
                case["requires_imatrix"] = res["requires_imatrix"]
            doc["cases"].append(case)
    data = json.dumps(doc, separators=(",", ":")).encode()  # ~0.9 MB of JSON, 16 kB gzipped
    (HERE / "oracle.json.gz").write_bytes(gzip.compress(data, mtime=0))
    print(f"{len(doc['cases'])} cases")


if __name__ == "__main__":
    main()
