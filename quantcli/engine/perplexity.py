"""Perplexity with llama-perplexity's semantics, and KL divergence against a base model.

As `tools/perplexity/perplexity.cpp`: the text is tokenized once (BOS as the vocabulary says);
chunk i is tokens[i*ctx:(i+1)*ctx] with its first token replaced by BOS; only the second half is
scored (logits at positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1); `running[i]` is
exp(mean NLL over chunks 0..i), the `[i]` values llama prints.

Memory stays bounded. Both models run layer-sequentially over all chunks and keep only the
final hidden states of the scored positions ([n_chunks * (ctx/2 - 1), n_embd], 1.3 MB per chunk
for Gemma 3 270M). The output projection then streams over vocabulary slices: each slice of
rows is dequantized once, multiplied against the scored positions in blocks, and folded into
per-position online accumulators (max, sum of exp, target logit, argmax and, with a base, the
KL sum). Nothing of size [tokens, vocab] is ever held — a 262144-wide logit row exists only
slice by slice. The price: with a base model both models' hidden states are computed before
any logit (the KLD needs both at once), and the head's work is done in slices rather than one
large matmul (a few percent slower than one [tokens, vocab] product, and no per-token logits
are kept for later inspection).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantcli.engine.model import Model, run_layers
from quantcli.progress import Progress, ProgressFn, progress_or_noop
from quantcli.engine.tokenizer import Tokenizer
from quantcli.engine.w8a8 import W8A8
from quantcli.errors import InputError, UsageError


@dataclass(frozen=True)
class PerplexityOptions:
    ctx: int = 512  # tokens per chunk (llama-perplexity -c)
    chunks: int | None = None  # at most this many chunks (--chunks); None: all the text gives
    vocab_slice: int = 8192  # output rows dequantized and multiplied at a time
    position_block: int = 1024  # scored positions per logits block in the head (32 MB of logits)
    kv_f16: bool = True  # round k, v to fp16 like llama.cpp's default KV cache
    act_quant: bool = True  # round matmul inputs to Q8_0/Q8_K/F16 as ggml-cpu does for quantized weights
    hidden_path: Path | None = None  # scratch file to memory-map the hidden states (removed after)
    simulate: W8A8 | None = None  # run the model's block linears as W8A8 (not the base's); see engine/w8a8.py


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float  # exp(mean NLL), llama's "Final estimate"
    perplexity_error: float  # llama's "+/-"
    tokens: int  # scored tokens
    chunks: int
    ctx: int
    running: tuple[float, ...]  # llama's [1]..[n] values: running perplexity after each chunk
    chunk_perplexity: tuple[float, ...]  # each chunk on its own
    kld_mean: float | None = None  # mean KL(base || model) per scored token, nats
    kld_p99: float | None = None  # 99th percentile (linear interpolation, as llama)
    top1_agreement: float | None = None  # share of tokens where both argmaxes agree
    base_perplexity: float | None = None
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Evaluated tokens (chunks * ctx, as llama counts work) per second."""
        return self.chunks * self.ctx / self.seconds if self.seconds else 0.0

    def llama_line(self) -> str:
        """The per-chunk line exactly as llama-perplexity prints it."""
        return "".join(f"[{i + 1}]{p:.4f}," for i, p in enumerate(self.running))


def chunk_tokens(tokens: np.ndarray | list[int], ctx: int, chunks: int | None, bos_id: int | None,
                 add_bos: bool) -> np.ndarray:
    """[n_chunks, ctx] token ids with each chunk's first token set to BOS (when the vocab adds BOS)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if ctx < 4 or ctx % 2:
        raise UsageError(f"context {ctx} must be an even number >= 4")
    if len(tokens) < 2 * ctx:
        raise InputError(f"the text gives {len(tokens)} tokens; a context of {ctx} needs at least {2 * ctx}",
                         hint="use a longer text or a smaller --ctx")
    n = len(tokens) // ctx if chunks is None else min(chunks, len(tokens) // ctx)
    out = tokens[: n * ctx].reshape(n, ctx).copy()
    if add_bos and bos_id is not None:
        out[:, 0] = bos_id
    return out


def final_hidden(model: Model, chunks: np.ndarray, first: int, options: PerplexityOptions,
                 progress: ProgressFn) -> np.ndarray:
    """Run all chunks layer by layer; return final-normed hidden states of the scored positions
    [n_chunks * (ctx - 1 - first), n_embd]."""
    n, ctx = chunks.shape
    shape = (n, ctx, model.config.n_embd)
    if options.hidden_path is not None:
        hidden = np.lib.format.open_memmap(options.hidden_path, mode="w+", dtype=np.float32, shape=shape)
    else:
        hidden = np.empty(shape, np.float32)
    model.embed(chunks, out=hidden)
    run_layers(model, hidden, progress=progress)
    scored = np.ascontiguousarray(hidden[:, first:ctx - 1]).reshape(-1, model.config.n_embd)
    del hidden
    if options.hidden_path is not None:
        os.unlink(options.hidden_path)
    return model.head_input(scored)


class _HeadStats:
    """Per-position online log-sum-exp, target logit and argmax over vocabulary slices."""

    def __init__(self, n: int) -> None:
        self.m = np.full(n, -np.inf)  # running max logit (float64)
        self.s = np.zeros(n)  # sum exp(z - m)
        self.target = np.zeros(n)
        self.argmax = np.zeros(n, np.int64)

    def update(self, p0: int, z: np.ndarray, v0: int,
               targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fold logits z [b, V_s] (vocab rows v0..) of positions p0..p0+b-1 into the running
        stats. Overwrites z with exp(z - m_new) and returns it with m_old - m_new."""
        sl = slice(p0, p0 + z.shape[0])
        t = targets[sl] - v0
        rows = np.nonzero((t >= 0) & (t < z.shape[1]))[0]
        self.target[p0 + rows] = z[rows, t[rows]]
        zarg = z.argmax(axis=1)
        zmax = z[np.arange(z.shape[0]), zarg]
        better = np.nonzero(zmax > self.m[sl])[0]  # strictly greater: the first maximum wins, as llama
        self.argmax[p0 + better] = v0 + zarg[better]
        m_old = self.m[sl].copy()
        m_new = np.maximum(m_old, zmax)
        z -= m_new.astype(np.float32)[:, None]
        np.exp(z, out=z)
        shift = m_old - m_new
        self.s[sl] = self.s[sl] * np.exp(shift) + z.sum(axis=1)
        self.m[sl] = m_new
        return z, shift

    def nll(self) -> np.ndarray:
        return self.m + np.log(self.s) - self.target


def head_pass(model: Model, hidden: np.ndarray, targets: np.ndarray, options: PerplexityOptions,
              progress: ProgressFn, base: Model | None = None, base_hidden: np.ndarray | None = None
              ) -> tuple[_HeadStats, _HeadStats | None, np.ndarray | None]:
    """Stream the output projection over vocabulary slices for all scored positions: hidden
    [n, n_embd] (from head_input), targets [n]. With a base model also the KL sums."""
    n = hidden.shape[0]
    stats = _HeadStats(n)
    bstats = _HeadStats(n) if base is not None else None
    kl_t = np.zeros(n) if base is not None else None  # sum_i exp(a_i - m_a) * (a_i - b_i)
    slices = list(model.vocab_slices(options.vocab_slice))
    # one buffer per model for the dequantized rows of each slice (fresh memory costs page faults)
    n_embd = hidden.shape[1]
    buf = np.empty(options.vocab_slice * n_embd, np.float32)
    bbuf = np.empty(options.vocab_slice * n_embd, np.float32) if base is not None else None
    for k, (v0, v1) in enumerate(slices):
        rows = model.output_rows(v0, v1, buf)
        brows = base.output_rows(v0, v1, bbuf) if base is not None else None
        for p0 in range(0, n, options.position_block):
            p1 = min(n, p0 + options.position_block)
            z = model.logits(hidden[p0:p1], rows)  # [b, V_s]
            if base is None:
                stats.update(p0, z, v0, targets)
                continue
            a = base.logits(base_hidden[p0:p1], brows)
            diff = a - z
            stats.update(p0, z, v0, targets)
            ea, shift = bstats.update(p0, a, v0, targets)  # exp(a - m_new)
            kl_t[p0:p1] = kl_t[p0:p1] * np.exp(shift) + np.einsum("ij,ij->i", ea, diff)
        progress(Progress("head", k + 1, len(slices), f"vocab {v0}..{v1}"))
    return stats, bstats, kl_t


def perplexity(model: Model, tokens: np.ndarray | list[int],
               options: PerplexityOptions = PerplexityOptions(), base: Model | None = None,
               progress: ProgressFn | None = None) -> PerplexityResult:
    """llama-perplexity over token ids (BOS included at the start, as tokenized)."""
    report = progress_or_noop(progress)
    t0 = time.perf_counter()
    cfg = model.config
    if base is not None and base.config.n_vocab != cfg.n_vocab:
        raise InputError(f"the base model's vocabulary has {base.config.n_vocab} tokens, "
                         f"the model's {cfg.n_vocab}; KL divergence needs the same vocabulary")
    chunks = chunk_tokens(tokens, options.ctx, options.chunks, cfg.bos_id, cfg.add_bos)
    n_chunks, ctx = chunks.shape
    first = ctx // 2
    per_chunk = ctx - 1 - first
    targets = chunks[:, first + 1:].reshape(-1)
    hidden = final_hidden(model, chunks, first, options, report)
    base_hidden = None
    if base is not None:
        base_hidden = final_hidden(base, chunks, first, options, report)
    stats, bstats, kl_t = head_pass(model, hidden, targets, options, report, base, base_hidden)

    nll = stats.nll()
    chunk_nll = nll.reshape(n_chunks, per_chunk).sum(axis=1)
    counts = per_chunk * np.arange(1, n_chunks + 1)
    running = np.exp(np.cumsum(chunk_nll) / counts)
    mean = nll.mean()
    var = (nll * nll).mean() - mean * mean
    err = math.sqrt(var / (len(nll) - 1)) * math.exp(mean) if var > 0 else 0.0
    kw: dict[str, Any] = {}
    if base is not None:
        lse_a = bstats.m + np.log(bstats.s)
        lse_b = stats.m + np.log(stats.s)
        kld = kl_t / bstats.s - lse_a + lse_b
        kw = dict(kld_mean=float(kld.mean()), kld_p99=float(np.percentile(kld, 99)),
                  top1_agreement=float(np.mean(stats.argmax == bstats.argmax)),
                  base_perplexity=float(np.exp(bstats.nll().mean())))
    return PerplexityResult(
        perplexity=float(np.exp(mean)), perplexity_error=err, tokens=len(nll), chunks=n_chunks, ctx=ctx,
        running=tuple(float(r) for r in running),
        chunk_perplexity=tuple(float(p) for p in np.exp(chunk_nll / per_chunk)),
        seconds=time.perf_counter() - t0, **kw)


def evaluate(model: Any, text: str, options: PerplexityOptions = PerplexityOptions(),
             base: Any = None, progress: ProgressFn | None = None) -> PerplexityResult:
    """Perplexity (and KLD against `base`) of a model on a text. `model` and `base` are paths or
    open model readers; the text is tokenized with the model's vocabulary, as llama-perplexity.
    With `options.simulate` the model (not the base) runs its block linears as W8A8."""
    from quantcli.formats import open_model

    with ExitStack() as stack:
        def reader(x: Any) -> Any:
            return stack.enter_context(open_model(x)) if isinstance(x, (str, Path)) else x

        r = reader(model)
        m = Model(r, kv_f16=options.kv_f16, act_quant=options.act_quant, simulate=options.simulate)
        b = None
        if base is not None:
            b = Model(reader(base), kv_f16=options.kv_f16, act_quant=options.act_quant)
        tokens = Tokenizer.from_model(r).encode(text, add_special=True, parse_special=False)
        return perplexity(m, tokens, options, base=b, progress=progress)
