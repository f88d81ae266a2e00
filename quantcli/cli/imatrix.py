"""`quantcli imatrix MODEL --text FILE -o OUT`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from quantcli.cli.app import app
from quantcli.cli.common import boundary, err, ray_option
from quantcli.cli.report import render_super_weights
from quantcli.pipelines import imatrix as pipeline


@app.command()
@boundary
def imatrix(
    model: Path = typer.Argument(..., help="GGUF model (any type) to calibrate."),
    text: Optional[Path] = typer.Option(None, "--text", "-f", help="Calibration text (UTF-8)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output imatrix file."),
    chunks: int = typer.Option(pipeline.DEFAULT_CHUNKS, "--chunks", help="Chunks of --ctx tokens (128-1024 recommended)."),
    ctx: int = typer.Option(512, "--ctx", "-c", help="Tokens per chunk."),
    output_format: str = typer.Option("gguf", "--output-format", help="gguf (llama.cpp's default) or dat (legacy)."),
    in_file: List[Path] = typer.Option([], "--in-file", help="Merge these imatrix files (repeatable)."),
    process_output: bool = typer.Option(False, "--process-output", help="Also collect output.weight."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Layer checkpoints (default: OUT.checkpoints)."),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help="Keep checkpoints after success."),
    super_weights: bool = typer.Option(False, "--super-weights", help="Also find super weights and massive "
                                       "activations, confirm each by zeroing it, and record them in OUT."),
    ray: bool = typer.Option(False, "--ray", help="Run blocks of 16 chunks as tasks on a Ray cluster ($RAY_ADDRESS's, "
                             "else one started here); the sums are added in block order: the same file as a local run "
                             "with the same BLAS threads."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="The cluster for --ray: auto, "
                                              "ray://HOST:PORT or HOST:PORT."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Importance matrix (llama-imatrix's statistic) from a calibration text; resumable per layer."""
    opts = pipeline.ImatrixRunOptions(model, text, output, chunks, ctx, output_format, tuple(in_file),
                                      process_output, checkpoint_dir, keep_checkpoints, force, super_weights,
                                      ray_option(ray, ray_address))

    def warn(msg: str) -> None:
        if not quiet and not as_json:
            err.print(f"[yellow]warning:[/] {escape(msg)}")

    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    show = not (quiet or as_json) and sys.stderr.isatty()
    bar = Progress(TextColumn("[bold]imatrix"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[name]}", style="dim"),
                   console=err, transient=True, disable=not show)
    task = bar.add_task("imatrix", total=None, name="", rate="")
    started = {}

    def progress(step) -> None:
        import time

        started.setdefault("t", time.perf_counter())
        rate = ""
        if step.stage == "layer" and step.done:
            tokens = step.done * chunks * ctx / max(step.total, 1)
            rate = f"{tokens / (time.perf_counter() - started['t']):.0f} tok/s"
        bar.update(task, total=step.total, completed=step.done, name=f"{step.stage} {step.name}", rate=rate)

    with bar:
        result = pipeline.run(opts, progress, warn)
    summary = {"output": str(output), "entries": len(result.imatrix.entries), "chunks": result.chunks,
               "tokens": result.tokens, "seconds": round(result.seconds, 3),
               "tokens_per_second": round(result.tokens_per_second, 1), "resumed_layers": result.resumed_layers}
    found = result.imatrix.outliers if super_weights else None
    if found is not None:
        summary["super_weights"] = found.to_json()
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
    elif not quiet:
        err.print(f"wrote {output}: {summary['entries']} entries from {result.chunks} chunks "
                  f"({result.tokens} tokens, {summary['tokens_per_second']} tok/s)"
                  + (f", resumed {result.resumed_layers} layers" if result.resumed_layers else ""))
        if found is not None:
            render_super_weights(found)
