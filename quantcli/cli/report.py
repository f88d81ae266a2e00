"""`quantcli report FILE`: a rich table by default, `--json` for machines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from quantcli.cli.app import app
from quantcli.calibrate.outliers import Outliers
from quantcli.cli.common import boundary, out, progress_bar
from quantcli.errors import UsageError
from quantcli.pipelines import imatrix_report
from quantcli.pipelines import report as pipeline


def _clipping_line(clip: dict, source: str) -> str:
    """One line on what the static activation scales clipped on the evaluated text."""
    where = {"recorded": "the file's recorded", "calib": "--calib's", "eval-text": "the eval text's own"}[source]
    if not clip["linears_clipping"]:
        return f"static scales ({where}): no input clipped on this text"
    w = clip["worst"][0]
    return (f"static scales ({where}): {clip['linears_clipping']} of {clip['linears']} linears clip some token's "
            f"input on this text ({100 * clip['clipped_share']:.2f} % of token inputs, up to "
            f"{clip['max_overshoot']:.1f}× a scale); furthest beyond: {w['linear']}, {w['clipped_tokens']} of "
            f"{w['tokens']} tokens clipped")


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
        clip = ev.get("static_clipping")
        if clip:
            out.print(_clipping_line(clip, ev["static_scales_from"]))
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


def render_imatrix(rep: imatrix_report.ImatrixReport) -> None:
    out.print(f"[bold]{escape(rep.file)}[/] (imatrix, {rep.format}): {rep.entries} entries, {rep.chunk_count} "
              f"chunks of {rep.chunk_size}" + (f", datasets: {escape(', '.join(rep.datasets))}" if rep.datasets else ""))
    found = rep.outliers
    if rep.importance is not None:
        t = Table(title="importance per layer (mean over columns, of the kind's largest layer; ffn_down: max and "
                  "its column)", pad_edge=False)
        heads = {"attn_q": "q/k/v", "attn_output": "attn_out", "ffn_up": "gate/up", "ffn_down": "down"}
        for col in ("layer", *(heads[k] for k in imatrix_report.KINDS), "down max", "col", "super weights",
                    "massive"):
            t.add_column(col, justify="left" if col in ("super weights", "massive") else "right")
        for layer in rep.layers():
            cells = [rep.cell(layer, k) for k in imatrix_report.KINDS]
            down = rep.cell(layer, "ffn_down")
            sws = [s for s in (found.super_weights if found else []) if s.layer == layer]
            massive = [m for m in (found.massive if found else []) if m.layer == layer]
            t.add_row(str(layer), *("-" if c is None else f"{c.mean_norm:.3f}" for c in cells),
                      "-" if down is None else f"{down.max:.4g}", "-" if down is None else str(down.max_channel),
                      ", ".join(f"{'[red]' if s.confirmed else ''}[{s.row}, {s.col}]{'[/]' if s.confirmed else ''}"
                                for s in sws),
                      ", ".join(f"{m.channel} ({m.value:,.0f})" for m in massive))
        out.print(t)
        rest = [r for r in rep.importance if r.layer is None]
        for r in rest:
            out.print(f"{r.name}: mean {r.mean:.4g}, max {r.max:.4g} (column {r.max_channel})")
    if found is None:
        out.print("no super-weight records (make them with: quantcli imatrix --super-weights)")
    else:
        render_super_weights(found)


def render_coherence(rep) -> None:
    t = Table(title=f"coherence against {escape(rep.base)}", pad_edge=False)
    for col in ("prompt", "KLD", "top-1", "rep4", "run", "dist2", "NLL", "H", "verdict"):
        t.add_column(col, justify="left" if col in ("prompt", "verdict") else "right")
    for r in rep.results:
        first = r.prompt.splitlines()[0] if r.prompt.strip() else r.prompt
        t.add_row(escape(first[:40]), f"{r.kld:.3f}", f"{100 * r.top1:.0f}%", f"{r.repeat4:.2f}", str(r.run),
                  f"{r.distinct2:.2f}", f"{r.base_nll:.2f}", f"{r.entropy:.1f}",
                  "ok" if r.coherent else "[red]" + escape(", ".join(r.failed)) + "[/]")
    out.print(t)
    shown = [r for r in rep.results if not r.coherent][:3] or rep.results[:2]
    for r in shown:
        out.print(f"[bold]{_one_line(r.prompt)}[/]\n  base: {_one_line(r.base_text)}\n  model: {_one_line(r.text)}")
    share = rep.coherent
    verdict = "coherent" if share >= 0.9 else "NOT coherent"
    out.print(f"{100 * share:.1f}% of {len(rep.results)} prompts coherent: {verdict} (90% needed); "
              f"{rep.seconds:.1f} s, decoding {rep.tokens_per_second:.0f} tokens/s")


def _one_line(text: str) -> str:
    """A generation on one line: its newlines shown as \\n."""
    return escape(text.replace("\n", "\\n"))


def render_super_weights(found: Outliers) -> None:
    """The super weights (confirmed, then candidates) and the massive activations."""
    if not found.super_weights:
        out.print(escape(found.none_found()))
    else:
        t = Table(title="super weights", pad_edge=False)
        for col, just in (("tensor", "left"), ("row", "right"), ("col", "right"), ("value", "right"),
                          ("spike", "right"), ("share", "right"), ("effect", "right"), ("control", "right"),
                          ("", "left")):
            t.add_column(col, justify=just)
        for s in found.super_weights:
            t.add_row(s.tensor, str(s.row), str(s.col), f"{s.value:.4g}", f"{s.spike:,.0f}x", f"{100 * s.share:.0f}%",
                      _effect(s.effect), _effect(s.control), "confirmed" if s.confirmed else "candidate")
        out.print(t)
        th = found.thresholds
        out.print(f"{len(found.confirmed)} confirmed, {len(found.candidates)} candidate(s); effect: perplexity change "
                  f"when zeroed, on {found.confirm_chunks} chunk(s) (base {found.base_perplexity:.3f}); confirmed at "
                  f">= {100 * th.min_effect:g}% and >= {th.control_factor:g}x the control ({th.control_weights} random "
                  "weights of each tested tensor zeroed)")
    if found.massive:
        by_channel: dict[int, list[int]] = {}
        for m in found.massive:
            by_channel.setdefault(m.channel, []).append(m.layer)
        peak = max(found.massive, key=lambda m: abs(m.value))
        out.print("massive activations: " + "; ".join(
            f"channel {ch} after blk.{_span(layers)}" for ch, layers in by_channel.items())
            + f" (largest {peak.value:,.0f} = {peak.ratio:,.0f}x the median, channel {peak.channel} after "
              f"blk.{peak.layer}, position {peak.position}, token {peak.token})")


def _effect(v: float) -> str:
    return "-" if v != v else f"{100 * v:+.2f}%"


def _span(layers: list[int]) -> str:
    layers = sorted(layers)
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}" if layers == list(
        range(layers[0], layers[-1] + 1)) else ",".join(map(str, layers))


@app.command()
@boundary
def report(
    file: Path = typer.Argument(..., help="GGUF file, safetensors file, Hugging Face model directory, or an "
                                "importance matrix (GGUF or .dat)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (schema quantcli.report/1)."),
    tensors: bool = typer.Option(True, "--tensors/--no-tensors", help="Include the per-tensor table."),
    eval_text: Optional[Path] = typer.Option(None, "--eval-text", help="Text for perplexity (llama-perplexity's method)."),
    ctx: int = typer.Option(512, "--ctx", "-c", help="Tokens per evaluation chunk."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="At most this many chunks."),
    base: Optional[Path] = typer.Option(None, "--base", help="Reference model for KL divergence and top-1 agreement."),
    simulate: Optional[str] = typer.Option(None, "--simulate", help="Evaluate as an int8 engine runs it: "
                                           "w8a8[:token|:tensor|:hybrid] (per-token dynamic, or per-tensor static "
                                           "activation scales: those a smoothed model records, else "
                                           "--calib's maxima, else the eval text's; hybrid: static but "
                                           "ffn_down per token)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="w8a8:tensor/hybrid: text whose maxima give the "
                                         "static scales."),
    measurement: Optional[Path] = typer.Option(None, "--measurement", help="Sensitivity measurement (JSON, quantize "
                                               "--measurement) whose estimates of each tensor's dKLD at its type "
                                               "replace the file's own."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of bits per weight and estimated dKLD per layer "
                                        "(an imatrix: of its importance per layer and the super weights; needs "
                                        "matplotlib)."),
    importance: bool = typer.Option(False, "--importance", help="An imatrix: per-layer importance of each tensor "
                                    "(mean and max over columns, normalised), with the super weights and massive "
                                    "activations."),
    coherence: bool = typer.Option(False, "--coherence", help="Does the model still talk? Its greedy continuations "
                                   "of a prompt suite against --base's (JSON schema quantcli.coherence/1)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="--coherence: prompts file (prompts between "
                                           "lines of ---; default: the shipped suite)."),
) -> None:
    """Per-tensor types and sizes, per-layer aggregates, totals and the model's metadata; the
    estimated KL divergence per tensor and layer of an automatic mix (or from --measurement);
    with --eval-text, perplexity (and KLD against --base)."""
    if prompts is not None and not coherence:
        raise UsageError("--prompts is the suite of --coherence; pass that too")
    if coherence:
        others = [n for n, v in (("--eval-text", eval_text), ("--simulate", simulate), ("--calib", calib),
                                 ("--measurement", measurement), ("--plot", plot)) if v is not None]
        if others:
            raise UsageError(f"--coherence is a report of its own; {', '.join(others)} belong to another")
        if base is None:
            raise UsageError("--coherence compares the model with its base: pass --base BASE (e.g. the F32 model "
                             "it was quantized from)")
        from quantcli.pipelines import coherence as coh

        suite = coh.load_prompts(prompts)
        with progress_bar(as_json, "coherence") as progress:
            crep = coh.check(file, base, suite, progress=progress, source=str(prompts or coh.PROMPTS))
        if as_json:
            typer.echo(json.dumps(crep.to_json(), indent=1))
        else:
            render_coherence(crep)
        return
    if imatrix_report.is_imatrix(file):
        others = [n for n, v in (("--eval-text", eval_text), ("--base", base), ("--simulate", simulate),
                                 ("--calib", calib), ("--measurement", measurement)) if v is not None]
        if others:
            raise UsageError(f"{file} is an importance matrix: {', '.join(others)} apply to models")
        irep = imatrix_report.run(file, importance, plot)
        if as_json:
            typer.echo(json.dumps(irep.to_json(), indent=1))
        else:
            render_imatrix(irep)
        return
    if importance:
        raise UsageError("--importance reports an importance matrix (imatrix --super-weights makes one); "
                         f"{file} is a model")
    if base is not None and eval_text is None:
        raise UsageError("--base needs --eval-text")
    if simulate is not None and eval_text is None:
        raise UsageError("--simulate needs --eval-text")
    if calib is not None and simulate not in ("w8a8:tensor", "w8a8:hybrid"):
        raise UsageError("--calib gives static activation scales: it needs --simulate w8a8:tensor or w8a8:hybrid")
    evaluation = pipeline.EvalOptions(eval_text, ctx, chunks, base, simulate, calib) if eval_text else None
    with progress_bar(as_json or evaluation is None, "evaluate") as progress:
        rep = pipeline.run(file, evaluation, progress, measurement=measurement, plot=plot)
    if as_json:
        typer.echo(json.dumps(rep.to_json(), indent=1))
    else:
        render(rep, tensors)
