"""Optional: PEFT itself makes the adapter and merges it (`merge_and_unload`), and quantcli's merge of
the files PEFT saved gives the same tensors. Skipped without torch, transformers and peft (the
project does not depend on them; CI has none)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.numpy import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from quantcli.cli.app import app  # noqa: E402
from quantcli.formats import open_model  # noqa: E402
from tests.convert.checkpoints import build  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _cli(*args) -> None:
    res = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output


def _peft_adapter(src: Path, out: Path, r: int, rslora: bool, seed: int):
    """(adapter directory as PEFT saves it, the model PEFT merged) for checkpoint `src`."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    cfg = peft.LoraConfig(r=r, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.1, use_rslora=rslora,
                          init_lora_weights=False)  # B random: a trained adapter, not a fresh one
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(out)
    return out, pm.merge_and_unload()


@pytest.mark.parametrize("r,rslora", [(8, False), (16, True)])
def test_peft_merge_and_unload_equals_dequantize_lora(tmp_path, r, rslora):
    src = build("llama-spm", tmp_path)
    adapter, merged = _peft_adapter(src, tmp_path / "adapter", r, rslora, seed=r)
    assert (adapter / "adapter_model.safetensors").is_file()
    _cli("dequantize", src, tmp_path / "ours.safetensors", "--lora", adapter, "-q")
    ours = load_file(str(tmp_path / "ours.safetensors"))
    theirs = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    assert set(theirs) <= set(ours)  # ours also keeps the checkpoint's rotary inv_freq buffers
    changed = 0
    for name, x in theirs.items():
        np.testing.assert_allclose(ours[name], x, rtol=0, atol=2e-6, err_msg=name)
        changed += any(t in name for t in TARGETS)
    assert changed == 7 * 2


def test_peft_merge_through_gguf_equals_converting_peft_merged_checkpoint(tmp_path):
    """quantize HF_DIR --lora (merged in GGUF's layout, q/k rows permuted) = quantize of the
    checkpoint PEFT merged and saved."""
    src = build("llama-spm", tmp_path)
    adapter, merged = _peft_adapter(src, tmp_path / "adapter", 8, False, seed=1)
    merged.save_pretrained(tmp_path / "peft-merged", safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (tmp_path / "peft-merged" / f.name).write_bytes(f.read_bytes())
    _cli("quantize", src, tmp_path / "ours.gguf", "--type", "F32", "--lora", adapter, "-q")
    _cli("quantize", tmp_path / "peft-merged", tmp_path / "theirs.gguf", "--type", "F32", "-q")
    with open_model(tmp_path / "ours.gguf") as a, open_model(tmp_path / "theirs.gguf") as b:
        assert set(a.tensors) == set(b.tensors)
        for name in a.tensors:
            np.testing.assert_allclose(a.load_f32(name), b.load_f32(name), rtol=0, atol=2e-6, err_msg=name)
