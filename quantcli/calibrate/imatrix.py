"""Importance matrices as llama-imatrix computes them, gathered layer by layer through the engine.

llama.cpp's `tools/imatrix/imatrix.cpp` (`IMatrixCollector::collect_imatrix`): for every matrix
multiplication whose weight is named `blk.*` (and `output.weight` with `--process-output`; a
model whose output is tied to `token_embd.weight` has none), and whose input has >= 16 rows, add
the square of each input column over all rows to `in_sum2` and the number of rows to `counts`.
Every position of every chunk counts (the halves matter only to the perplexity it can print);
each chunk is `ctx` tokens with its first set to BOS. q, k and v read the same input and get the
same statistics. Files from `--in-file` are merged first: GGUF sums and counts added as they are,
legacy `.dat` values (`mean * ncall`) times `chunk_size`. `chunk_count` is max(counts) /
chunk_size.

Layer-sequential with checkpoints: after each layer has seen all chunks, its statistics and the
hidden states the next layer starts from are written atomically to a checkpoint store, so a
re-run after a crash or SIGKILL continues after the last finished layer and produces the same
bytes as an uninterrupted run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from quantcli.calibrate import imatrix_file as imf
from quantcli.calibrate import outliers
from quantcli.calibrate.runner import Observer, RunOptions, run_calibration
from quantcli.engine.model import Model
from quantcli.engine.perplexity import PerplexityOptions, head_pass
from quantcli.progress import Progress, ProgressFn, progress_or_noop
from quantcli.engine.tokenizer import Tokenizer
from quantcli.errors import InputError, UsageError

MIN_ROWS = 16  # collect_imatrix ignores matmuls with fewer input rows


@dataclass(frozen=True)
class ImatrixOptions:
    ctx: int = 512  # tokens per chunk (llama-imatrix -c)
    chunks: int | None = None  # at most this many chunks (--chunks); None: all
    skip_chunks: int = 0  # drop this many chunks from the start of the text (--chunk)
    process_output: bool = False  # also collect output.weight (--process-output)
    parse_special: bool = False  # tokenize special-token text as special tokens (--parse-special)
    compute_ppl: bool = False  # also compute the perplexity llama-imatrix prints (costs the head)
    dataset: str = ""  # name recorded in imatrix.datasets (llama records the -f path as given)
    in_files: tuple[Path, ...] = ()  # imatrix files to merge into the result (--in-file)
    checkpoint_dir: Path | None = None  # layer checkpoints here; resume from them when they match
    keep_checkpoints: bool = False  # leave the checkpoints after success (default: removed)
    hidden_path: Path | None = None  # scratch file to memory-map the hidden states (removed after)
    kv_f16: bool = True  # engine: fp16 KV cache like llama.cpp
    act_quant: bool = True  # engine: round matmul inputs like ggml-cpu (no effect on F32 weights)
    super_weights: bool = False  # also find and confirm super weights (calibrate/superweights.py)


@dataclass(frozen=True)
class ImatrixResult:
    imatrix: imf.Imatrix  # write with imf.save_gguf / imf.save_legacy
    chunks: int  # chunks processed in this run
    tokens: int  # chunks * ctx
    seconds: float
    resumed_layers: int  # layers taken from checkpoints
    perplexity: float | None = None  # with compute_ppl

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class Collector:
    """The hook: per weight name, float64 sums of squared inputs per column and a row count.

    Chunks are summed in blocks of REDUCTION_BLOCK, in order, and the blocks' sums added in order:
    the k-th call for a name is chunk k (the runner feeds every chunk to every matmul, in order).
    A cluster (pipelines/cluster.py) computes each block on some worker and adds the blocks in the
    same order, so its sums are these, whatever the number of workers."""

    def __init__(self) -> None:
        self._done: dict[str, np.ndarray] = {}  # sum of the finished blocks
        self._block: dict[str, np.ndarray] = {}  # the block being summed
        self._calls: dict[str, int] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, name: str, x: np.ndarray) -> None:
        if x.shape[0] < MIN_ROWS:
            return
        if not np.isfinite(x).all():
            raise InputError(f"non-finite activations reach {name}; the model or its weights are broken")
        sq = np.einsum("ij,ij->j", x, x, dtype=np.float64)  # [n_in]
        k = self._calls.get(name, 0)
        self._calls[name] = k + 1
        if k % REDUCTION_BLOCK == 0:
            if name in self._block:
                self._done[name] = add_block(self._done.get(name), self._block[name])
            self._block[name] = sq
        else:
            self._block[name] += sq
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def sum_of(self, name: str) -> np.ndarray | None:
        """The name's sum so far: the finished blocks, then the one being summed (None: unseen)."""
        if name in self._block:
            return add_block(self._done.get(name), self._block[name])
        return self._done.get(name)

    @property
    def sums(self) -> dict[str, np.ndarray]:
        return {n: self.sum_of(n) for n in dict.fromkeys([*self._done, *self._block])}

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"sum:{n}": s for n, s in self.sums.items()}
        arrays.update({f"count:{n}": np.array(c, np.int64) for n, c in self.counts.items()})
        return arrays

    def add_arrays(self, data: dict[str, np.ndarray]) -> None:
        """Take the sums and counts of `arrays()` (a checkpointed layer, or the next block of a
        cluster run) after those already held, as the next block."""
        for key, arr in data.items():
            kind, name = key.split(":", 1)
            if kind == "sum":
                self._done[name] = add_block(self.sum_of(name), arr.astype(np.float64))
                self._block.pop(name, None)
            elif kind == "count":
                self.counts[name] = self.counts.get(name, 0) + int(arr)


REDUCTION_BLOCK = 16  # chunks summed together before their sum is added to the total (see Collector)


def add_block(total: np.ndarray | None, block: np.ndarray) -> np.ndarray:
    return block.copy() if total is None else total + block


class ImatrixObserver(Observer, name="imatrix"):
    """llama-imatrix's statistic on the calibration runner: per weight, the sum of squared inputs
    per column and the rows seen (see the module's docstring). Option: process_output."""

    def __init__(self, process_output: bool = False) -> None:
        super().__init__(process_output=process_output)
        self.process_output = process_output
        self.total_ = Collector()
        self.layer_: Collector | None = None

    def prepare_layer(self, il: int, weights: dict[str, np.ndarray], probe: Any) -> None:
        self.layer_ = Collector()

    def on_input(self, name: str, x: np.ndarray) -> None:
        self.layer_(name, x)

    def end_layer(self, il: int) -> None:
        self._add(self.layer_)

    def layer_state(self, il: int) -> dict[str, np.ndarray]:
        return self.layer_.arrays()

    def load_layer_state(self, il: int, state: dict[str, np.ndarray]) -> None:
        self.total_.add_arrays(state)

    def end(self, model: Model, hidden: np.ndarray) -> None:
        # the output projection: its input is the final-normed hidden state of every position
        if self.process_output and model.output_name == "output.weight":
            out = Collector()
            for c in range(hidden.shape[0]):
                out("output.weight", model.final_norm(np.asarray(hidden[c])))
            self._add(out)

    def merge(self, other: Observer) -> None:
        self.total_.add_arrays(other.total_.arrays())

    def _add(self, layer: Collector) -> None:
        self.total_.add_arrays(layer.arrays())

    def result(self) -> Collector:
        return self.total_


def collect(model: Model, tokens: np.ndarray | list[int], options: ImatrixOptions = ImatrixOptions(),
            progress: ProgressFn | None = None, log: Callable[[str], None] | None = None,
            observers: list[Observer] = ()) -> ImatrixResult:
    """Run the chunks through the model layer by layer on the calibration runner and gather
    llama-imatrix's statistics (without the --in-file merge; see `compute`). `observers` run
    alongside (they share the forward pass and the checkpoints)."""
    report = progress_or_noop(progress)
    imatrix = ImatrixObserver(process_output=options.process_output)
    observers = list(observers)
    detector = None
    if options.super_weights:
        from quantcli.calibrate.superweights import SuperWeightObserver

        detector = SuperWeightObserver()
        detector.progress = report
        observers.append(detector)
    run_options = RunOptions(ctx=options.ctx, chunks=options.chunks, skip_chunks=options.skip_chunks,
                             min_ctx=MIN_ROWS, checkpoint_dir=options.checkpoint_dir,
                             keep_checkpoints=options.keep_checkpoints, hidden_path=options.hidden_path,
                             kind="imatrix")
    run = run_calibration(model, tokens, run_options, [imatrix, *observers], progress, log,
                          keep_hidden=options.compute_ppl)
    chunks = run.chunks
    n_chunks, ctx = chunks.shape
    ppl = None
    if options.compute_ppl:
        first = ctx // 2
        cfg = model.config
        scored = np.ascontiguousarray(run.hidden[:, first:ctx - 1]).reshape(-1, cfg.n_embd)
        run.hidden = None
        if options.hidden_path is not None:
            os.unlink(options.hidden_path)
        stats, _, _ = head_pass(model, model.head_input(scored), chunks[:, first + 1:].reshape(-1),
                                PerplexityOptions(ctx=ctx), report)
        ppl = float(np.exp(stats.nll().mean()))

    result = to_imatrix(imatrix.result(), ctx, options.dataset,
                        outliers=detector.result() if detector is not None else None)
    return ImatrixResult(result, n_chunks, n_chunks * ctx, run.seconds, run.resumed_layers, ppl)


def to_imatrix(collector: Collector, ctx: int, dataset: str = "", outliers: Any = None) -> imf.Imatrix:
    """The imatrix file's contents from collected sums and counts."""
    sums = collector.sums
    entries = {name: imf.ImatrixEntry(sums[name].astype(np.float32).reshape(1, -1),
                                      np.array([collector.counts[name]], np.float32))
               for name in sorted(sums)}
    chunk_count = max((c for c in collector.counts.values()), default=0) // ctx
    return imf.Imatrix(entries, [dataset] if dataset else [], chunk_count, ctx, outliers=outliers)


def merge(base: imf.Imatrix | None, others: list[imf.Imatrix], chunk_size: int) -> imf.Imatrix:
    """IMatrixCollector::load_imatrix applied to each of `others` in turn, then `base` (this
    run's statistics) added as collection would: sums and counts added, legacy files' values
    times chunk_size, datasets concatenated (loaded files first), chunk_count = max count / chunk_size;
    super-weight records combined (`outliers.merge`)."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    datasets: list[str] = []

    def add(name: str, s: np.ndarray, c: np.ndarray) -> None:
        s, c = s.astype(np.float64).reshape(-1), c.astype(np.float64).reshape(-1)
        if name not in sums:
            sums[name], counts[name] = np.zeros(s.size), np.zeros(c.size)
        elif sums[name].size != s.size:
            raise InputError(f"imatrix entry '{name}' has {s.size} values in one file and "
                             f"{sums[name].size} in another; files of different models cannot be merged")
        if counts[name].size == 1 and c.size > 1:  # an old dense count, broadcast to the experts
            counts[name] = np.repeat(counts[name], c.size)
        elif c.size == 1 and counts[name].size > 1:  # a legacy ncall adds to every expert
            c = np.repeat(c, counts[name].size)
        elif c.size != counts[name].size:
            raise InputError(f"imatrix entry '{name}' has {c.size} counts in one file and "
                             f"{counts[name].size} in another")
        sums[name] += s
        counts[name] += c

    for other in others:
        for name, e in other.entries.items():
            if other.is_legacy:  # values are mean * ncall; counts hold ncall
                add(name, e.sums * np.float64(chunk_size), np.full(1, e.counts[0] * chunk_size))
            else:
                add(name, e.sums, e.counts.astype(np.float64))
        datasets += other.datasets
    if base is not None:
        for name, e in base.entries.items():
            add(name, e.sums, e.counts.astype(np.float64))
        datasets += base.datasets
    if not sums:
        raise InputError("nothing to merge: no imatrix entries")
    max_count = max(float(c.max()) for c in counts.values())
    entries = {n: imf.ImatrixEntry(sums[n].astype(np.float32).reshape(counts[n].size, -1),
                                   counts[n].astype(np.float32)) for n in sorted(sums)}
    found = outliers.merge([o.outliers for o in others] + ([base.outliers] if base is not None else []))
    return imf.Imatrix(entries, datasets, int(max_count // chunk_size), chunk_size, outliers=found)


def compute(model: Any, text: str | None, options: ImatrixOptions = ImatrixOptions(),
            progress: ProgressFn | None = None, log: Callable[[str], None] | None = None) -> ImatrixResult:
    """llama-imatrix: statistics of `model` (a path or open reader) on `text`, merged with
    options.in_files. With text None only the in-files are combined (llama-imatrix without -f)."""
    from quantcli.formats import open_model

    t0 = time.perf_counter()
    loaded = [imf.load(p) for p in options.in_files]
    if text is None:
        if not loaded:
            raise UsageError("no text and no --in-file: nothing to compute or combine")
        merged = merge(None, loaded, options.ctx)
        return ImatrixResult(merged, 0, 0, time.perf_counter() - t0, 0)
    reader = open_model(model) if isinstance(model, (str, Path)) else model
    try:
        m = Model(reader, kv_f16=options.kv_f16, act_quant=options.act_quant)
        report = progress_or_noop(progress)
        tokens = Tokenizer.from_model(reader).encode(text, add_special=True,
                                                     parse_special=options.parse_special)
        report(Progress("tokenize", 1, 1, f"{len(tokens)} tokens"))
        result = collect(m, tokens, options, progress, log)
    finally:
        if reader is not model:
            reader.close()
    if loaded:
        merged = merge(result.imatrix, loaded, options.ctx)
        result = ImatrixResult(merged, result.chunks, result.tokens, result.seconds,
                               result.resumed_layers, result.perplexity)
    return result


def load_imatrix(path: Path) -> dict[str, np.ndarray]:
    """{weight name: float32 importance per input column} exactly as llama-quantize derives it
    from a GGUF (in_sum2 / counts, 1 where a count is 0) or legacy (values / ncall) file.
    Expert tensors give n_expert * n_per_row values, expert by expert."""
    m = imf.load(Path(path))
    return {name: m.importance(name) for name in m.entries}
