"""A base model's next-token distributions on an evaluation text, computed once and kept.

llama-perplexity's `--kl-divergence-base FILE` keeps the base's logits so that each quantization of
it is compared without running the base again; this is the same idea for `verify --base`. The
scored positions are llama-perplexity's (each chunk's second half). Kept per position:

- the log-probabilities, rounded to float16 ([n, V], memory-mapped; 2 bytes per vocabulary entry
  per position: Gemma 3 270M, 16 chunks of 512 -> 2.1 GB; a 32k vocabulary -> 0.27 GB);
- S = sum exp(logp16) and E = sum exp(logp16) * logp16 (so the distribution the KL is taken
  against is exactly the rounded one, renormalised: p_i = exp(logp16_i) / S);
- the base's exact NLL of each target (its perplexity) and its argmax (top-1 agreement).

KL(base || model) per position is then E/S - log S - (sum exp(logp16) * z)/S + logsumexp(z), with z the
model's logits, accumulated slice by slice as the model's head streams: the base costs nothing.
Rounding the base's log-probabilities to float16 moves a KL by ~1e-5 nats (tests compare with
the exact figure of `engine.perplexity`).

Building one costs the base's layers once and its head twice (the first pass finds each position's
normaliser, the second writes the normalised values). A cache is a folder holding `logp.npy`,
`stats.npz` and `meta.json`, made under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantcli.engine.model import Model
from quantcli.engine.perplexity import PerplexityOptions, _HeadStats, final_hidden
from quantcli.errors import InputError, OutputError
from quantcli.progress import Progress, ProgressFn, progress_or_noop

FORMAT = 1


@dataclass(frozen=True)
class BaseLogits:
    path: Path
    logp: np.ndarray  # [n, V] float16, memory-mapped
    s: np.ndarray  # [n] float64
    e: np.ndarray  # [n] float64
    nll: np.ndarray  # [n] the base's exact NLL of each target
    argmax: np.ndarray  # [n]
    meta: dict[str, Any]

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.mean()))


def load(path: Path, meta: dict[str, Any]) -> BaseLogits | None:
    """The cache at `path` when it holds these `meta` (else None: build it)."""
    try:
        have = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if have != {**meta, "format": FORMAT}:
            return None
        st = np.load(path / "stats.npz")
        logp = np.load(path / "logp.npy", mmap_mode="r")
    except (OSError, ValueError, KeyError):
        return None
    if logp.shape[0] != st["s"].shape[0]:
        return None
    return BaseLogits(path, logp, st["s"], st["e"], st["nll"], st["argmax"], have)


def build(base: Model, chunks: np.ndarray, path: Path, meta: dict[str, Any],
          options: PerplexityOptions = PerplexityOptions(), progress: ProgressFn | None = None) -> BaseLogits:
    """Run the base on `chunks` [n_chunks, ctx] and keep its distributions at `path`."""
    report = progress_or_noop(progress)
    n_chunks, ctx = chunks.shape
    first = ctx // 2
    targets = chunks[:, first + 1:].reshape(-1)
    hidden = final_hidden(base, chunks, first, options, report)
    n, V = hidden.shape[0], base.config.n_vocab
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as exc:
        raise OutputError(f"{path.parent}: cannot create the base's logits cache: {exc.strerror}") from None
    try:
        slices = list(base.vocab_slices(options.vocab_slice))
        buf = np.empty(options.vocab_slice * hidden.shape[1], np.float32)
        stats = _HeadStats(n)
        for k, (v0, v1) in enumerate(slices):  # pass 1: each position's normaliser
            rows = base.output_rows(v0, v1, buf)
            for p0 in range(0, n, options.position_block):
                stats.update(p0, base.logits(hidden[p0:p0 + options.position_block], rows), v0, targets)
            report(Progress("base logits", k + 1, 2 * len(slices), f"vocab {v0}..{v1}"))
        lse = stats.m + np.log(stats.s)
        logp = np.lib.format.open_memmap(tmp / "logp.npy", mode="w+", dtype=np.float16, shape=(n, V))
        s, e = np.zeros(n), np.zeros(n)
        for k, (v0, v1) in enumerate(slices):  # pass 2: the normalised values, rounded
            rows = base.output_rows(v0, v1, buf)
            for p0 in range(0, n, options.position_block):
                p1 = min(n, p0 + options.position_block)
                z = base.logits(hidden[p0:p1], rows)
                z -= lse[p0:p1, None].astype(np.float32)
                lp = z.astype(np.float16)
                logp[p0:p1, v0:v1] = lp
                ex = np.exp(lp.astype(np.float32))
                s[p0:p1] += ex.sum(axis=1, dtype=np.float64)
                e[p0:p1] += np.einsum("ij,ij->i", ex, lp.astype(np.float32), dtype=np.float64)
            report(Progress("base logits", len(slices) + k + 1, 2 * len(slices), f"vocab {v0}..{v1}"))
        logp.flush()
        del logp
        np.savez(tmp / "stats.npz", s=s, e=e, nll=stats.nll(), argmax=stats.argmax)
        (tmp / "meta.json").write_text(json.dumps({**meta, "format": FORMAT}, sort_keys=True), encoding="utf-8")
        if path.exists():  # another run made it meanwhile, or a stale one: ours replaces it
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{path}: cannot write the base's logits cache: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    got = load(path, meta)
    if got is None:
        raise InputError(f"{path}: the base's logits cache just written does not read back")
    return got


@dataclass(frozen=True)
class Comparison:
    perplexity: float
    perplexity_error: float
    base_perplexity: float
    kld_mean: float
    kld_p99: float
    top1_agreement: float
    tokens: int


def compare(model: Model, chunks: np.ndarray, base: BaseLogits,
            options: PerplexityOptions = PerplexityOptions(), progress: ProgressFn | None = None) -> Comparison:
    """The model's perplexity on `chunks` and its KL divergence / top-1 agreement against `base`."""
    report = progress_or_noop(progress)
    n_chunks, ctx = chunks.shape
    first = ctx // 2
    targets = chunks[:, first + 1:].reshape(-1)
    if model.config.n_vocab != base.logp.shape[1]:
        raise InputError(f"the base's vocabulary has {base.logp.shape[1]} tokens, the model's "
                         f"{model.config.n_vocab}; KL divergence needs the same vocabulary")
    hidden = final_hidden(model, chunks, first, options, report)
    n = hidden.shape[0]
    if n != base.logp.shape[0]:
        raise InputError(f"{base.path}: the cache holds {base.logp.shape[0]} positions, the text gives {n}")
    stats = _HeadStats(n)
    ez = np.zeros(n)
    slices = list(model.vocab_slices(options.vocab_slice))
    buf = np.empty(options.vocab_slice * hidden.shape[1], np.float32)
    for k, (v0, v1) in enumerate(slices):
        rows = model.output_rows(v0, v1, buf)
        for p0 in range(0, n, options.position_block):
            p1 = min(n, p0 + options.position_block)
            z = model.logits(hidden[p0:p1], rows)
            ex = np.exp(np.asarray(base.logp[p0:p1, v0:v1], np.float32))
            ez[p0:p1] += np.einsum("ij,ij->i", ex, z, dtype=np.float64)
            stats.update(p0, z, v0, targets)  # overwrites z
        report(Progress("head", k + 1, len(slices), f"vocab {v0}..{v1}"))
    lse = stats.m + np.log(stats.s)
    kld = np.maximum(base.e / base.s - np.log(base.s) - ez / base.s + lse, 0.0)
    nll = stats.nll()
    mean = nll.mean()
    var = (nll * nll).mean() - mean * mean
    err = float(np.sqrt(var / (len(nll) - 1)) * np.exp(mean)) if var > 0 else 0.0
    return Comparison(float(np.exp(mean)), err, base.perplexity, float(kld.mean()), float(np.percentile(kld, 99)),
                      float(np.mean(stats.argmax == base.argmax)), n)
