"""`quantcli`: the Typer app. Each command lives in its own module and registers itself here."""

from __future__ import annotations

import gc
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


from quantcli.cli import dequantize, imatrix, quantize, report, smooth, verify, warmup  # noqa: E402,F401  (commands register on import)


def main() -> None:
    # A command is one short process: the objects its imports create (typer, numpy, numba's
    # registries) live until exit, and every full collection would rescan them (~50 ms each, plus
    # one at exit). Freeze what exists now, collect young objects less often, freeze again at exit.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    try:
        app()
    except KeyboardInterrupt:  # outside any command (e.g. during import)
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    finally:
        gc.freeze()
