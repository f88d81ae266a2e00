"""Optional: llama.cpp itself loads what `quantize` writes and computes llama-perplexity's figures on it.

Runs when llama-perplexity is found ($QUANTCLI_LLAMA_BIN or PATH); skips otherwise."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from quantcli.pipelines import quantize as qp
from tests.conftest import DATA
from tests.llama_tools import llama_tool


def _llama_perplexity() -> Path | None:
    return llama_tool("llama-perplexity")


def test_q4_k_m_perplexity_in_llama_cpp(real_f32, tmp_path):
    exe = _llama_perplexity()
    if exe is None:
        pytest.skip("llama-perplexity not found (set QUANTCLI_LLAMA_BIN)")
    out = tmp_path / "q4_k_m.gguf"
    qp.run(qp.QuantizeOptions(real_f32, out, "Q4_K_M"))
    proc = subprocess.run([str(exe), "-m", str(out), "-f", str(DATA / "engine" / "exodus.txt"),
                           "-c", "512", "--chunks", "4", "-t", "2"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+)", proc.stdout + proc.stderr)]
    ref_log = (DATA / "engine" / "ppl-exodus-Q4_K_M.log").read_text()
    want = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+)", ref_log)][:4]
    assert got[:4] == pytest.approx(want, rel=1e-4)


def test_smoothed_q8_0_runs_in_llama_cpp(real_f32, tmp_path):
    """`quantcli smooth` (default alpha 0.5, norm mappings, Q8_0) writes a file llama.cpp loads and
    runs. Its perplexity there is close to plain Q8_0's, not better: llama.cpp's Q8_0 x Q8_0 blocks
    of 32 already absorb the outliers SmoothQuant moves (measured: 9.2292 vs 9.2202 on 8 chunks)."""
    exe = _llama_perplexity()
    if exe is None:
        pytest.skip("llama-perplexity not found (set QUANTCLI_LLAMA_BIN)")
    from quantcli.pipelines import smooth

    out, plain = tmp_path / "smoothed-q8_0.gguf", tmp_path / "q8_0.gguf"
    smooth.run(smooth.SmoothOptions(real_f32, out, DATA / "engine" / "genesis.txt", chunks=4))
    qp.run(qp.QuantizeOptions(real_f32, plain, "Q8_0"))

    def ppl(path: Path) -> float:
        proc = subprocess.run([str(exe), "-m", str(path), "-f", str(DATA / "engine" / "exodus.txt"),
                               "-c", "512", "--chunks", "4", "-t", "2"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return float(re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr).group(1))

    got, base = ppl(out), ppl(plain)
    assert abs(got / base - 1) < 0.01, (got, base)


def test_lora_merge_equals_llama_cpp_runtime_adapter(real_f32, tmp_path):
    """llama.cpp running the F32 base with a GGUF LoRA adapter (`--lora`, applied at runtime, scale
    alpha/r) gives the logits of `dequantize --lora`'s merged file: the KL divergence between them is
    float noise, far below what the adapter itself moves."""
    exe = _llama_perplexity()
    if exe is None:
        pytest.skip("llama-perplexity not found (set QUANTCLI_LLAMA_BIN)")
    import numpy as np

    from quantcli.formats import open_model
    from quantcli.pipelines import dequantize
    from quantcli.convert.lora import AdapterSpec
    from tests.convert.lora_files import write_gguf_adapter

    rng = np.random.default_rng(0)
    factors = {}
    with open_model(real_f32) as base:
        for il in (0, 3, 9, 14):
            for kind in ("attn_q", "attn_v", "ffn_down"):
                n_out, n_in = base.tensors[f"blk.{il}.{kind}.weight"].shape
                factors[f"blk.{il}.{kind}.weight"] = (
                    (rng.standard_normal((8, n_in)) / np.sqrt(n_in)).astype(np.float32),
                    (rng.standard_normal((n_out, 8)) * 0.02).astype(np.float32))
    adapter = write_gguf_adapter(tmp_path / "adapter.gguf", "gemma3", factors, alpha=16.0)
    merged = tmp_path / "merged.gguf"
    dequantize.run(dequantize.DequantizeOptions(real_f32, merged, lora=(AdapterSpec(adapter, 1.0),)))
    text, logits = str(DATA / "engine" / "exodus.txt"), tmp_path / "runtime.kld"
    common = ["-f", text, "-c", "512", "--chunks", "2", "-t", "2"]

    def run(*args: str) -> str:
        proc = subprocess.run([str(exe), *args, *common], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout + proc.stderr

    run("-m", str(real_f32), "--lora", str(adapter), "--kl-divergence-base", str(logits))

    def kld(model: Path) -> float:
        out = run("-m", str(model), "--kl-divergence-base", str(logits), "--kl-divergence")
        return float(re.search(r"Mean\s+KLD:\s+([-0-9.e]+)", out).group(1))

    merged_kld, base_kld = kld(merged), kld(real_f32)
    assert base_kld > 1e-3, base_kld  # the adapter changes the model
    assert merged_kld < 1e-5 and merged_kld < base_kld / 100, (merged_kld, base_kld)
