"""`quantcli dequantize IN OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer
from rich.markup import escape

from quantcli.cli.app import app
from quantcli.cli.common import boundary, err, lora_specs, progress_bar
from quantcli.pipelines import dequantize as pipeline


@app.command()
@boundary
def dequantize(
    input: Path = typer.Argument(..., help="GGUF file, safetensors file or Hugging Face model directory."),
    output: Path = typer.Argument(..., help="Output file (.gguf or .safetensors)."),
    out_type: str = typer.Option("F32", "--type", "-t", help="F32, F16 or BF16."),
    out_format: str = typer.Option(None, "--format", help="gguf or safetensors (default: from OUT's suffix)."),
    lora: List[Path] = typer.Option([], "--lora", help="Merge this LoRA adapter (a PEFT directory or a llama.cpp "
                                    "GGUF adapter) into the weights (repeatable)."),
    lora_scale: List[float] = typer.Option([], "--lora-scale", help="Scale S of each --lora, in order "
                                           "(W + S * alpha/r * B A; default 1)."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite OUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Decode every tensor to F32 (or F16/BF16) and write GGUF or safetensors; with --lora, the
    base with its adapters merged."""
    opts = pipeline.DequantizeOptions(input, output, out_type, out_format, force, lora_specs(lora, lora_scale))
    with progress_bar(quiet, "dequantize") as progress:
        result = pipeline.run(opts, progress, lambda msg: err.print(f"[yellow]warning:[/] {escape(msg)}"))
    if not quiet:
        err.print(f"wrote {result.output} ({result.out_format}, {result.tensors} tensors, "
                  f"{result.bytes_written / 1e6:.1f} MB) in {result.seconds:.1f} s")
