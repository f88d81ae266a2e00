"""Shared bench helpers: medians of repeated timings, locating llama.cpp."""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable


def median_seconds(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def llama_bin(name: str) -> Path | None:
    """A llama.cpp tool from $QUANTCLI_LLAMA_BIN, else from PATH."""
    d = os.environ.get("QUANTCLI_LLAMA_BIN")
    if d and (Path(d) / name).is_file():
        return Path(d) / name
    found = shutil.which(name)
    return Path(found) if found else None
