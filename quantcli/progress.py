"""Progress events every long-running piece sends to a `progress(event)` callback, and the
warnings it gathers for its result.

It lives at the bottom of the package so the engine, calibration and pipelines all use one class;
only `quantcli.cli` renders it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Progress:
    """One step of a long run: `done` of `total` units (tensors, layers, chunks) and bytes so far."""

    stage: str  # "tensor", "layer", "chunk", "head", "tokenize", ...
    done: int
    total: int
    name: str = ""
    bytes_done: int = 0
    bytes_total: int = 0


ProgressFn = Callable[[Progress], None]


def collect_warnings(warn: Callable[[str], None] | None) -> tuple[list[str], Callable[[str], None]]:
    """A list that gathers a run's warnings (for its result) and the function that appends to it
    and hands each on to `warn` (the caller's, e.g. the CLI's printer) when there is one."""
    warnings: list[str] = []

    def warn_(msg: str) -> None:
        warnings.append(msg)
        if warn is not None:
            warn(msg)

    return warnings, warn_


def _noop(_: Progress) -> None:
    pass


def progress_or_noop(progress: ProgressFn | None) -> ProgressFn:
    return progress or _noop
