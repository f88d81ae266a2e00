"""LoRA adapters written with numpy alone, in PEFT's directory layout and in llama.cpp's GGUF layout
(`convert_lora_to_gguf.py`), for the merge tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import save_file

PREFIX = "base_model.model."


def peft_factors(modules: dict[str, tuple[int, int]], r: int, seed: int = 0,
                 ranks: dict[str, int] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module -> (A [r, in], B [out, r]) float32, B random (PEFT starts it at zero; a trained one is not)."""
    rng = np.random.default_rng(seed)
    out = {}
    for module, (n_in, n_out) in modules.items():
        rank = (ranks or {}).get(module, r)
        a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
        b = (rng.standard_normal((n_out, rank)) * 0.05).astype(np.float32)
        out[module] = (a, b)
    return out


def write_peft(d: Path, factors: dict[str, tuple[np.ndarray, np.ndarray]], r: int, alpha: float, *,
               rslora: bool = False, dropout: float = 0.05, targets: Any = None, embedding: tuple[str, ...] = (),
               config: dict[str, Any] | None = None, dtype: str = "float32") -> Path:
    """A PEFT LoRA directory: adapter_config.json as PEFT 0.17 writes it, adapter_model.safetensors
    with `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (embeddings:
    `lora_embedding_A` [r, vocab] / `lora_embedding_B` [dim, r], no `.weight`)."""
    d.mkdir(parents=True, exist_ok=True)
    short = sorted({m.rsplit(".", 1)[-1] for m in factors})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
           "use_rslora": rslora, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
           "target_modules": short if targets is None else targets, "rank_pattern": {}, "alpha_pattern": {},
           "modules_to_save": None, "init_lora_weights": True, "base_model_name_or_path": "tiny",
           "inference_mode": True, **(config or {})}
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    tensors = {}
    for module, (a, b) in factors.items():
        if module in embedding:
            tensors[f"{PREFIX}{module}.lora_embedding_A"] = a
            tensors[f"{PREFIX}{module}.lora_embedding_B"] = b
        else:
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{PREFIX}{module}.lora_B.weight"] = b
    if dtype != "float32":
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return d


def write_gguf_adapter(path: Path, arch: str, factors: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float,
                       extra: dict[str, Any] | None = None) -> Path:
    """A llama.cpp LoRA GGUF: general.type adapter, adapter.type lora, adapter.lora.alpha; tensors
    `<gguf name>.lora_a` [r, in] and `.lora_b` [out, r] in numpy order (token_embd: a [vocab, r],
    b [dim, r]), F32."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha))
    for key, value in (extra or {}).items():
        if isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_string(key, value)
    for name, (a, b) in factors.items():
        w.add_tensor(f"{name}.lora_a", a)
        w.add_tensor(f"{name}.lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
