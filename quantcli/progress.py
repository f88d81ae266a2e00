"""Progress events every long-running piece sends to a `progress(event)` callback.

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


def _noop(_: Progress) -> None:
    pass


def progress_or_noop(progress: ProgressFn | None) -> ProgressFn:
    return progress or _noop
