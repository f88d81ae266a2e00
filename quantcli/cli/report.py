"""`quantcli report FILE`: a rich table by default, `--json` for machines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from quantcli.cli.app import app
from quantcli.cli.common import boundary, out, progress_bar
from quantcli.errors import UsageError
from quantcli.pipelines import report as pipeline


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def _kld(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def render(rep: pipeline.Report, show_tensors: bool) -> None:
    meta = rep.metadata
    est = rep.estimates is not None
    kld_col = [("est. dKLD", "right")] if est else []
    out.print(f"[bold]{rep.file}[/] ({rep.format})")
    out.print("  ".join(f"{k}: [cyan]{v}[/]" for k, v in meta.items() if v is not None))
    if show_tensors:
        t = Table(title="tensors", show_lines=False, pad_edge=False)
        cols = [("name", "left"), ("shape", "left"), ("type", "left"), ("params", "right"), ("MB", "right"),
                ("bpw", "right")] + kld_col
        for col, just in cols:
            t.add_column(col, justify=just)
        for r in rep.tensors:
            t.add_row(r.name, "×".join(map(str, r.shape)), r.type, f"{r.params:,}", _mb(r.bytes),
                      f"{r.bpw:.2f}", *([_kld(r.estimated_kld)] if est else []))
        out.print(t)
    if rep.layers:
        t = Table(title="layers", pad_edge=False)
        cols = [("layer", "right"), ("tensors", "right"), ("params", "right"), ("MB", "right"),
                ("share", "right"), ("bpw", "right")] + kld_col + [("types", "left")]
        for col, just in cols:
            t.add_column(col, justify=just)
        embd = [g for g in rep.outside_layers if g.name == "embd"]
        for r in [*embd, *rep.layers, *(g for g in rep.outside_layers if g.name != "embd")]:
            label = str(r.layer) if isinstance(r, pipeline.LayerRow) else r.name
            t.add_row(label, str(r.tensors), f"{r.params:,}", _mb(r.bytes), f"{100 * r.share:.1f}%",
                      f"{r.bpw:.2f}", *([_kld(r.estimated_kld)] if est else []),
                      ", ".join(f"{k}×{v}" for k, v in r.types.items()))
        out.print(t)
    tot = rep.totals
    t = Table(title="totals by type", pad_edge=False)
    for col, just in (("type", "left"), ("tensors", "right"), ("params", "right"), ("MB", "right")):
        t.add_column(col, justify=just)
    for name, v in tot.types.items():
        t.add_row(name, str(v["tensors"]), f"{v['params']:,}", _mb(v["bytes"]))
    out.print(t)
    ev = rep.evaluation
    if ev:
        sim = f" as {ev['simulate']}" if ev.get("simulate") else ""
        line = (f"perplexity{sim} {ev['perplexity']:.4f} ± {ev['perplexity_error']:.4f} on {ev['tokens']} tokens "
                f"({ev['chunks']} chunks of {ev['ctx']}, {ev['tokens_per_second']} tok/s)")
        if ev.get("kld_mean") is not None:
            line += (f"; vs base: KLD mean {ev['kld_mean']:.6f}, p99 {ev['kld_p99']:.6f}, "
                     f"top-1 agreement {100 * ev['top1_agreement']:.2f}%")
        out.print(line)
    alloc = rep.allocation
    if alloc:
        out.print(f"automatic mix: target {alloc['target']}, estimated KLD {_kld(alloc['estimate_kld'])}")
    if est:
        src = rep.estimates
        line = f"estimated KLD {_kld(tot.estimated_kld)} (sum over tensors, from "
        line += "the file's allocation metadata)" if src["source"] == "metadata" else f"{src['measurement']})"
        unknown = sum(r.estimated_kld is None for r in rep.tensors)
        if unknown:
            line += f"; {unknown} tensor(s) without an estimate at their type"
        if src["source"] == "measurement" and alloc and alloc.get("measurement_sha256") not in (
                None, src["measurement_sha256"]):
            line += "; not the measurement the mix was made from"
        out.print(line)
    out.print(f"total: {tot.tensors} tensors, {tot.params:,} params, {_mb(tot.bytes)} MB, "
              f"{tot.bpw:.3f} bpw, {tot.ratio_vs_f16:.2f}× smaller than F16, "
              f"{tot.ratio_vs_f32:.2f}× smaller than F32")


@app.command()
@boundary
def report(
    file: Path = typer.Argument(..., help="GGUF file, safetensors file or Hugging Face model directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (schema quantcli.report/1)."),
    tensors: bool = typer.Option(True, "--tensors/--no-tensors", help="Include the per-tensor table."),
    eval_text: Optional[Path] = typer.Option(None, "--eval-text", help="Text for perplexity (llama-perplexity's method)."),
    ctx: int = typer.Option(512, "--ctx", "-c", help="Tokens per evaluation chunk."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="At most this many chunks."),
    base: Optional[Path] = typer.Option(None, "--base", help="Reference model for KL divergence and top-1 agreement."),
    simulate: Optional[str] = typer.Option(None, "--simulate", help="Evaluate as an int8 engine runs it: "
                                           "w8a8[:token|:tensor] (per-token dynamic, or per-tensor static "
                                           "activation scales: those a smoothed model records, else "
                                           "--calib's maxima, else the eval text's)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="w8a8:tensor: text whose maxima give the static scales."),
    measurement: Optional[Path] = typer.Option(None, "--measurement", help="Sensitivity measurement (JSON, quantize "
                                               "--measurement) whose estimates of each tensor's dKLD at its type "
                                               "replace the file's own."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of bits per weight and estimated dKLD per layer (needs matplotlib)."),
) -> None:
    """Per-tensor types and sizes, per-layer aggregates, totals and the model's metadata; the
    estimated KL divergence per tensor and layer of an automatic mix (or from --measurement);
    with --eval-text, perplexity (and KLD against --base)."""
    if base is not None and eval_text is None:
        raise UsageError("--base needs --eval-text")
    if simulate is not None and eval_text is None:
        raise UsageError("--simulate needs --eval-text")
    if calib is not None and simulate != "w8a8:tensor":
        raise UsageError("--calib gives static activation scales: it needs --simulate w8a8:tensor")
    evaluation = pipeline.EvalOptions(eval_text, ctx, chunks, base, simulate, calib) if eval_text else None
    with progress_bar(as_json or evaluation is None, "evaluate") as progress:
        rep = pipeline.run(file, evaluation, progress, measurement=measurement, plot=plot)
    if as_json:
        typer.echo(json.dumps(rep.to_json(), indent=1))
    else:
        render(rep, tensors)
