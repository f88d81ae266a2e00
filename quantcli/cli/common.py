"""What every command shares: consoles, the error boundary, progress rendering."""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from quantcli.errors import Interrupted, QuantcliError
from quantcli.formats.atomic import remove_stray_temps
from quantcli.progress import Progress as Step

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable)


def report_error(exc: QuantcliError) -> int:
    """One red line (and a hint line) on stderr; returns the exit code."""
    err.print(f"[bold red]error:[/] {escape(exc.message)}")
    if exc.hint:
        err.print(f"[dim]hint: {escape(exc.hint)}[/]")
    return exc.exit_code


def boundary(fn: F) -> F:
    """The error boundary: a QuantcliError or Ctrl-C becomes a message and an exit code, never a
    traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QuantcliError as exc:
            raise typer.Exit(report_error(exc)) from None
        except KeyboardInterrupt:
            remove_stray_temps()  # a Ctrl-C between a temp file's creation and its cleanup's reach
            raise typer.Exit(report_error(Interrupted("interrupted; no output was written"))) from None
        except MemoryError:
            err.print("[bold red]error:[/] out of memory")
            raise typer.Exit(4) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress_bar(quiet: bool, label: str) -> Iterator[Callable[[Step], None] | None]:
    """A rich progress bar on a terminal (tensors, bytes, ETA); nothing when piped or --quiet."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   DownloadColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[name]}", style="dim"), console=err, transient=True)
    task = bar.add_task(label, total=None, name="")

    def update(step: Step) -> None:
        bar.update(task, total=step.bytes_total or step.total, name=step.name,
                   completed=step.bytes_done if step.bytes_total else step.done)

    with bar:
        yield update


def lora_specs(paths: list, scales: list) -> tuple:
    """--lora PATH (repeatable) and --lora-scale S (none, or one per --lora, in order)."""
    from quantcli.convert.lora import AdapterSpec
    from quantcli.errors import UsageError

    if scales and len(scales) != len(paths):
        raise UsageError(f"{len(scales)} --lora-scale for {len(paths)} --lora: give none (each scale 1) "
                         "or one per adapter, in the same order")
    return tuple(AdapterSpec(p, s) for p, s in zip(paths, scales or [1.0] * len(paths)))


def ray_option(ray: bool, address: str | None) -> str | None:
    """--ray [--ray-address A] -> the cluster address the pipelines take (None: run locally)."""
    from quantcli.errors import UsageError

    if address is not None and not ray:
        raise UsageError("--ray-address chooses the cluster of --ray: pass --ray too")
    return (address or "default") if ray else None

