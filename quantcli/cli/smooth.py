"""`quantcli smooth MODEL -o OUT --calib TEXT`: SmoothQuant for W8A8 engines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from quantcli.cli.app import app
from quantcli.cli.common import boundary, err, out, progress_bar, ray_option
from quantcli.pipelines import smooth as pipeline


def _alpha(row: dict) -> str:
    """A layer's alpha: one number, "as is", or each mapping's (a/b/c/d, in table order, "-" for
    one left as it is) where they differ."""
    alphas = list(row["alphas"].values())
    if len(set(alphas)) > 1:
        return "/".join("-" if a is None else f"{a:.2f}" for a in alphas)
    return "as is" if alphas[0] is None else f"{alphas[0]:.2f}"


def render(result: pipeline.SmoothRunResult) -> None:
    """Per layer: alpha, the worst input's outlier ratio before -> after, the worst linear's error."""
    t = Table(title=f"SmoothQuant, alpha {result.alpha}, {result.activations} int8 activations",
              pad_edge=False)
    for col, just in (("layer", "right"), ("alpha", "right"), ("outliers max/median", "right"),
                      ("W8A8 error before", "right"), ("after", "right"), ("", "left")):
        t.add_column(col, justify=just)
    problems = {p.layer for p in result.problems}
    for row in result.layers:
        ratios = [v for v in row["outlier_ratio"].values() if v["before"] is not None]
        worst = max(ratios, key=lambda v: v["before"], default=None)
        errs = list(row["error"].values())
        before = max((e["before"] or 0.0) for e in errs)
        after = max((e["after"] or 0.0) for e in errs)
        t.add_row(str(row["layer"]), _alpha(row),
                  f"{worst['before']:.0f} -> {worst['after']:.1f}" if worst else "-",
                  f"{before:.2e}", f"{after:.2e}", "[red]problem[/]" if row["layer"] in problems else "")
    out.print(t)
    for p in result.problems:
        worst = max(p.linears, key=p.linears.get)
        ratios = ", ".join(f"{k} {v:g}" for k, v in p.outlier_ratio.items())
        err.print(f"[yellow]problem layer {p.layer}:[/] {escape(worst)} keeps a W8A8 error of "
                  f"{p.linears[worst]:.2e} (outlier ratio left: {escape(ratios)}); {escape(p.remedy)}")
    if result.kept:
        err.print(f"kept {len(result.kept)} linear(s) of the problem layers unquantized-to-int8")
    if result.gptq is not None:
        g = result.gptq
        err.print(f"GPTQ rounded {g['linears']} linear(s): their weights' output error on the calibration "
                  f"text {g['error_rtn']:.4g} (round to nearest) -> {g['error_gptq']:.4g} "
                  f"({100 * g['reduction']:.0f} % less)")


@app.command()
@boundary
def smooth(
    model: Path = typer.Argument(..., help="GGUF, safetensors file or Hugging Face directory (F32/F16/BF16)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output GGUF file, or directory for compressed-tensors."),
    calib: Path = typer.Option(..., "--calib", help="Calibration text (UTF-8)."),
    alpha: str = typer.Option("0.5", "--alpha", help="Migration strength in [0, 1], or 'auto' (searched per layer)."),
    mappings: str = typer.Option("norm", "--mappings", help="norm (norm->q/k/v, norm->gate/up) or all (also v->o, up->down)."),
    chunks: int = typer.Option(pipeline.DEFAULT_CHUNKS, "--chunks", help="Chunks of --ctx tokens (128-1024 recommended)."),
    ctx: int = typer.Option(512, "--ctx", "-c", help="Tokens per chunk."),
    fmt: str = typer.Option("gguf", "--format", help="gguf (through the quantize pipeline) or compressed-tensors (vLLM W8A8)."),
    preset: str = typer.Option("Q8_0", "--type", "-t", help="GGUF preset for the smoothed model."),
    activations: str = typer.Option("dynamic", "--activations", help="int8 activations: dynamic (per token), static (per tensor), or hybrid (static, ffn_down per token)."),
    static_scales: Optional[str] = typer.Option(None, "--static-scales", help="static activations: mse (clipped maxima, llm-compressor's mse observer) or max (default: mse for static, max for hybrid)."),
    channel_floor: Optional[float] = typer.Option(None, "--channel-floor", help="Raise each channel's activation "
                                                  "maximum to this quantile of its input's before computing s (0: "
                                                  "SmoothQuant's formula; default 0.75 for --alpha auto with dynamic "
                                                  "activations and a float or compressed-tensors output, else 0)."),
    scales_out: Optional[Path] = typer.Option(None, "--scales-out", help="Per-layer, per-channel scales and maxima as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of per-channel activation maxima before/after (needs matplotlib)."),
    keep_problem_layers: Optional[str] = typer.Option(None, "--keep-problem-layers", help="Type (e.g. F16) for the linears of problem layers."),
    problem_error: float = typer.Option(pipeline.PROBLEM_ERROR, "--problem-error", help="Simulated W8A8 error above which a layer is a problem."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="compressed-tensors: directory whose tokenizer files to copy."),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help="Accept an already quantized model."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Layer checkpoints (default: OUT.checkpoints)."),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help="Keep checkpoints after success."),
    threads: int = typer.Option(0, "--threads", "-j", help="Quantization threads (0: all cores)."),
    gptq: bool = typer.Option(False, "--gptq", help="compressed-tensors: round the int8 weights with GPTQ "
                              "on the calibration inputs, not to nearest."),
    ray: bool = typer.Option(False, "--ray", help="Gather the statistics on a Ray cluster ($RAY_ADDRESS's, else one "
                             "started on this machine); the model must be on storage every worker sees."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="The cluster for --ray: auto, "
                                              "ray://HOST:PORT or HOST:PORT."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite outputs that exist."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary (schema quantcli.smooth/1)."),
) -> None:
    """SmoothQuant: move activation outliers into the weights (an exact transform) for W8A8 engines."""
    opts = pipeline.SmoothOptions(
        model=model, output=output, calib=calib, alpha=alpha, mappings=mappings, chunks=chunks, ctx=ctx,
        format=fmt, type=preset, activations=activations, static_scales=static_scales, channel_floor=channel_floor,
        scales_out=scales_out, plot=plot,
        keep_problem_layers=keep_problem_layers, problem_error=problem_error, tokenizer=tokenizer,
        allow_requantize=allow_requantize, checkpoint_dir=checkpoint_dir, keep_checkpoints=keep_checkpoints,
        threads=threads, force=force, ray=ray_option(ray, ray_address), gptq=gptq)

    def warn(msg: str) -> None:
        if not quiet and not as_json:
            err.print(f"[yellow]warning:[/] {escape(msg)}")

    with progress_bar(quiet or as_json, "smooth") as progress:
        result = pipeline.run(opts, progress, warn)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=1))
    elif not quiet:
        render(result)
        err.print(f"wrote {result.output} ({result.format}, {result.bytes / 1e6:.1f} MB): alpha "
                  f"{result.alpha}, {len(result.mappings)} mappings, {result.chunks} chunks, "
                  f"{result.seconds:.1f} s (calibration {result.calibration_seconds:.1f} s)"
                  + (f", resumed {result.resumed_layers} layers" if result.resumed_layers else ""))
