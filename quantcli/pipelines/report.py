"""`quantcli report`: per-tensor rows, per-layer aggregates, totals and the model's metadata summary;
with estimates, each tensor's and layer's estimated KL divergence (an automatic mix's own, or a
measurement's).

The JSON form (`to_json`) has a stable schema, `quantcli.report/1`, documented in the README.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from quantcli.errors import InputError, UsageError
from quantcli.formats import ModelReader, open_model
from quantcli.names import OUTPUT, TOKEN_EMBD, category, layer_of

SCHEMA = "quantcli.report/1"
ALLOCATION = "quantcli.allocation."  # the metadata an automatic mix writes (quantize --target-size ...)


@dataclass(frozen=True)
class TensorRow:
    name: str
    shape: list[int]  # numpy order: (..., rows, cols); GGUF's ne is this reversed
    type: str
    params: int
    bytes: int
    bpw: float
    layer: int | None
    estimated_kld: float | None = None  # estimated dKLD of this tensor at its type; None: unknown


@dataclass(frozen=True)
class LayerRow:
    layer: int
    tensors: int
    params: int
    bytes: int
    bpw: float
    types: dict[str, int]  # type -> number of tensors
    share: float = 0.0  # of all tensors' bytes
    estimated_kld: float | None = None  # sum of its tensors' estimates; None when none has one


@dataclass(frozen=True)
class GroupRow:
    """The tensors outside the repeated blocks, as LayerRow: "embd" (token embeddings), "out" (the
    output head and its norm), "other"."""

    name: str
    tensors: int
    params: int
    bytes: int
    bpw: float
    types: dict[str, int]
    share: float = 0.0
    estimated_kld: float | None = None


@dataclass(frozen=True)
class Totals:
    tensors: int
    params: int
    bytes: int
    bpw: float
    ratio_vs_f16: float  # F16 bytes of the same parameters / actual bytes
    ratio_vs_f32: float
    types: dict[str, dict[str, int]]  # type -> {tensors, params, bytes}
    estimated_kld: float | None = None  # sum of the tensors' estimates; None when none has one


@dataclass(frozen=True)
class Report:
    file: str
    format: str
    metadata: dict[str, Any]
    tensors: list[TensorRow]
    layers: list[LayerRow]
    totals: Totals
    evaluation: dict[str, Any] | None = field(default=None)
    outside_layers: list[GroupRow] = field(default_factory=list)
    allocation: dict[str, Any] | None = None  # {target, estimate_kld, measurement_sha256} of an automatic mix
    estimates: dict[str, Any] | None = None  # where the estimates came from; None: no estimates

    def to_json(self) -> dict[str, Any]:
        out = {"schema": SCHEMA, **asdict(self)}
        if out["evaluation"] is None:
            del out["evaluation"]
        if self.estimates is None:  # no estimates: the rows look as they did before there were any
            for row in [*out["tensors"], *out["layers"], *out["outside_layers"], out["totals"]]:
                del row["estimated_kld"]
        return out


def _bpw(nbytes: int, params: int) -> float:
    return round(8.0 * nbytes / params, 4) if params else 0.0


def _sum_estimates(rows: list[TensorRow]) -> float | None:
    known = [r.estimated_kld for r in rows if r.estimated_kld is not None]
    return float(sum(known)) if known else None


def _aggregate(rows: list[TensorRow], total_bytes: int) -> dict[str, Any]:
    """The fields LayerRow and GroupRow share, over `rows`."""
    params, nbytes = sum(r.params for r in rows), sum(r.bytes for r in rows)
    return {"tensors": len(rows), "params": params, "bytes": nbytes, "bpw": _bpw(nbytes, params),
            "types": dict(sorted(Counter(r.type for r in rows).items())),
            "share": nbytes / total_bytes if total_bytes else 0.0, "estimated_kld": _sum_estimates(rows)}


def outside_label(name: str) -> str:
    """The group of a tensor outside the repeated blocks: "embd", "out" or "other"."""
    cat = category(name)
    if cat == TOKEN_EMBD or "embed_tokens" in name:
        return "embd"
    if cat == OUTPUT or name.startswith("output") or name.startswith("lm_head") or name == "model.norm.weight":
        return "out"
    return "other"


def build(reader: ModelReader, estimates: list[float | None] | None = None) -> Report:
    """The report of `reader`'s tensors; `estimates`: one estimated dKLD (or None) per tensor in
    file order."""
    infos = list(reader.tensors.values())
    est = estimates if estimates is not None else [None] * len(infos)
    rows = [
        TensorRow(name=t.name, shape=list(t.shape), type=t.dtype, params=t.n_params,
                  bytes=t.nbytes, bpw=_bpw(t.nbytes, t.n_params), layer=layer_of(t.name), estimated_kld=e)
        for t, e in zip(infos, est)
    ]
    params, nbytes = sum(r.params for r in rows), sum(r.bytes for r in rows)
    per_layer: dict[int, list[TensorRow]] = defaultdict(list)
    outside: dict[str, list[TensorRow]] = defaultdict(list)
    for r in rows:
        if r.layer is not None:
            per_layer[r.layer].append(r)
        else:
            outside[outside_label(r.name)].append(r)
    layers = [LayerRow(layer=idx, **_aggregate(per_layer[idx], nbytes)) for idx in sorted(per_layer)]
    groups = [GroupRow(name=g, **_aggregate(outside[g], nbytes)) for g in ("embd", "out", "other") if g in outside]
    by_type: dict[str, dict[str, int]] = {}
    for r in rows:
        t = by_type.setdefault(r.type, {"tensors": 0, "params": 0, "bytes": 0})
        t["tensors"] += 1
        t["params"] += r.params
        t["bytes"] += r.bytes
    totals = Totals(
        tensors=len(rows), params=params, bytes=nbytes, bpw=_bpw(nbytes, params),
        ratio_vs_f16=round(2.0 * params / nbytes, 4) if nbytes else 0.0,
        ratio_vs_f32=round(4.0 * params / nbytes, 4) if nbytes else 0.0,
        types=dict(sorted(by_type.items())), estimated_kld=_sum_estimates(rows),
    )
    return Report(file=str(reader.path), format=reader.format, metadata=reader.summary(),
                  tensors=rows, layers=layers, totals=totals, outside_layers=groups)


# -- estimates ----------------------------------------------------------------------------------


def allocation_metadata(reader: ModelReader) -> dict[str, Any] | None:
    """An automatic mix's target, total estimate and measurement hash, or None for other files."""
    keys = ("target", "estimate_kld", "measurement_sha256")
    if not any(ALLOCATION + k in reader.kv for k in (*keys, "tensor_kld")):
        return None
    doc = {k: reader.meta(ALLOCATION + k) for k in keys}
    if doc["estimate_kld"] is not None:
        doc["estimate_kld"] = float(doc["estimate_kld"])
    return doc


def recorded_estimates(reader: ModelReader) -> list[float] | None:
    """The per-tensor estimates an automatic mix records (`quantcli.allocation.tensor_kld`, one per
    tensor in file order, 0.0 for tensors it did not choose), or None when the file has none."""
    key = ALLOCATION + "tensor_kld"
    kv = reader.kv.get(key)
    if kv is None:
        return None
    values = kv.value
    if not isinstance(values, np.ndarray) or values.dtype.kind != "f":
        raise InputError(f"{reader.path}: metadata '{key}' is not an array of floats",
                         hint="the file's allocation metadata is damaged; quantize it again")
    if len(values) != len(reader.tensors):
        raise InputError(f"{reader.path}: metadata '{key}' has {len(values)} values for "
                         f"{len(reader.tensors)} tensors",
                         hint="the file's allocation metadata is damaged; pass --measurement M.json instead")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise InputError(f"{reader.path}: metadata '{key}' holds negative or non-finite values",
                         hint="the file's allocation metadata is damaged; pass --measurement M.json instead")
    return [float(v) for v in values]


def measured_estimates(reader: ModelReader, path: Path) -> tuple[list[float | None], str]:
    """Per tensor in file order, the measurement's estimate of its dKLD at its type: unquantized
    F32 tensors 0.0, tensors the measurement has no error for at that type None. Returns the
    estimates and the measurement's sha256. Refuses a measurement of another model."""
    from quantcli.allocate import Measurement

    m = Measurement.load(path)
    infos = list(reader.tensors.values())
    known = [t for t in infos if t.name in m.tensors]
    if not known:
        raise InputError(f"{path}: the measurement is of another model: none of the "
                         f"{len(infos)} tensors of {reader.path.name} is in it",
                         hint="pass the measurement quantize --measurement made for this model")
    for t in known:
        if tuple(t.shape) != tuple(m.tensors[t.name].shape):
            raise InputError(f"{path}: the measurement is of another model: {t.name} is "
                             f"{list(m.tensors[t.name].shape)} there, {list(t.shape)} in {reader.path.name}",
                             hint="pass the measurement quantize --measurement made for this model")
    out: list[float | None] = []
    for t in infos:
        tm = m.tensors.get(t.name)
        if tm is not None and t.dtype in tm.errors:
            out.append(float(tm.estimate(t.dtype)))
        else:
            out.append(0.0 if t.dtype == "F32" else None)
    return out, m.sha256


def estimated(reader: ModelReader, measurement: Path | None) -> tuple[list[float | None] | None, dict[str, Any] | None]:
    """The per-tensor estimates and where they came from: `measurement` when given, else the
    file's allocation metadata, else none."""
    if measurement is not None:
        values, sha = measured_estimates(reader, measurement)
        return values, {"source": "measurement", "measurement": str(measurement), "measurement_sha256": sha}
    recorded = recorded_estimates(reader)
    if recorded is not None:
        return recorded, {"source": "metadata", "measurement": None,
                          "measurement_sha256": reader.meta(ALLOCATION + "measurement_sha256")}
    return None, None


@dataclass(frozen=True)
class EvalOptions:
    text: Path  # evaluation text (UTF-8), tokenized once with BOS as llama-perplexity does
    ctx: int = 512  # tokens per chunk
    chunks: int | None = None  # at most this many chunks; None: all the text holds
    base: Path | None = None  # a reference model for KL divergence and top-1 agreement
    simulate: str | None = None  # "w8a8" / "w8a8:token" (dynamic per-token), "w8a8:tensor" (static),
    #   "w8a8:hybrid" (static, ffn_down per token)
    calib: Path | None = None  # w8a8:tensor/hybrid: the text whose maxima give the static activation scales


SIMULATIONS = {"w8a8": "token", "w8a8:token": "token", "w8a8:tensor": "tensor", "w8a8:hybrid": "hybrid"}


def simulation(reader: ModelReader, spec: str | None, text: str, ctx: int, chunks: int | None,
               progress=None, calib: str | None = None):
    """The W8A8 engine `spec` names, or None, and where its static scales came from. Static
    per-tensor activation scales are, in this order: the calibration maxima a smoothed model
    records (`quantcli smooth` writes them), the maxima of every matmul input on `calib`'s chunks,
    or on the evaluation text's own chunks (the best case for static scales). Scales are measured
    by the static-scales observer on the unsimulated model, one extra pass over the layers (MSE
clips for static, maxima for hybrid, as `smooth` chooses them). The
    linears a smoothed model kept at higher precision (`quantcli.smooth.kept`) run in float, as an
    int8 engine runs the layers its config ignores. A static engine tallies what its scales clip
    on the evaluated text (`W8A8.saturation`)."""
    from quantcli.engine.w8a8 import W8A8, Saturation
    from quantcli.errors import UsageError

    if spec is None:
        return None, None
    if spec not in SIMULATIONS:
        raise UsageError(f"unknown simulation '{spec}'; known: {', '.join(SIMULATIONS)}")
    from quantcli.pipelines.smooth import recorded_input_max, recorded_kept

    keep = recorded_kept(reader.kv)  # linears a smoothed model keeps out of int8 (--keep-problem-layers)
    if SIMULATIONS[spec] == "token":
        return W8A8("token", keep=keep), None
    mode = SIMULATIONS[spec]
    recorded = recorded_input_max(reader.kv)
    if recorded is not None:
        return W8A8(mode, act_max=recorded, keep=keep, saturation=Saturation()), "recorded"
    from quantcli.calibrate.runner import RunOptions, make_observer, run_calibration
    from quantcli.calibrate.smooth import default_static_scales
    from quantcli.engine.model import Model
    from quantcli.engine.tokenizer import Tokenizer

    tokens = Tokenizer.from_model(reader).encode(calib if calib is not None else text, add_special=True,
                                                 parse_special=False)
    run = run_calibration(Model(reader), tokens, RunOptions(ctx=ctx, chunks=chunks, kind="static-scales"),
                          [make_observer("static-scales", static_scales=default_static_scales(mode))], progress)
    return (W8A8(mode, act_max=run.observers[0].result(), keep=keep, saturation=Saturation()),
            "calib" if calib is not None else "eval-text")


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
            "static_clipping": sim.saturation.summary() if sim is not None and sim.saturation is not None else None,
            "perplexity": r.perplexity, "perplexity_error": r.perplexity_error,
            "running": list(r.running), "kld_mean": r.kld_mean, "kld_p99": r.kld_p99,
            "top1_agreement": r.top1_agreement, "base": str(opts.base) if opts.base else None,
            "base_perplexity": r.base_perplexity, "seconds": round(r.seconds, 3),
            "tokens_per_second": round(r.tokens_per_second, 1)}


def check_plot(path: Path, inputs: list[Path]) -> None:
    """Refuse a --plot that would not be a PNG, would replace an input, or cannot be drawn (no
    matplotlib) before any work is done. An existing PNG is replaced."""
    import importlib.util

    from quantcli.formats.atomic import check_output

    if Path(path).suffix.lower() != ".png":
        raise UsageError(f"--plot {path}: the plot is a PNG; name it FILE.png")
    check_output(Path(path), inputs, force=True)
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib", hint="pip install 'quantcli[plot]'")


def run(path: Path, evaluation: EvalOptions | None = None, progress=None, *, measurement: Path | None = None,
        plot: Path | None = None) -> Report:
    """The report of the model at `path`, with estimates from `measurement` or the file's
    allocation metadata; with `plot`, its bits and estimates per layer as a PNG."""
    if plot is not None:
        inputs = [path, measurement] + ([evaluation.text, evaluation.base, evaluation.calib] if evaluation else [])
        check_plot(plot, [Path(p) for p in inputs if p is not None])
    with open_model(path) as reader:
        values, source = estimated(reader, measurement)
        rep = replace(build(reader, values), allocation=allocation_metadata(reader), estimates=source)
        if evaluation is not None:
            rep = replace(rep, evaluation=evaluate(reader, evaluation, progress))
    if plot is not None:
        from quantcli.pipelines.report_plot import plot_layers

        plot_layers(rep, Path(plot))
    return rep
