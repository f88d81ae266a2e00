"""`quantcli warmup`."""

from __future__ import annotations

from typing import List, Optional

import typer

from quantcli.cli.app import app
from quantcli.cli.common import boundary, err, out, progress_bar
from quantcli.pipelines import warmup as pipeline


@app.command()
@boundary
def warmup(
    types: Optional[List[str]] = typer.Option(None, "--type", "-t",
                                              help="Only this GGML type's kernels (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Compile every kernel into numba's cache now, so later commands start warm (see README, Cold start)."""
    opts = pipeline.WarmupOptions(types=tuple(types or ()), engine=not types)
    with progress_bar(quiet, "warmup") as progress:
        result = pipeline.run(opts, progress)
    if not quiet:
        out.print(f"warmed {len(result.steps)} entry points: {result.compiled} kernels compiled, "
                  f"{result.loaded} loaded from the cache, in {result.seconds:.1f} s")
        for d in result.cache_dirs:
            err.print(f"cache: {d}")
