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

import hashlib
import io
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import quantcli
from quantcli.calibrate import imatrix_file as imf
from quantcli.checkpoint import CheckpointStore
from quantcli.engine.model import Model
from quantcli.engine.perplexity import PerplexityOptions, chunk_tokens, head_pass
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
    """The hook: per weight name, float64 sums of squared inputs per column and a row count."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, name: str, x: np.ndarray) -> None:
        if x.shape[0] < MIN_ROWS:
            return
        if not np.isfinite(x).all():
            raise InputError(f"non-finite activations reach {name}; the model or its weights are broken")
        sq = np.einsum("ij,ij->j", x, x, dtype=np.float64)  # [n_in]
        if name in self.sums:
            self.sums[name] += sq
            self.counts[name] += x.shape[0]
        else:
            self.sums[name] = sq
            self.counts[name] = x.shape[0]

    def to_npz(self) -> bytes:
        buf = io.BytesIO()
        arrays = {f"sum:{n}": s for n, s in self.sums.items()}
        arrays.update({f"count:{n}": np.array(c, np.int64) for n, c in self.counts.items()})
        np.savez(buf, **arrays)
        return buf.getvalue()

    def add_npz(self, data: dict[str, np.ndarray]) -> None:
        for key, arr in data.items():
            kind, name = key.split(":", 1)
            if kind == "sum":
                self.sums[name] = arr.astype(np.float64)
            elif kind == "count":
                self.counts[name] = int(arr)


def model_fingerprint(reader: Any) -> str:
    """sha256 over the file size, the tensor table and the first and last 64 KiB of each tensor:
    cheap even for a 40 GB model, and any re-quantization or other model changes it."""
    h = hashlib.sha256()
    path = Path(reader.path)
    h.update(str(path.stat().st_size if path.is_file() else 0).encode())
    for name in sorted(reader.tensors):
        info = reader.tensors[name]
        h.update(f"{name}|{info.dtype}|{info.shape}|{info.nbytes}\n".encode())
        raw = reader.raw(name)
        h.update(raw[:65536].tobytes())
        h.update(raw[-65536:].tobytes())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"quantcli": quantcli.__version__, "numpy": np.__version__, "gguf": version("gguf")}


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def collect(model: Model, tokens: np.ndarray | list[int], options: ImatrixOptions = ImatrixOptions(),
            progress: ProgressFn | None = None, log: Callable[[str], None] | None = None) -> ImatrixResult:
    """Run the chunks through the model layer by layer and gather llama-imatrix's statistics
    (without the --in-file merge; see `compute`)."""
    report = progress_or_noop(progress)
    log = log or (lambda _msg: None)
    t0 = time.perf_counter()
    cfg = model.config
    if options.ctx < MIN_ROWS:
        raise UsageError(f"context {options.ctx} is below {MIN_ROWS}: llama-imatrix collects nothing "
                         f"from matmuls with fewer than {MIN_ROWS} rows")
    tokens = np.asarray(tokens, dtype=np.int64)
    if options.skip_chunks:
        if (options.skip_chunks + 2) * options.ctx >= len(tokens):
            raise InputError(f"no tokens left after removing {options.skip_chunks} chunks of {options.ctx}")
        tokens = tokens[options.skip_chunks * options.ctx:]
    chunks = chunk_tokens(tokens, options.ctx, options.chunks, cfg.bos_id, cfg.add_bos)
    n_chunks, ctx = chunks.shape

    store = None
    if options.checkpoint_dir is not None:
        key = {"kind": "imatrix", "model": model_fingerprint(model.reader),
               "tokens": hashlib.sha256(chunks.astype("<i8").tobytes()).hexdigest(),
               "options": {k: v for k, v in asdict(options).items()
                           if k in ("ctx", "chunks", "skip_chunks", "process_output", "kv_f16", "act_quant")},
               **_versions()}
        store = CheckpointStore(options.checkpoint_dir, key, log)

    shape = (n_chunks, ctx, cfg.n_embd)
    if options.hidden_path is not None:
        hidden = np.lib.format.open_memmap(options.hidden_path, mode="w+", dtype=np.float32, shape=shape)
    else:
        hidden = np.empty(shape, np.float32)

    # resume: two hidden-state units alternate ("hidden-0", "hidden-1"), each saying which layer
    # it follows, so one is intact whenever the other is being replaced; take the later one
    # whose layers all have their statistics
    collector = Collector()
    start = 0
    if store is not None:
        saved = [(int(d["layer"]), d) for u in ("hidden-0", "hidden-1")
                 if (p := store.get(u)) is not None for d in [_read_npz(p)]]
        for layer_done, data in sorted(saved, key=lambda t: -t[0]):
            stats = [store.get(f"stats-{il}") for il in range(layer_done + 1)]
            if data["hidden"].shape == shape and all(p is not None for p in stats):
                hidden[...] = data["hidden"]
                for p in stats:
                    collector.add_npz(_read_npz(p))
                start = layer_done + 1
                log(f"resuming after layer {layer_done} from {options.checkpoint_dir}")
                break
        del saved
    if start == 0:
        model.embed(chunks, out=hidden)

    for il in range(start, cfg.n_layer):
        w = model.layer_weights(il)
        layer = Collector()
        for c in range(n_chunks):
            hidden[c] = model.layer(il, w, np.asarray(hidden[c]), layer)
            report(Progress("chunk", il * n_chunks + c + 1, cfg.n_layer * n_chunks, f"blk.{il}"))
        del w
        collector.sums.update(layer.sums)
        collector.counts.update(layer.counts)
        if store is not None:
            with store.put(f"stats-{il}") as fh:
                fh.write(layer.to_npz())
            with store.put(f"hidden-{il % 2}") as fh:
                fh.write(_npz(layer=np.array(il), hidden=np.asarray(hidden)))
        report(Progress("layer", il + 1, cfg.n_layer, f"blk.{il}"))

    # the output projection: its input is the final-normed hidden state of every position
    if options.process_output and model.output_name == "output.weight":
        out = Collector()
        for c in range(n_chunks):
            out("output.weight", model.final_norm(np.asarray(hidden[c])))
        collector.sums.update(out.sums)
        collector.counts.update(out.counts)

    ppl = None
    if options.compute_ppl:
        first = ctx // 2
        scored = np.ascontiguousarray(hidden[:, first:ctx - 1]).reshape(-1, cfg.n_embd)
        stats, _, _ = head_pass(model, model.head_input(scored), chunks[:, first + 1:].reshape(-1),
                                PerplexityOptions(ctx=ctx), report)
        ppl = float(np.exp(stats.nll().mean()))
    del hidden
    if options.hidden_path is not None:
        os.unlink(options.hidden_path)

    entries = {name: imf.ImatrixEntry(collector.sums[name].astype(np.float32).reshape(1, -1),
                                      np.array([collector.counts[name]], np.float32))
               for name in sorted(collector.sums)}
    chunk_count = max((c for c in collector.counts.values()), default=0) // ctx
    result = imf.Imatrix(entries, [options.dataset] if options.dataset else [], chunk_count, ctx)
    if store is not None and not options.keep_checkpoints:
        store.remove()
    return ImatrixResult(result, n_chunks, n_chunks * ctx, time.perf_counter() - t0, start, ppl)


def merge(base: imf.Imatrix | None, others: list[imf.Imatrix], chunk_size: int) -> imf.Imatrix:
    """IMatrixCollector::load_imatrix applied to each of `others` in turn, then `base` (this
    run's statistics) added as collection would: sums and counts added, legacy files' values
    times chunk_size, datasets concatenated (loaded files first), chunk_count = max count / chunk_size."""
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
    return imf.Imatrix(entries, datasets, int(max_count // chunk_size), chunk_size)


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
