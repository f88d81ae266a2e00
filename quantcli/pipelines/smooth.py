"""`quantcli smooth`: SmoothQuant on the calibration runner, then the smoothed model as GGUF (through
the quantize pipeline) or as a compressed-tensors W8A8 directory for vLLM.

Order of work: check every option and output before the long part -> tokenize the calibration text
-> the smoothing pass (calibrate/smooth.py; layer checkpoints in OUT.checkpoints/calibration) ->
problem layers -> the output (GGUF: `quantize.run` on the smoothed view, its own checkpoints in
OUT.checkpoints/quantize; compressed-tensors: pipelines/compressed_tensors.py) -> the scales JSON
and the plot -> remove the checkpoints.

What the output records (GGUF metadata `quantcli.smooth.*`, the compressed-tensors header's
`quantcli.smooth` JSON): alpha as asked and per layer, the mappings, the activation mode, the
calibration text's sha256, chunks and ctx, the problem layers kept at higher precision, and the
smoothed model's max|x| per linear input on the calibration text (`input_max`), from which a static
per-tensor int8 engine takes its activation scales (max / 127) and `report --simulate w8a8:tensor`
reads them.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from quantcli import checkpoint
from quantcli.digests import file_sha256
from quantcli.errors import InputError, OutputError, UsageError
from quantcli.formats.atomic import atomic_write, check_output, describe
from quantcli.pipelines import cluster
from quantcli.pipelines.common import ProgressFn, open_source, read_text
from quantcli.progress import collect_warnings

DEFAULT_CHUNKS = 512
CHUNK_RANGE = (128, 1024)  # the documented calibration range (spec FR-013)
FORMATS = ("gguf", "compressed-tensors")
# a smoothed linear whose simulated W8A8 error ||dY||^2 / ||Y||^2 on the calibration rows stays above
# this is a problem layer (a relative RMS error of 2.6 %). Set on Gemma 3 270M (static activations,
# alpha 0.8, all mappings): every ffn_down measured 8.1e-4..4.6e-3, every other linear 0.6e-4..6.0e-4,
# and ffn_down's input is what costs static W8A8 its perplexity (kept in float: +5.4 % -> +1.0 %)
PROBLEM_ERROR = 7e-4
SCALES_SCHEMA = "quantcli.smooth-scales/1"
SUMMARY_SCHEMA = "quantcli.smooth/1"


@dataclass(frozen=True)
class SmoothOptions:
    model: Path
    output: Path  # a GGUF file, or a directory for compressed-tensors
    calib: Path  # calibration text (UTF-8)
    alpha: float | str = 0.5  # migration strength in [0, 1], or "auto" (a per-layer search)
    mappings: str = "norm"  # "norm": norm -> q/k/v, norm -> gate/up; "all": also v -> o, up -> down
    chunks: int = DEFAULT_CHUNKS
    ctx: int = 512
    format: str = "gguf"
    type: str = "Q8_0"  # the GGUF preset
    activations: str = "dynamic"  # what the int8 engine does: per-token dynamic, static per-tensor, or
    #   hybrid (static, ffn_down per token)
    scales_out: Path | None = None  # the per-layer, per-channel report as JSON
    plot: Path | None = None  # a PNG of per-channel activation maxima, before/after, worst layers
    # static activations: "mse"-clipped maxima, or the plain "max" (None: mse for static, max for
    # hybrid; calibrate.smooth.default_static_scales)
    static_scales: str | None = None
    # raise each channel's max|X_j| to this quantile of its input's before s (0: none; None: the
    # observer's default, CHANNEL_FLOOR for --alpha auto's per-token W8A8 search, else none)
    channel_floor: float | None = None
    keep_problem_layers: str | None = None  # a type (F16, BF16, F32, Q8_0 ...) for problem linears
    problem_error: float = PROBLEM_ERROR
    allow_requantize: bool = False  # accept an already quantized model (GGUF output)
    tokenizer: Path | None = None  # compressed-tensors: a directory with the tokenizer files
    checkpoint_dir: Path | None = None  # default: OUT.checkpoints
    keep_checkpoints: bool = False
    threads: int = 0
    force: bool = False
    ray: str | None = None  # the statistics on a Ray cluster: "default", "auto" or "ray://host:port" (cluster.py)
    gptq: bool = False  # compressed-tensors: round the int8 weights with GPTQ (calibrate/gptq.py), not to nearest


@dataclass(frozen=True)
class Problem:
    """A layer whose smoothed linears still quantize badly."""

    layer: int
    linears: dict[str, float]  # weight name -> simulated W8A8 error after smoothing
    outlier_ratio: dict[str, float]  # mapping / input -> max / median of the channel maxima left
    remedy: str


@dataclass
class SmoothRunResult:
    output: Path
    format: str
    alpha: float | str
    alphas: list[float]  # per layer
    mappings: list[str]
    activations: str
    chunks: int
    tokens: int
    layers: list[dict[str, Any]]  # per layer: alpha, outlier ratios and errors before/after
    problems: list[Problem]
    kept: list[str]  # linears kept at --keep-problem-layers
    bytes: int
    seconds: float
    calibration_seconds: float
    resumed_layers: int
    warnings: list[str] = field(default_factory=list)
    gptq: dict[str, Any] | None = None  # GPTQResult.summary(): linears, error_rtn, error_gptq, reduction

    def to_json(self) -> dict[str, Any]:
        return {"schema": SUMMARY_SCHEMA, "output": str(self.output), "format": self.format,
                "alpha": self.alpha, "alphas": self.alphas, "mappings": self.mappings,
                "activations": self.activations, "chunks": self.chunks, "tokens": self.tokens,
                "layers": self.layers,
                "problems": [{"layer": p.layer, "linears": p.linears, "outlier_ratio": p.outlier_ratio,
                              "remedy": p.remedy} for p in self.problems],
                "kept": self.kept, "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "calibration_seconds": round(self.calibration_seconds, 3),
                "resumed_layers": self.resumed_layers, "gptq": self.gptq, "warnings": self.warnings}


def check_options(opts: SmoothOptions, warn: Callable[[str], None]) -> float | str:
    """Every option and output checked before the calibration pass: the alpha (float or 'auto')."""
    from quantcli.calibrate.smooth import MAPPING_SETS, STATIC_SCALES, check_alpha, check_channel_floor
    from quantcli.engine.w8a8 import ACTIVATION_MODES
    from quantcli.presets import get_preset, ggml_type_name

    alpha = check_alpha(opts.alpha)
    if opts.mappings not in MAPPING_SETS:
        raise UsageError(f"unknown --mappings '{opts.mappings}'; known: {', '.join(MAPPING_SETS)}")
    if opts.format not in FORMATS:
        raise UsageError(f"unknown --format '{opts.format}'; known: {', '.join(FORMATS)}")
    if opts.activations not in ACTIVATION_MODES:
        raise UsageError(f"unknown --activations '{opts.activations}'; known: {', '.join(ACTIVATION_MODES)}")
    if opts.static_scales is not None and opts.static_scales not in STATIC_SCALES:
        raise UsageError(f"unknown --static-scales '{opts.static_scales}'; known: {', '.join(STATIC_SCALES)}")
    if opts.chunks < 1 or opts.ctx < 1:
        raise UsageError("--chunks and --ctx must be positive")
    if not CHUNK_RANGE[0] <= opts.chunks <= CHUNK_RANGE[1]:
        warn(f"{opts.chunks} chunks is outside the recommended {CHUNK_RANGE[0]}-{CHUNK_RANGE[1]}")
    if opts.channel_floor is not None:
        check_channel_floor(opts.channel_floor, "--channel-floor")
    if not opts.problem_error > 0:
        raise UsageError(f"the problem-layer threshold must be positive, got {opts.problem_error}")
    if opts.format == "gguf":
        get_preset(opts.type)
    if opts.gptq and opts.format != "compressed-tensors":
        raise UsageError("--gptq rounds the int8 per-channel weights of --format compressed-tensors; "
                         "a GGUF's types are rounded by ggml's own codecs",
                         hint="add --format compressed-tensors, or drop --gptq")
    if opts.gptq and opts.ray is not None:
        raise UsageError("--gptq rounds each layer where its inputs' statistics are gathered, on one "
                         "machine: drop --ray or --gptq")
    if opts.keep_problem_layers is not None:
        ggml_type_name(opts.keep_problem_layers, "--keep-problem-layers type")
        if opts.format == "compressed-tensors" and opts.keep_problem_layers.upper() not in ("F16", "BF16", "F32"):
            raise UsageError("with --format compressed-tensors, problem layers stay unquantized: "
                             f"--keep-problem-layers takes F16, BF16 or F32, not {opts.keep_problem_layers}")
    inputs = [opts.model, opts.calib]
    if opts.format == "gguf":
        check_output(opts.output, inputs, opts.force)
    else:
        from quantcli.pipelines.compressed_tensors import check_output_dir

        check_output_dir(Path(opts.output), [Path(i) for i in inputs], opts.force)
    for extra in (opts.scales_out, opts.plot):
        if extra is not None:
            check_output(Path(extra), inputs, opts.force)
    if opts.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib", hint="pip install 'quantcli[plot]'") from None
    return alpha


def calibration_tokens(reader: Any, path: Path, ctx: int) -> np.ndarray:
    """The calibration text's tokens (BOS first, llama-imatrix's tokenization); refuses a text that
    cannot fill the two chunks of `ctx` llama-imatrix asks for."""
    from quantcli.engine.tokenizer import Tokenizer

    text = read_text(path)
    if not text.strip():
        raise InputError(f"{path}: the calibration text is empty")
    tokens = np.asarray(Tokenizer.from_model(reader).encode(text, add_special=True, parse_special=False))
    if len(tokens) < 2 * ctx:
        raise InputError(f"{path}: the calibration text gives {len(tokens)} tokens; --ctx {ctx} needs at "
                         f"least {2 * ctx}", hint="use a longer text or a smaller --ctx")
    return tokens


def gguf_types(reader: Any, opts: SmoothOptions) -> dict[str, str] | None:
    """For a GGUF output whose plan quantizes the block linears, with dynamic activations (what
    llama.cpp's kernels do: each input rounded in blocks), each linear's planned type: the
    `--alpha auto` search is then for those kernels on that file. None otherwise: the W8A8
    simulation of --activations (compressed-tensors, a float GGUF, or static activations asked
    for, which is another engine than llama.cpp)."""
    if opts.format != "gguf" or opts.activations != "dynamic":
        return None
    from quantcli.engine.model import LINEARS
    from quantcli.names import layer_of
    from quantcli.plan import PlanOptions, make_plan
    from quantcli.presets import is_quantized

    plan = make_plan(reader, PlanOptions(preset=opts.type, allow_requantize=opts.allow_requantize,
                                         source=Path(opts.model)), has_imatrix=False)
    types = {p.info.name: p.type for p in plan.tensors
             if layer_of(p.info.name) is not None and p.info.name.split(".")[2] in LINEARS}
    return types if any(is_quantized(t) for t in types.values()) else None


def problems_of(result: Any, threshold: float, opts: SmoothOptions, alpha: float | str) -> list[Problem]:
    """The layers where a smoothed linear's simulated W8A8 error stays above `threshold`, with why
    (the outlier ratio left in its input) and what to do about it."""
    from quantcli.engine.w8a8 import mode_of

    out = []
    for il, layer in result.layers.items():
        bad = {f"blk.{il}.{k}.weight": v for k, v in layer.error_after.items() if v > threshold}
        if not bad:
            continue
        ratios = {m.name: round(layer.outlier_ratio(m, result.config, after=True), 2) for m in result.mappings
                  if any(f"blk.{il}.{c}.weight" in bad for c in m.consumers)}
        remedies = []
        if opts.activations != "dynamic":
            remedies.append("per-token activations (--activations dynamic)")
        if opts.activations == "static" and any(mode_of("hybrid", k) == "token" for k in bad):
            remedies.append("ffn_down's per token (--activations hybrid)")
        if alpha != "auto":
            remedies.append("--alpha auto")
        if opts.mappings != "all":
            remedies.append("--mappings all")
        remedies.append("keeping these linears at higher precision (--keep-problem-layers F16)")
        out.append(Problem(il, {k: round(v, 6) for k, v in bad.items()}, ratios, "try " + ", or ".join(remedies)))
    return out


def layer_rows(result: Any) -> list[dict[str, Any]]:
    """Per layer: alpha, each mapping's outlier ratio before/after, each linear's error before/after."""
    rows = []
    for il, layer in sorted(result.layers.items()):
        rows.append({
            "layer": il, "alpha": _num(layer.alpha), "alphas": {m.name: _num(layer.alpha_of(m)) for m in result.mappings},
            "outlier_ratio": {m.name: {"before": _num(layer.outlier_ratio(m, result.config)),
                                       "after": _num(layer.outlier_ratio(m, result.config, after=True))}
                              for m in result.mappings},
            "error": {f"blk.{il}.{k}.weight": {"before": _num(layer.error_before[k]), "after": _num(v)}
                      for k, v in layer.error_after.items()},
        })
    return rows


def scales_json(result: Any, opts: SmoothOptions, calib_sha: str, problems: list[Problem],
                layer_table: list[dict[str, Any]]) -> dict[str, Any]:
    """The --scales-out document (schema quantcli.smooth-scales/1, in the README): per layer and
    mapping, the smoothing scales s (activations are divided by s, the consumers' weight columns
    multiplied by it) and the per-channel maxima of the activations and weights before and after;
    `layer_table` is layer_rows(result)."""
    layers = []
    rows = {r["layer"]: r for r in layer_table}
    for il, layer in sorted(result.layers.items()):
        maps = {}
        for m in result.mappings:
            a_before = layer.channel_max(m, result.config)
            maps[m.name] = {
                "source": f"blk.{il}.{m.source}.weight",
                "consumers": [f"blk.{il}.{c}.weight" for c in m.consumers],
                "per_head_group": m.heads,
                "alpha": _num(layer.alpha_of(m)),
                "scales": _floats(layer.scales[m.name]),
                "act_max_before": _floats(a_before),
                "act_max_after": _floats(a_before / layer.scales[m.name]),
                "weight_max_before": _floats(layer.weight_max[m.name]) if m.name in layer.weight_max else None,
                "weight_max_after": _floats(layer.weight_max_after(m)) if m.name in layer.weight_max else None,
                "outlier_ratio": rows[il]["outlier_ratio"][m.name],
            }
        layers.append({"layer": il, "alpha": _num(layer.alpha),
                       "alpha_grid_errors": {k: _floats(v) for k, v in layer.alpha_errors.items()} or None,
                       "static_max": {f"blk.{il}.{k}.weight": _num(v) for k, v in layer.static_max.items()} or None,
                       "mappings": maps, "error": rows[il]["error"]})
    return {"schema": SCALES_SCHEMA, "model": str(opts.model),
            "calibration": {"file": str(opts.calib), "sha256": calib_sha, "ctx": opts.ctx},
            "alpha": result.alpha, "mappings": [m.name for m in result.mappings],
            "activations": opts.activations, "channel_floor": result.channel_floor,
            "static_scales": result.static_scales if opts.activations != "dynamic" else None,
            "problem_error": opts.problem_error, "problems": [p.layer for p in problems], "layers": layers}


def _floats(a: np.ndarray) -> list[float]:
    return [float(f"{x:.6g}") for x in np.asarray(a, np.float64).tolist()]


def _num(x: float) -> float | None:
    return float(f"{x:.6g}") if np.isfinite(x) else None


def recipe(result: Any, opts: SmoothOptions, calib_sha: str, n_chunks: int, kept: list[str]) -> dict[str, Any]:
    """The smoothing's provenance as `quantcli.smooth.*` metadata (see the module docstring)."""
    act_max, static = result.act_max(), result.static_max()
    names = sorted(act_max)
    meta = {
        "smooth.alpha": str(result.alpha),
        "smooth.alphas": [float(result.layers[il].alpha) for il in sorted(result.layers)],
        "smooth.mappings": [m.name for m in result.mappings],
        "smooth.activations": opts.activations,
        "smooth.channel_floor": float(result.channel_floor),
        "smooth.calibration.file": Path(opts.calib).name,
        "smooth.calibration.sha256": calib_sha,
        "smooth.calibration.chunks": n_chunks,
        "smooth.calibration.ctx": opts.ctx,
        "smooth.kept": kept or None,
        "smooth.weights": "gptq" if opts.gptq else None,  # compressed-tensors' int8, --gptq
        "smooth.keep_type": opts.keep_problem_layers.upper() if kept and opts.keep_problem_layers else None,
        "smooth.input_max.names": names,
        "smooth.input_max.values": np.array([act_max[n] for n in names], "<f4"),
    }
    for m in result.mappings:
        meta[f"smooth.alphas.{m.name}"] = [float(result.layers[il].alpha_of(m)) for il in sorted(result.layers)]
    if static:
        meta["smooth.static_scales"] = result.static_scales
        meta["smooth.static_max.names"] = sorted(static)
        meta["smooth.static_max.values"] = np.array([static[n] for n in sorted(static)], "<f4")
    return meta


def recorded_kept(kv: dict[str, Any]) -> frozenset[str]:
    """The linears a smoothed GGUF keeps out of int8 (`quantcli.smooth.kept`; empty when none)."""
    field = kv.get("quantcli.smooth.kept")
    return frozenset(str(n) for n in field.value) if field is not None else frozenset()


def recorded_input_max(kv: dict[str, Any]) -> dict[str, float] | None:
    """The max|x| of each linear's static activation scale that a smoothed GGUF records: its
    static scales (`quantcli.smooth.static_max.*`, smoothed for static activations), else its
    calibration maxima (`quantcli.smooth.input_max.*`); None when it records neither."""
    for key in ("quantcli.smooth.static_max", "quantcli.smooth.input_max"):
        names, values = kv.get(key + ".names"), kv.get(key + ".values")
        if names is None or values is None:
            continue
        names = [str(n) for n in names.value]
        values = np.asarray(values.value, np.float64).tolist()
        if len(names) != len(values):
            raise InputError(f"{key}: names and values differ in length")
        return dict(zip(names, values))
    return None


def run(opts: SmoothOptions, progress: ProgressFn | None = None,
        warn: Callable[[str], None] | None = None) -> SmoothRunResult:
    from quantcli.calibrate.gptq import GPTQObserver
    from quantcli.calibrate.runner import RunOptions, run_calibration
    from quantcli.calibrate.smooth import SmoothedReader, SmoothObserver, mappings_for
    from quantcli.engine.model import Model, LINEARS
    from quantcli.engine.w8a8 import ACTIVATION_MODES

    warnings, warn_ = collect_warnings(warn)

    start = time.perf_counter()
    alpha = check_options(opts, warn_)
    cluster.require_ray(opts.ray)
    ckpt = Path(opts.checkpoint_dir or checkpoint.default_dir(Path(opts.output)))
    with open_source(opts.model, warn_) as reader:
        arch = reader.kv.get("general.architecture")
        if arch is not None:  # an architecture without known mappings fails here, with SmoothQuant's words
            mappings_for(str(arch.value), opts.mappings)
        model = Model(reader)
        tokens = calibration_tokens(reader, opts.calib, opts.ctx)
        calib_sha = file_sha256(Path(opts.calib))
        n_chunks = min(opts.chunks, len(tokens) // opts.ctx)
        if n_chunks < opts.chunks:
            warn_(f"the text holds only {n_chunks} chunk(s) of {opts.ctx} tokens; using {n_chunks} "
                  f"instead of {opts.chunks}")
        run_opts = RunOptions(ctx=opts.ctx, chunks=opts.chunks, checkpoint_dir=ckpt / "calibration",
                              keep_checkpoints=True, kind="smooth")
        t0 = time.perf_counter()
        obs = SmoothObserver(alpha=alpha, mappings=opts.mappings, activations=ACTIVATION_MODES[opts.activations],
                             static_scales=opts.static_scales, channel_floor=opts.channel_floor,
                             weight_types=gguf_types(reader, opts) if alpha == "auto" else None)  # see gguf_types
        gptq_obs = GPTQObserver() if opts.gptq else None  # after obs: it sees the layer as obs folded it
        if opts.ray is not None:  # the same statistics from shards of the chunks on a Ray cluster
            from quantcli.calibrate.runner import make_chunks

            resumed = cluster.smooth(opts.model, model, make_chunks(model, tokens, run_opts), obs,
                                     run_opts.checkpoint_dir, opts.ray, progress, warn_)
        else:
            observers = [obs] + ([gptq_obs] if gptq_obs is not None else [])
            resumed = run_calibration(model, tokens, run_opts, observers, progress, warn_).resumed_layers
        result = obs.result()
        gptq = gptq_obs.result() if gptq_obs is not None else None
        calibration_seconds = time.perf_counter() - t0
        problems = problems_of(result, opts.problem_error, opts, alpha)
        kept = [n for p in problems for n in p.linears] if opts.keep_problem_layers else []
        if opts.format == "compressed-tensors":  # vLLM runs q/k/v and gate/up as one matmul, one scheme
            from quantcli.pipelines.compressed_tensors import with_fused

            kept = [n for n in with_fused(kept) if n in reader.tensors]
        kept = sorted(kept)
        smoothed = SmoothedReader(reader, result)
        meta = recipe(result, opts, calib_sha, n_chunks, kept)
        if opts.format == "gguf":
            nbytes = _write_gguf(opts, smoothed, meta, kept, ckpt, progress, warn_)
        else:
            linears = [f"blk.{il}.{short}.weight" for il in range(model.config.n_layer) for short in LINEARS
                       if f"blk.{il}.{short}.weight" in reader.tensors]
            nbytes = _write_compressed_tensors(opts, reader, smoothed, meta, [n for n in linears if n not in kept],
                                               result.static_max() or result.act_max(), progress, warn_,
                                               gptq.weights if gptq is not None else None, ckpt, calib_sha)
    rows = layer_rows(result)
    doc = scales_json(result, opts, calib_sha, problems, rows) if opts.scales_out or opts.plot else None
    if opts.scales_out is not None:
        try:
            with atomic_write(Path(opts.scales_out)) as fh:
                fh.write((json.dumps(doc, indent=1) + "\n").encode())
        except OSError as exc:
            raise OutputError(f"{opts.scales_out}: cannot write the scales: {describe(exc)}") from None
    if opts.plot is not None:
        from quantcli.pipelines.smooth_plot import plot_maxima

        plot_maxima(doc, Path(opts.plot))
    if not opts.keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    return SmoothRunResult(
        output=Path(opts.output), format=opts.format, alpha=result.alpha,
        alphas=[_num(result.layers[il].alpha) for il in sorted(result.layers)],
        mappings=[m.name for m in result.mappings], activations=opts.activations, chunks=n_chunks,
        tokens=n_chunks * opts.ctx, layers=rows, problems=problems, kept=kept, bytes=nbytes,
        seconds=time.perf_counter() - start, calibration_seconds=calibration_seconds,
        resumed_layers=resumed, warnings=warnings,
        gptq=_gptq_summary(gptq, kept) if gptq is not None else None)


def _gptq_summary(gptq: Any, kept: list[str]) -> dict[str, Any]:
    """GPTQ's output errors against RTN's over the linears written as int8 (not the kept ones)."""
    from quantcli.calibrate.gptq import GPTQResult

    written = GPTQResult({n: w for n, w in gptq.weights.items() if n not in kept},
                         {n: e for n, e in gptq.errors.items() if n not in kept})
    return written.summary()


def _write_gguf(opts: SmoothOptions, smoothed: Any, meta: dict[str, Any], kept: list[str], ckpt: Path,
                progress: ProgressFn | None, warn: Callable[[str], None]) -> int:
    """The smoothed model through the quantize pipeline (its plan, checkpoints, atomic output)."""
    from quantcli.pipelines import quantize

    overrides = tuple((re.escape(name) + "$", opts.keep_problem_layers.upper()) for name in kept)
    q = quantize.QuantizeOptions(input=Path(opts.model), output=Path(opts.output), preset=opts.type,
                                 tensor_types=overrides, allow_requantize=opts.allow_requantize,
                                 checkpoint_dir=ckpt / "quantize", keep_checkpoints=True,
                                 threads=opts.threads, force=opts.force)
    res = quantize.run(q, progress, warn, reader=smoothed, recipe=meta)
    return Path(opts.output).stat().st_size if res.output else 0


def _write_compressed_tensors(opts: SmoothOptions, reader: Any, smoothed: Any, meta: dict[str, Any],
                              linears: list[str], input_max: dict[str, float], progress: ProgressFn | None,
                              warn: Callable[[str], None], int8: dict[str, Any] | None, ckpt: Path,
                              calib_sha: str) -> int:
    from quantcli.pipelines.common import provenance, source_sha256
    from quantcli.pipelines.compressed_tensors import config_of_source, write_compressed_tensors

    header = {"quantcli.smooth": json.dumps({k[len("smooth."):]: _plain(v) for k, v in meta.items()
                                             if not k.startswith(("smooth.input_max", "smooth.static_max"))})}
    source_sha = source_sha256(reader)
    date = _first_date(ckpt, source_sha, opts, calib_sha, warn)
    header.update({k: str(v) for k, v in provenance(reader, source_sha, date).items()})
    model = Path(opts.model)
    tokenizer = opts.tokenizer or (model if model.is_dir() else None)
    res = write_compressed_tensors(
        smoothed, Path(opts.output), linears=linears, activations=opts.activations, input_max=input_max,
        source_config=config_of_source(reader), tokenizer_dir=tokenizer, metadata=header,
        force=opts.force, progress=progress, int8=int8)
    for w in res.warnings:
        warn(w)
    return res.bytes


def _first_date(ckpt: Path, source_sha: str, opts: SmoothOptions, calib_sha: str,
                warn: Callable[[str], None]) -> str:
    """The run's `quantcli.date`, kept with the checkpoints: a resumed run writes the bytes the
    first would have (the GGUF path keeps it in the quantize pipeline's checkpoints)."""
    from dataclasses import asdict

    from quantcli.checkpoint import CheckpointStore, key_json
    from quantcli.pipelines.common import kept_date

    options = {k: v for k, v in asdict(opts).items() if k not in ("force", "checkpoint_dir", "keep_checkpoints")}
    key = {"kind": "smooth-output", "source": source_sha, "calib": calib_sha, "options": key_json(options)}
    return kept_date(CheckpointStore(ckpt / "output", key, warn))


def _plain(v: Any) -> Any:
    return v.tolist() if isinstance(v, np.ndarray) else v
