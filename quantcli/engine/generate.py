"""Text generation: incremental decoding with a KV cache, greedy or seeded sampling.

The prompt goes through every layer at once (its keys and values cached per layer, rounded to
fp16 as llama.cpp's default cache keeps them), then each new token through every layer alone,
attending to the cache: a token costs one position's work, not the prefix's. Unlike calibration
(one layer at a time over many chunks) decoding needs every layer per token, so all the layers'
weights are held, dequantized to float32 (Gemma 3 270M: 1.1 GB), and the output rows too.

Sampling follows llama.cpp's common chain for the options it has: temperature 0 is greedy
(the first maximum); otherwise top-k, then top-p (the smallest set of the most likely tokens
whose mass reaches p, at least one), then temperature, then a draw from a seeded generator
(numpy's PCG64: seeded runs repeat, but are not llama.cpp's draws).

    gen = Generator(Model(reader))
    out = gen.generate(tokenizer.encode(prompt), GenerateOptions(max_tokens=64))
    out.tokens, tokenizer.detokenize(out.tokens), out.tokens_per_second
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from quantcli.engine.model import LayerCache, Model
from quantcli.errors import UsageError


@dataclass(frozen=True)
class GenerateOptions:
    max_tokens: int = 64  # new tokens at most
    temperature: float = 0.0  # 0: greedy
    top_k: int = 40  # 0: all
    top_p: float = 0.95  # 1: all
    seed: int = 0
    stop: frozenset[int] = frozenset()  # token ids that end the generation (not included); EOG by default

    def check(self) -> None:
        if self.max_tokens < 0:
            raise UsageError(f"max tokens must be 0 or more, got {self.max_tokens}")
        if self.temperature < 0:
            raise UsageError(f"temperature must be 0 or more, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise UsageError(f"top-k must be >= 0 and top-p in (0, 1]; got {self.top_k}, {self.top_p}")


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int]  # the new tokens (without the stop token)
    stopped: bool  # ended at a stop token (else at max_tokens or the context)
    prefill_seconds: float
    decode_seconds: float
    logits: list[np.ndarray] = field(default_factory=list, repr=False)  # with keep_logits: per new token

    @property
    def tokens_per_second(self) -> float:
        """Decoded tokens per second (after the prompt)."""
        n = len(self.tokens) + int(self.stopped) - 1  # the first token comes from the prefill
        return n / self.decode_seconds if self.decode_seconds > 0 and n > 0 else 0.0


class Generator:
    """A model held whole for decoding (see the module's docstring)."""

    def __init__(self, model: Model, n_ctx: int = 4096) -> None:
        self.model = model
        cfg = model.config
        self.n_ctx = n_ctx
        self.weights = [model.layer_weights(il) for il in range(cfg.n_layer)]
        self.rows = np.ascontiguousarray(model.output_rows(0, cfg.n_vocab))
        self.caches: list[LayerCache] = []
        self.reset()

    def reset(self) -> None:
        cfg = self.model.config
        self.caches = [LayerCache(cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v) for _ in range(cfg.n_layer)]

    @property
    def n_past(self) -> int:
        return self.caches[0].n if self.caches else 0

    def feed(self, tokens: list[int]) -> np.ndarray:
        """Run these tokens after what the cache holds; the logits of the last one [n_vocab]."""
        if not tokens:
            raise UsageError("nothing to decode: no tokens")
        if self.n_past + len(tokens) > self.n_ctx:
            raise UsageError(f"the context holds {self.n_ctx} tokens; {self.n_past} + {len(tokens)} do not fit")
        m = self.model
        x = m.embed(np.asarray(tokens, np.int64))
        for il, w in enumerate(self.weights):
            x = m.layer(il, w, x, cache=self.caches[il])
        h = m.head_input(x[-1:])
        return m.logits(h, self.rows)[0]

    def generate(self, prompt: list[int], opts: GenerateOptions = GenerateOptions(),
                 keep_logits: bool = False) -> Generation:
        """Greedy or sampled continuation of `prompt` (ids, BOS included as tokenized), from an
        empty cache."""
        opts.check()
        if not prompt:
            raise UsageError("the prompt is empty")
        self.reset()
        rng = np.random.default_rng(opts.seed)
        t0 = time.perf_counter()
        logits = self.feed(list(prompt))
        t1 = time.perf_counter()
        out: list[int] = []
        kept: list[np.ndarray] = []
        stopped = False
        while len(out) < opts.max_tokens:
            if keep_logits:
                kept.append(logits.copy())
            tok = sample(logits, opts, rng)
            if tok in opts.stop:
                stopped = True
                break
            out.append(tok)
            if len(out) == opts.max_tokens or self.n_past >= self.n_ctx:
                break
            logits = self.feed([tok])
        return Generation(list(prompt), out, stopped, t1 - t0, time.perf_counter() - t1, kept)


def sample(logits: np.ndarray, opts: GenerateOptions, rng: np.random.Generator) -> int:
    """The next token: argmax (first maximum) at temperature 0, else top-k -> top-p -> temperature
    -> a draw."""
    if opts.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64)
    order = np.argsort(-z, kind="stable")
    if opts.top_k:
        order = order[: opts.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if opts.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), opts.top_p) + 1)
        order = order[:keep]
    z = z[order] / opts.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(order[rng.choice(len(order), p=p)])
