"""`quantcli verify FILE`: exit 0 when every check passes, 6 when one fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from quantcli.cli.app import app
from quantcli.cli.common import boundary, out
from quantcli.errors import VerificationError
from quantcli.pipelines import verify as pipeline


@app.command()
@boundary
def verify(
    file: Path = typer.Argument(..., help="GGUF (or safetensors) file to check."),
    preset: Optional[str] = typer.Option(None, "--type", "-t", help="Check every tensor's type against this preset."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="Check against this YAML layer profile."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON (schema quantcli.verify/1)."),
) -> None:
    """Integrity, plan conformance, finite weights and the size contract; for CI."""
    result = pipeline.run(pipeline.VerifyOptions(file, preset, profile))
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=1))
    else:
        for c in result.checks:
            mark = "[green]pass[/]" if c.ok else "[bold red]FAIL[/]"
            out.print(f"{mark}  {c.name:<14} {escape(c.detail)}")
    if not result.ok:
        failed = [c.name for c in result.checks if not c.ok]
        if as_json:
            raise typer.Exit(VerificationError.exit_code)
        raise VerificationError(f"{file}: verification failed: {', '.join(failed)}")
