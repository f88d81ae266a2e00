"""Perplexity and KL divergence: llama-perplexity's chunking and scoring, streamed over the
vocabulary, against brute force over full logits; and against llama.cpp on the real model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from quantcli.engine.model import Model, forward
from quantcli.engine.perplexity import PerplexityOptions, chunk_tokens, evaluate, perplexity
from quantcli.errors import InputError
from quantcli.formats import open_model

DATA = Path(__file__).parent.parent / "data" / "engine"
V = 275  # tiny vocabulary size (tests/models.py)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def brute_force(m: Model, tokens: np.ndarray, ctx: int, chunks: int):
    """Full logits of every chunk, scored as perplexity.cpp scores them."""
    ch = chunk_tokens(tokens, ctx, chunks, 2, True)
    lp = log_softmax(forward(m, ch))  # [n, ctx, V]
    first = ctx // 2
    pos = np.arange(first, ctx - 1)
    nll = -np.take_along_axis(lp[:, pos], ch[:, pos + 1, None], axis=2)[..., 0]  # [n, ctx/2 - 1]
    return ch, lp, nll


def test_uniform_model_has_perplexity_vocab_size(tiny_model):
    path = tiny_model("llama", tied=False, zero_output=True)
    tokens = np.random.default_rng(0).integers(0, V, 200)
    with open_model(path) as r:
        res = perplexity(Model(r), tokens, PerplexityOptions(ctx=32))
    assert res.chunks == 6 and res.tokens == 6 * 15
    assert res.perplexity == pytest.approx(V, rel=1e-9)
    assert all(p == pytest.approx(V, rel=1e-9) for p in res.running)
    assert res.kld_mean is None and res.top1_agreement is None


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_streamed_head_equals_full_logits(tiny_model, arch):
    path = tiny_model(arch, sliding_window=8 if arch == "gemma3" else 0)
    tokens = np.random.default_rng(1).integers(0, V, 150)
    opts = PerplexityOptions(ctx=24, chunks=5, vocab_slice=64, position_block=7)
    with open_model(path) as r:
        m = Model(r)
        res = perplexity(m, tokens, opts)
        _, _, nll = brute_force(m, tokens, 24, 5)
    running = np.exp(np.cumsum(nll.sum(1)) / (11 * np.arange(1, 6)))
    assert res.perplexity == pytest.approx(np.exp(nll.mean()), rel=1e-6)
    assert np.allclose(res.running, running, rtol=1e-6)
    assert np.allclose(res.chunk_perplexity, np.exp(nll.mean(1)), rtol=1e-6)
    assert re.fullmatch(r"(\[\d\]\d+\.\d{4},){5}", res.llama_line())


def test_kld_against_base_equals_brute_force(tiny_model):
    base_path = tiny_model("qwen3", seed=3)
    model_path = tiny_model("qwen3", seed=3, dtype="Q8_0")  # same weights, quantized
    tokens = np.random.default_rng(2).integers(0, V, 130)
    opts = PerplexityOptions(ctx=32, vocab_slice=50, position_block=16)
    with open_model(base_path) as rb, open_model(model_path) as rm:
        base, model = Model(rb), Model(rm)
        res = perplexity(model, tokens, opts, base=base)
        self_res = perplexity(base, tokens, opts, base=base)
        _, lq, nll_q = brute_force(model, tokens, 32, None)
        _, lb, nll_b = brute_force(base, tokens, 32, None)
    pos = np.arange(16, 31)
    p = np.exp(lb[:, pos])
    kld = (p * (lb[:, pos] - lq[:, pos])).sum(-1).ravel()
    top1 = (lb[:, pos].argmax(-1) == lq[:, pos].argmax(-1)).mean()
    assert res.kld_mean == pytest.approx(kld.mean(), rel=1e-4, abs=1e-9)
    assert res.kld_p99 == pytest.approx(np.percentile(kld, 99), rel=1e-4, abs=1e-9)
    assert res.top1_agreement == pytest.approx(top1)
    assert res.base_perplexity == pytest.approx(np.exp(nll_b.mean()), rel=1e-6)
    assert res.perplexity == pytest.approx(np.exp(nll_q.mean()), rel=1e-6)
    assert 0 < res.kld_mean < 0.1
    assert abs(self_res.kld_mean) < 1e-6 and self_res.top1_agreement == 1.0


def test_chunks_start_with_bos_and_need_two_contexts():
    tokens = np.arange(5, 105)
    ch = chunk_tokens(tokens, 16, None, bos_id=2, add_bos=True)
    assert ch.shape == (6, 16) and (ch[:, 0] == 2).all() and ch[1, 1] == 5 + 17
    assert chunk_tokens(tokens, 16, 2, 2, False)[1, 0] == 5 + 16
    with pytest.raises(InputError, match="at least 128"):
        chunk_tokens(tokens, 64, None, 2, True)


def test_evaluate_text_and_memory_mapped_hidden(tiny_model, tmp_path):
    path = tiny_model("gemma3", sliding_window=8)
    text = "the heat in the hearth " * 40
    res = evaluate(path, text, PerplexityOptions(ctx=32, chunks=3))
    mm = evaluate(path, text, PerplexityOptions(ctx=32, chunks=3, hidden_path=tmp_path / "h.npy"))
    assert res.tokens == 3 * 15 and res.running == mm.running
    assert 1 < res.perplexity < 1e4


def _llama_running(log: Path) -> list[float]:
    line = next(x for x in log.read_text().splitlines() if x.startswith("[1]"))
    return [float(v) for v in re.findall(r"\[\d+\]([0-9.]+)", line)]


def test_real_model_f32_matches_llama_perplexity(real_f32):
    text = (DATA / "exodus.txt").read_bytes().decode("utf-8")
    res = evaluate(real_f32, text, PerplexityOptions(ctx=512, chunks=2))
    ref = _llama_running(DATA / "ppl-exodus-F32.log")[:2]  # llama-perplexity -c 512 on the F32 base
    assert np.allclose(res.running, ref, rtol=0.005)
