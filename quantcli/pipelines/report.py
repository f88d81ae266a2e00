"""`quantcli report`: per-tensor rows, per-layer aggregates, totals and the model's metadata summary.

The JSON form (`to_json`) has a stable schema, `quantcli.report/1`, documented in the README.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from quantcli.formats import ModelReader, open_model
from quantcli.names import layer_of

SCHEMA = "quantcli.report/1"

@dataclass(frozen=True)
class TensorRow:
    name: str
    shape: list[int]  # numpy order: (..., rows, cols); GGUF's ne is this reversed
    type: str
    params: int
    bytes: int
    bpw: float
    layer: int | None


@dataclass(frozen=True)
class LayerRow:
    layer: int
    tensors: int
    params: int
    bytes: int
    bpw: float
    types: dict[str, int]  # type -> number of tensors


@dataclass(frozen=True)
class Totals:
    tensors: int
    params: int
    bytes: int
    bpw: float
    ratio_vs_f16: float  # F16 bytes of the same parameters / actual bytes
    ratio_vs_f32: float
    types: dict[str, dict[str, int]]  # type -> {tensors, params, bytes}


@dataclass(frozen=True)
class Report:
    file: str
    format: str
    metadata: dict[str, Any]
    tensors: list[TensorRow]
    layers: list[LayerRow]
    totals: Totals
    evaluation: dict[str, Any] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        out = {"schema": SCHEMA, **asdict(self)}
        if out["evaluation"] is None:
            del out["evaluation"]
        return out


def _bpw(nbytes: int, params: int) -> float:
    return round(8.0 * nbytes / params, 4) if params else 0.0


def build(reader: ModelReader) -> Report:
    rows = [
        TensorRow(name=t.name, shape=list(t.shape), type=t.dtype, params=t.n_params,
                  bytes=t.nbytes, bpw=_bpw(t.nbytes, t.n_params), layer=layer_of(t.name))
        for t in reader.tensors.values()
    ]
    per_layer: dict[int, list[TensorRow]] = defaultdict(list)
    for r in rows:
        if r.layer is not None:
            per_layer[r.layer].append(r)
    layers = []
    for idx in sorted(per_layer):
        group = per_layer[idx]
        params, nbytes = sum(r.params for r in group), sum(r.bytes for r in group)
        layers.append(LayerRow(layer=idx, tensors=len(group), params=params, bytes=nbytes,
                               bpw=_bpw(nbytes, params),
                               types=dict(sorted(Counter(r.type for r in group).items()))))
    by_type: dict[str, dict[str, int]] = {}
    for r in rows:
        t = by_type.setdefault(r.type, {"tensors": 0, "params": 0, "bytes": 0})
        t["tensors"] += 1
        t["params"] += r.params
        t["bytes"] += r.bytes
    params, nbytes = sum(r.params for r in rows), sum(r.bytes for r in rows)
    totals = Totals(
        tensors=len(rows), params=params, bytes=nbytes, bpw=_bpw(nbytes, params),
        ratio_vs_f16=round(2.0 * params / nbytes, 4) if nbytes else 0.0,
        ratio_vs_f32=round(4.0 * params / nbytes, 4) if nbytes else 0.0,
        types=dict(sorted(by_type.items())),
    )
    return Report(file=str(reader.path), format=reader.format, metadata=reader.summary(),
                  tensors=rows, layers=layers, totals=totals)


@dataclass(frozen=True)
class EvalOptions:
    text: Path  # evaluation text (UTF-8), tokenized once with BOS as llama-perplexity does
    ctx: int = 512  # tokens per chunk
    chunks: int | None = None  # at most this many chunks; None: all the text holds
    base: Path | None = None  # a reference model for KL divergence and top-1 agreement
    simulate: str | None = None  # "w8a8" / "w8a8:token" (dynamic per-token) or "w8a8:tensor" (static)
    calib: Path | None = None  # w8a8:tensor: the text whose maxima give the static activation scales


SIMULATIONS = {"w8a8": "token", "w8a8:token": "token", "w8a8:tensor": "tensor"}


def simulation(reader: ModelReader, spec: str | None, text: str, ctx: int, chunks: int | None,
               progress=None, calib: str | None = None):
    """The W8A8 engine `spec` names, or None, and where its static scales came from. Static
    per-tensor activation scales are, in this order: the calibration maxima a smoothed model
    records (`quantcli smooth` writes them), the maxima of every matmul input on `calib`'s chunks,
    or on the evaluation text's own chunks (the best case for static scales). Scales are measured
    by the static-scales observer on the unsimulated model, one extra pass over the layers."""
    from quantcli.engine.w8a8 import W8A8
    from quantcli.errors import UsageError

    if spec is None:
        return None, None
    if spec not in SIMULATIONS:
        raise UsageError(f"unknown simulation '{spec}'; known: {', '.join(SIMULATIONS)}")
    if SIMULATIONS[spec] == "token":
        return W8A8("token"), None
    from quantcli.pipelines.smooth import recorded_input_max

    recorded = recorded_input_max(reader.kv)
    if recorded is not None:
        return W8A8("tensor", act_max=recorded), "recorded"
    from quantcli.calibrate.runner import RunOptions, make_observer, run_calibration
    from quantcli.engine.model import Model
    from quantcli.engine.tokenizer import Tokenizer

    tokens = Tokenizer.from_model(reader).encode(calib if calib is not None else text, add_special=True,
                                                 parse_special=False)
    run = run_calibration(Model(reader), tokens, RunOptions(ctx=ctx, chunks=chunks, kind="static-scales"),
                          [make_observer("static-scales")], progress)
    return W8A8("tensor", act_max=run.observers[0].result()), "calib" if calib is not None else "eval-text"


def evaluate(reader: ModelReader, opts: EvalOptions, progress=None) -> dict[str, Any]:
    """llama-perplexity's perplexity (and KLD vs a base model) through the numpy engine; with
    `simulate`, of the model as a W8A8 engine runs it (the base stays as it is)."""
    from quantcli.engine.perplexity import PerplexityOptions, evaluate as engine_evaluate
    from quantcli.errors import UsageError
    from quantcli.pipelines.common import read_text

    if opts.ctx < 2:
        raise UsageError(f"--ctx must be at least 2, got {opts.ctx}")
    text = read_text(opts.text)
    calib = read_text(opts.calib) if opts.calib is not None else None
    sim, scales_from = simulation(reader, opts.simulate, text, opts.ctx, opts.chunks, progress, calib)
    r = engine_evaluate(reader, text, PerplexityOptions(ctx=opts.ctx, chunks=opts.chunks, simulate=sim),
                        base=opts.base, progress=progress)
    return {"text": str(opts.text), "ctx": r.ctx, "chunks": r.chunks, "tokens": r.tokens,
            "simulate": opts.simulate, "static_scales_from": scales_from,
            "perplexity": r.perplexity, "perplexity_error": r.perplexity_error,
            "running": list(r.running), "kld_mean": r.kld_mean, "kld_p99": r.kld_p99,
            "top1_agreement": r.top1_agreement, "base": str(opts.base) if opts.base else None,
            "base_perplexity": r.base_perplexity, "seconds": round(r.seconds, 3),
            "tokens_per_second": round(r.tokens_per_second, 1)}


def run(path: Path, evaluation: EvalOptions | None = None, progress=None) -> Report:
    with open_model(path) as reader:
        rep = build(reader)
        if evaluation is not None:
            rep = replace(rep, evaluation=evaluate(reader, evaluation, progress))
        return rep
