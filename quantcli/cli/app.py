"""`quantcli`: the Typer app. Each command lives in its own module and registers itself here."""

from __future__ import annotations

import sys

import typer

import quantcli

app = typer.Typer(
    name="quantcli",
    help="Quantize LLMs to GGUF: llama.cpp's bytes, plus mixes, profiles, resumable runs and a verifier.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"quantcli {quantcli.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """quantcli: quantize, inspect and verify GGUF models."""


from quantcli.cli import dequantize, imatrix, quantize, report, verify  # noqa: E402,F401  (commands register on import)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # outside any command (e.g. during import)
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
