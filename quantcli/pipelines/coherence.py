"""Does a quantized model still talk? Its continuations of a suite of prompts against its base's.

Per prompt (the shipped suite, `quantcli/data/coherence-prompts.txt`, or `--prompts FILE`), both
models continue it greedily for up to `continuation` tokens (stopping at an end-of-generation
token), all prompts decoded together, one batched step per model per token (`_continue`). Then:

- **agreement** on the base's own continuation, teacher-forced: the mean KL(base || model) of the
  next-token distributions and the share of positions where the model's top token is the base's;
- **degeneration** of the model's continuation: the share of its 4-grams that repeat an earlier
  one, its longest run of one token, distinct-2 (distinct bigrams / bigrams);
- **sense**, judged by the base: its mean NLL of the model's continuation, with an entropy floor —
  the continuation's own token entropy (bits) must reach `entropy`, so that a loop, which the
  base finds easy to predict, does not score well.

A prompt is coherent when every threshold holds (`Thresholds`, calibrated in README "Coherence").
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from quantcli.errors import InputError
from quantcli.inputs import read_small_text
from quantcli.progress import Progress, ProgressFn, progress_or_noop

SCHEMA = "quantcli.coherence/1"
PROMPTS = Path(__file__).resolve().parents[1] / "data" / "coherence-prompts.txt"
CONTINUATION = 24  # tokens generated per prompt
SEPARATOR = "---"


@dataclass(frozen=True)
class Thresholds:
    """Agreement is absolute; degeneration and sense are against the base's own continuation of
    the same prompt (a small base model loops on some prompts too: that is not the model's fault)."""

    kld: float = 0.5  # mean KL(base || model) on the base's continuation, nats, at most
    top1: float = 0.6  # top-1 agreement there, at least
    repeat4: float = 0.25  # share of repeated 4-grams, at most the base's + this
    run: int = 4  # longest run of one token, at most the base's + this
    distinct2: float = 0.25  # distinct bigrams / bigrams, at least the base's - this
    base_nll: float = 2.0  # the base's mean NLL of the model's continuation, at most its own text's + this
    entropy: float = 1.0  # the continuation's token entropy, bits, at least the base's - this (the floor)


@dataclass(frozen=True)
class PromptResult:
    prompt: str
    base_text: str
    text: str  # the model's continuation
    kld: float
    top1: float
    repeat4: float
    run: int
    distinct2: float
    base_nll: float
    entropy: float
    failed: tuple[str, ...]  # the thresholds it misses
    base: dict[str, float] = field(default_factory=dict)  # the base continuation's repeat4, run, ... (the reference)

    @property
    def coherent(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class CoherenceReport:
    model: str
    base: str
    results: list[PromptResult]
    thresholds: Thresholds
    continuation: int
    seconds: float
    tokens_per_second: float  # positions decoded per second after the prompts: both models, every stream, batched
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def coherent(self) -> float:
        return sum(r.coherent for r in self.results) / max(len(self.results), 1)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "model": self.model, "base": self.base, "prompts": len(self.results),
                "coherent": round(self.coherent, 4), "thresholds": asdict(self.thresholds),
                "continuation": self.continuation, "seconds": round(self.seconds, 2),
                "tokens_per_second": round(self.tokens_per_second, 1),
                "results": [{**{k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(r).items()},
                             "failed": list(r.failed), "coherent": r.coherent} for r in self.results]}


def load_prompts(path: Path | None = None) -> list[str]:
    """The prompts of a suite file (the shipped one without a path); errors name the file."""
    path = Path(path) if path is not None else PROMPTS
    text = read_small_text(path, "prompts")
    parts, cur, started = [], [], False
    for line in text.splitlines():
        if line.strip() == SEPARATOR:
            if started and "\n".join(cur).strip():
                parts.append("\n".join(cur).rstrip("\n"))
            cur, started = [], True
        elif started or not line.startswith("#"):
            started = True
            cur.append(line)
    if "\n".join(cur).strip():
        parts.append("\n".join(cur).rstrip("\n"))
    if not parts:
        raise InputError(f"{path}: no prompts (separate prompts with lines of '{SEPARATOR}')")
    return parts


# -- the metrics -----------------------------------------------------------------------------------


def repeat4(tokens: list[int]) -> float:
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def longest_run(tokens: list[int]) -> int:
    best = run = 0
    for i, t in enumerate(tokens):
        run = run + 1 if i and t == tokens[i - 1] else 1
        best = max(best, run)
    return best


def distinct2(tokens: list[int]) -> float:
    grams = list(zip(tokens, tokens[1:]))
    return len(set(grams)) / len(grams) if grams else 1.0


def entropy_bits(tokens: list[int]) -> float:
    if not tokens:
        return 0.0
    n = len(tokens)
    return -sum(c / n * math.log2(c / n) for c in Counter(tokens).values())


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """float32, in place, one scratch array (the rows are 262144 wide for Gemma: float64 would
    double the check's time, and numpy's pairwise sums keep float32 accurate to ~1e-6 here)."""
    z = np.asarray(z, np.float32)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    z -= np.log(e.sum(axis=-1, keepdims=True))
    return z


def judge(r: PromptResult, t: Thresholds) -> tuple[str, ...]:
    b = r.base
    checks = (("kld", r.kld <= t.kld), ("top1", r.top1 >= t.top1),
              ("repeat4", r.repeat4 <= b["repeat4"] + t.repeat4), ("run", r.run <= b["run"] + t.run),
              ("distinct2", r.distinct2 >= b["distinct2"] - t.distinct2),
              ("base_nll", r.base_nll <= b["base_nll"] + t.base_nll),
              ("entropy", r.entropy >= b["entropy"] - t.entropy))
    return tuple(name for name, ok in checks if not ok)


# -- the check -------------------------------------------------------------------------------------


def check(model: Any, base: Any, prompts: list[str] | None = None, *, continuation: int = CONTINUATION,
          thresholds: Thresholds = Thresholds(), progress: ProgressFn | None = None,
          source: str = "prompts") -> CoherenceReport:
    """The coherence of `model` against `base` (paths or open readers) on `prompts`."""
    from contextlib import ExitStack

    from quantcli.engine.generate import Generator
    from quantcli.engine.model import Model
    from quantcli.engine.tokenizer import Tokenizer
    from quantcli.formats import open_model

    report = progress_or_noop(progress)
    t0 = time.perf_counter()
    prompts = load_prompts() if prompts is None else prompts
    with ExitStack() as stack:
        def reader(x: Any) -> Any:
            return stack.enter_context(open_model(x)) if isinstance(x, (str, Path)) else x

        mr, br = reader(model), reader(base)
        tok = Tokenizer.from_model(br)
        ids = [tok.encode(p) for p in prompts]
        bm = Model(br)
        mm = Model(mr) if mr is not br else bm
        mcfg, bcfg = mm.config, bm.config
        if mcfg.n_vocab != bcfg.n_vocab:
            raise InputError(f"the base's vocabulary has {bcfg.n_vocab} tokens, the model's {mcfg.n_vocab}")
        n_ctx = 2048
        longest = max(len(i) for i in ids)
        if longest + continuation + 1 > n_ctx:
            k = max(range(len(ids)), key=lambda i: len(ids[i]))
            raise InputError(f"{source}: prompt {k + 1} has {longest} tokens; with a continuation of "
                             f"{continuation} it does not fit the check's context of {n_ctx}")
        bgen = Generator(bm, n_ctx)
        mgen = Generator(mm, n_ctx) if mm is not bm else bgen
        report(Progress("coherence", 1, 2, f"both models continue {len(ids)} prompts"))
        tracks, decode_s, rows = _continue(bgen, mgen, ids, continuation, tok.eog_ids())
        results = []
        for p, t in zip(prompts, tracks):
            n_b = max(len(t.base), 1)
            own = t.own_nll / len(t.base) if t.base else 0.0
            ref = {"repeat4": repeat4(t.base), "run": longest_run(t.base), "distinct2": distinct2(t.base),
                   "base_nll": own, "entropy": entropy_bits(t.base)}
            r = PromptResult(p, tok.detokenize(t.base), tok.detokenize(t.model), max(t.kl / n_b, 0.0), t.top1 / n_b,
                             repeat4(t.model), longest_run(t.model), distinct2(t.model),
                             t.model_nll / len(t.model) if t.model else 0.0, entropy_bits(t.model), (), ref)
            results.append(replace(r, failed=judge(r, thresholds)))
        report(Progress("coherence", 2, 2, "done"))
    return CoherenceReport(str(getattr(model, "path", model)), str(getattr(base, "path", base)), results,
                           thresholds, continuation,
                           time.perf_counter() - t0, rows / decode_s if decode_s else 0.0)


@dataclass
class _Track:
    """One prompt's two continuations and the sums of its metrics, built step by step."""

    base: list[int] = field(default_factory=list)  # the base's greedy continuation
    model: list[int] = field(default_factory=list)  # the model's
    base_done: bool = False
    model_done: bool = False
    forked: bool = False  # the continuations differ (or one has ended): four streams from here
    kl: float = 0.0  # sum over the base's positions of KL(base || model), the model teacher-forced
    top1: float = 0.0  # positions there where the model's top token is the base's
    own_nll: float = 0.0  # the base's NLL of its own tokens
    model_nll: float = 0.0  # the base's NLL of the model's tokens
    caches: dict[str, Any] = field(default_factory=dict)  # stream -> its per-layer caches


def _rows(z: np.ndarray, need: list[bool] | None = None) -> list[tuple[np.ndarray | None, int]]:
    """Logits [n, V] -> per row (its log-probabilities, or None where `need` says they are not
    needed, and its first maximum). The log-softmax runs on row blocks in threads: numpy's ufuncs
    release the GIL, and at 262144 columns it is a fifth of the check."""
    from concurrent.futures import ThreadPoolExecutor

    top = z.argmax(axis=1)
    idx = np.flatnonzero(need) if need is not None else np.arange(z.shape[0])
    lp = z[idx] if len(idx) < z.shape[0] else z
    workers = min(os.cpu_count() or 1, max(len(idx), 1))
    blocks = np.array_split(np.arange(len(idx)), workers)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda r: _log_softmax(lp[r[0]:r[-1] + 1]) if len(r) else None, blocks))
    rows: list[np.ndarray | None] = [None] * z.shape[0]
    for j, i in enumerate(idx):
        rows[i] = lp[j]
    return list(zip(rows, (int(i) for i in top)))


def _continue(bgen: Any, mgen: Any, ids: list[list[int]], continuation: int,
              stop: frozenset[int]) -> tuple[list[_Track], float, int]:
    """Both models continue every prompt greedily, in lockstep, one batched step per model per
    token. While the two continuations agree they share one stream per model; when they part, each
    prompt forks into four: the base on its own text and the model teacher-forced on it (KL, top-1),
    the model on its own text and the base teacher-forced on it (the base's NLL of it). Every
    position's distributions are compared as they come, so nothing is kept and no text is fed
    twice. Returns the tracks, the decoding seconds and the rows decoded (both models)."""
    same = mgen is bgen
    tracks = [_Track() for _ in ids]
    bc, zb = bgen.prefill(ids)
    mc, zm = (bc, zb) if same else mgen.prefill(ids)
    for t, b_caches, m_caches in zip(tracks, bc, mc):
        t.caches = {"base": b_caches, "model": m_caches}
    # each live stream's log-probabilities for its next position, and its greedy token (the first
    # maximum of the logits themselves: rounding in the log-softmax must not break a tie)
    logits: dict[tuple[int, str], tuple[np.ndarray, int]] = {}
    for b, (lb, tb) in enumerate(_rows(zb)):
        logits[b, "base"] = logits[b, "model"] = (lb, tb)
    if not same:
        for b, row in enumerate(_rows(zm)):
            logits[b, "model"] = row
    room = bgen.n_ctx
    t0 = time.perf_counter()
    rows = 0
    while True:
        feed_b: list[tuple[int, str, int]] = []  # (prompt, stream, token) of the base's next step
        feed_m: list[tuple[int, str, int]] = []
        for b, t in enumerate(tracks):
            if t.base_done and t.model_done:
                continue
            lb, tb = logits[b, "base"] if not t.base_done else (None, None)
            if not t.forked:  # one prefix: the model's distribution there serves both comparisons
                (lm, mtop), lbm = logits[b, "model"], lb
                tm = mtop
            else:
                lm, mtop = logits[b, "model@base"] if not t.base_done else (None, None)
                lbm, _ = logits[b, "base@model"] if not t.model_done else (None, None)
                _, tm = logits[b, "model"] if not t.model_done else (None, None)
            if tb is not None:  # a position of the base's continuation
                if tb in stop and t.base:
                    t.base_done = True
                else:
                    t.kl += float(np.dot(np.exp(lb), lb - lm))
                    t.top1 += float(mtop == tb)
                    if tb in stop:  # it ends at once: the one position after the prompt is compared
                        t.base_done = True
                    else:
                        t.own_nll -= float(lb[tb])
                        t.base.append(tb)
                        t.base_done = len(t.base) >= continuation or len(ids[b]) + len(t.base) >= room
            if tm is not None:  # a position of the model's continuation
                if tm in stop:
                    t.model_done = True
                else:
                    t.model_nll -= float(lbm[tm])
                    t.model.append(tm)
                    t.model_done = len(t.model) >= continuation or len(ids[b]) + len(t.model) >= room
            if not t.forked and (t.base_done != t.model_done or (not t.base_done and tb != tm)):
                t.forked = True
                if not t.base_done:
                    t.caches["model@base"] = [c.copy() for c in t.caches["model"]]
                if not t.model_done:
                    t.caches["base@model"] = [c.copy() for c in t.caches["base"]]
            if not t.base_done:
                feed_b.append((b, "base", tb))
                if t.forked or not same:
                    feed_m.append((b, "model@base" if t.forked else "model", tb))
            if t.forked and not t.model_done:
                feed_b.append((b, "base@model", tm))
                feed_m.append((b, "model", tm))
        if not feed_b and not feed_m:
            break
        logits = {}
        for gen, feed in ((bgen, feed_b), (mgen, feed_m)):
            if feed:
                z = gen.step([tracks[b].caches[s] for b, s, _ in feed], [tok for _, _, tok in feed])
                # the model on its own text, once forked, needs only its greedy token
                need = [not (s == "model" and tracks[b].forked) for b, s, _ in feed]
                logits.update({(b, s): row for (b, s, _), row in zip(feed, _rows(z, need))})
                rows += len(feed)
        if same:
            for b, t in enumerate(tracks):
                if (b, "base") in logits:
                    logits[b, "model"] = logits[b, "base"]
    return tracks, time.perf_counter() - t0, rows
