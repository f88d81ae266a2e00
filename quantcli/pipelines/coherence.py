"""Does a quantized model still talk? Its continuations of a suite of prompts against its base's.

Per prompt (the shipped suite, `quantcli/data/coherence-prompts.txt`, or `--prompts FILE`), both
models continue it greedily for up to `continuation` tokens (stopping at an end-of-generation
token), decoded in one batch per model (`engine.generate`). Then:

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
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from quantcli.errors import InputError
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
    tokens_per_second: float  # the model's decoding, batched over the prompts
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
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such prompts file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
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
    """float32 in place (the rows are 262144 wide for Gemma; float64 would double the check's time)."""
    z = np.asarray(z, np.float32)
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
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

    from quantcli.engine.generate import GenerateOptions, Generator
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
        opts = GenerateOptions(max_tokens=continuation, stop=tok.eog_ids())
        bgen = Generator(bm, n_ctx)
        report(Progress("coherence", 1, 4, "base continues"))
        # the base's distributions as it continues: what the model is compared with (float16)
        blogp: list[list[np.ndarray]] = [[] for _ in ids]
        bouts = bgen.generate_batch(ids, opts, on_logits=lambda b, z: blogp[b].append(
            _log_softmax(z.copy()).astype(np.float16)))
        mgen = Generator(mm, n_ctx) if mm is not bm else bgen
        report(Progress("coherence", 2, 4, "model continues"))
        mouts = mgen.generate_batch(ids, opts) if mgen is not bgen else bouts
        decode_s = mouts[0].decode_seconds  # the batch's, the same for every prompt
        n_decoded = sum(len(o.tokens) for o in mouts)
        report(Progress("coherence", 3, 4, "teacher-forced"))
        results = []
        for p, pid, bo, mo, lb in zip(prompts, ids, bouts, mouts, blogp):
            kld, top1, own_nll = _agreement(np.array(lb, np.float32), mgen, pid, bo, same=mgen is bgen)
            base_nll = _nll(bgen, pid, mo, bo, own_nll)
            ref = {"repeat4": repeat4(bo.tokens), "run": longest_run(bo.tokens), "distinct2": distinct2(bo.tokens),
                   "base_nll": own_nll, "entropy": entropy_bits(bo.tokens)}
            r = PromptResult(p, tok.detokenize(bo.tokens), tok.detokenize(mo.tokens), kld, top1,
                             repeat4(mo.tokens), longest_run(mo.tokens), distinct2(mo.tokens), base_nll,
                             entropy_bits(mo.tokens), (), ref)
            results.append(replace(r, failed=judge(r, thresholds)))
        report(Progress("coherence", 4, 4, "done"))
    return CoherenceReport(str(getattr(model, "path", model)), str(getattr(base, "path", base)), results,
                           thresholds, continuation,
                           time.perf_counter() - t0, n_decoded / decode_s if decode_s else 0.0)


def _teacher(gen: Any, prompt: list[int], cont: list[int]) -> np.ndarray:
    """Log-probabilities [len(cont), V] of each continuation token's position, given what precedes."""
    z = gen.feed(gen.new_caches(), prompt + cont[:-1] if cont else prompt, all_logits=True)
    return _log_softmax(z[len(prompt) - 1:])


def _agreement(lb: np.ndarray, mgen: Any, prompt: list[int], bout: Any, same: bool) -> tuple[float, float, float]:
    """(mean KL, top-1 agreement, the base's NLL of its own continuation) on the base's continuation;
    lb: the base's log-probabilities at each of its steps (row i predicts token i)."""
    cont = bout.tokens or [0]  # none: only the distribution after the prompt (the 0 is not fed)
    lb = lb[: len(cont)]
    lm = lb if same else _teacher(mgen, prompt, cont)
    kl = float(np.mean(np.einsum("ij,ij->i", np.exp(lb), lb - lm, dtype=np.float64)))
    top1 = float(np.mean(lm.argmax(axis=1) == lb.argmax(axis=1)))
    own = float(-np.mean(lb[np.arange(len(bout.tokens)), bout.tokens])) if bout.tokens else 0.0
    return max(kl, 0.0), top1, own


def _nll(bgen: Any, prompt: list[int], mout: Any, bout: Any, own: float) -> float:
    if not mout.tokens:
        return 0.0
    if mout.tokens == bout.tokens:  # the base's own text: its NLL is known
        return own
    lb = _teacher(bgen, prompt, mout.tokens)
    return float(-np.mean(lb[np.arange(len(mout.tokens)), mout.tokens]))
