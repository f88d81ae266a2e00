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
from dataclasses import dataclass
from typing import Callable

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

    @property
    def tokens_per_second(self) -> float:
        """Decoded tokens per second (after the prompt)."""
        n = len(self.tokens) + int(self.stopped) - 1  # the first token comes from the prefill
        return n / self.decode_seconds if self.decode_seconds > 0 and n > 0 else 0.0


class Generator:
    """A model held whole for decoding (see the module's docstring). Several prompts decode
    together: each has its own caches, and each step's linears run on one row per prompt."""

    def __init__(self, model: Model, n_ctx: int = 4096) -> None:
        self.model = model
        cfg = model.config
        self.n_ctx = n_ctx
        self.weights = [model.layer_weights(il) for il in range(cfg.n_layer)]
        self.rows = np.ascontiguousarray(model.output_rows(0, cfg.n_vocab))
        self._rope = LayerCache(1, 1, 1, 1)  # the rope tables every cache shares

    def new_caches(self) -> list[LayerCache]:
        cfg = self.model.config
        caches = [LayerCache(cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v) for _ in range(cfg.n_layer)]
        for c in caches:
            c.share_rope(self._rope)
        return caches

    def feed(self, caches: list[LayerCache], tokens: list[int], all_logits: bool = False) -> np.ndarray:
        """Run these tokens of one sequence after what its caches hold: the logits of the last one
        [n_vocab] (with all_logits, of every one [T, n_vocab])."""
        if not tokens:
            raise UsageError("nothing to decode: no tokens")
        if caches[0].n + len(tokens) > self.n_ctx:
            raise UsageError(f"the context holds {self.n_ctx} tokens; {caches[0].n} + {len(tokens)} do not fit")
        x = self.hidden(caches, tokens)
        z = self.head(x if all_logits else x[-1:])
        return z if all_logits else z[0]

    def hidden(self, caches: list[LayerCache], tokens: list[int]) -> np.ndarray:
        """feed without the output head: the last layer's output [T, n_embd] (`head` makes it logits;
        several sequences' rows share one head matmul that way)."""
        m = self.model
        x = m.embed(np.asarray(tokens, np.int64))
        for il, w in enumerate(self.weights):
            x = m.layer(il, w, x, cache=caches[il])
        return x

    def head(self, x: np.ndarray) -> np.ndarray:
        """Last-layer rows [n, n_embd] -> logits [n, n_vocab]."""
        return self.model.logits(self.model.head_input(x), self.rows)

    def step(self, caches: list[list[LayerCache]], tokens: list[int]) -> np.ndarray:
        """One token for each of several sequences: logits [B, n_vocab]."""
        m = self.model
        x = m.embed(np.asarray(tokens, np.int64))
        for il, w in enumerate(self.weights):
            x = m.layer(il, w, x, cache=[c[il] for c in caches])
        return self.head(x)

    def prefill(self, prompts: list[list[int]]) -> tuple[list[list[LayerCache]], np.ndarray]:
        """New caches holding each prompt, and the logits after each [B, n_vocab] (one head matmul)."""
        if not prompts or any(not p for p in prompts):
            raise UsageError("the prompt is empty")
        if max(len(p) for p in prompts) > self.n_ctx:
            raise UsageError(f"the context holds {self.n_ctx} tokens; a prompt of {max(len(p) for p in prompts)} does not fit")
        caches = [self.new_caches() for _ in prompts]
        x = self.hidden_batch(caches, prompts)
        return caches, self.head(x[np.cumsum([len(p) for p in prompts]) - 1])

    def hidden_batch(self, caches: list[list[LayerCache]], tokens: list[list[int]]) -> np.ndarray:
        """`hidden` for several sequences at once: sequence b's tokens after what caches[b] holds;
        their rows share each linear. The last layer's rows [sum of lengths, n_embd], in order."""
        if any(c[0].n + len(t) > self.n_ctx for c, t in zip(caches, tokens)):
            raise UsageError(f"the context holds {self.n_ctx} tokens; a sequence does not fit")
        counts = [len(t) for t in tokens]
        m = self.model
        x = m.embed(np.concatenate([np.asarray(t, np.int64) for t in tokens]))
        for il, w in enumerate(self.weights):
            x = m.layer(il, w, x, cache=[c[il] for c in caches], counts=counts)
        return x

    def generate(self, prompt: list[int], opts: GenerateOptions = GenerateOptions(),
                 on_logits: Callable[[np.ndarray], None] | None = None) -> Generation:
        """Greedy or sampled continuation of `prompt` (ids, BOS included as tokenized);
        `on_logits(logits)` sees every distribution a token is drawn from."""
        hook = None if on_logits is None else (lambda _b, z: on_logits(z))
        return self.generate_batch([prompt], opts, hook)[0]

    def generate_batch(self, prompts: list[list[int]], opts: GenerateOptions = GenerateOptions(),
                       on_logits: Callable[[int, np.ndarray], None] | None = None) -> list[Generation]:
        """Continuations of several prompts decoded together (the same tokens as one at a time,
        up to float rounding: a row's sums do not depend on the other rows). Sampling draws from
        one generator per prompt, seeded with opts.seed + its index. `on_logits(b, logits)` sees
        every distribution prompt b's next token is drawn from, in order."""
        opts.check()
        n = len(prompts)
        t0 = time.perf_counter()
        caches, logits = self.prefill(prompts)
        t1 = time.perf_counter()
        rngs = [np.random.default_rng(opts.seed + i) for i in range(n)]
        outs: list[list[int]] = [[] for _ in prompts]
        stopped = [False] * n
        active = list(range(n)) if opts.max_tokens > 0 else []
        while active:
            nxt = []
            for row, b in enumerate(active):
                if on_logits is not None:
                    on_logits(b, logits[row])
                tok = sample(logits[row], opts, rngs[b])
                if tok in opts.stop:
                    stopped[b] = True
                    continue
                outs[b].append(tok)
                if len(outs[b]) < opts.max_tokens and caches[b][0].n < self.n_ctx:
                    nxt.append(b)
            active = nxt
            if active:
                logits = self.step([caches[b] for b in active], [outs[b][-1] for b in active])
        t2 = time.perf_counter()
        return [Generation(list(p), outs[b], stopped[b], t1 - t0, t2 - t1) for b, p in enumerate(prompts)]


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
