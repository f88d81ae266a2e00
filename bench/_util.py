"""Shared bench helpers: medians of repeated timings, locating llama.cpp, the real-model arguments."""

from __future__ import annotations

import argparse
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


TEXTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "text"


def smoothing_args(ap: argparse.ArgumentParser) -> None:
    """The arguments of the benches that smooth the real model and score it: MODEL (default
    $QUANTCLI_MODEL_CACHE/gemma3-270m-f32.gguf), --text (scored), --calib and --calib-chunks
    (smoothed on), --ctx and --chunks."""
    cache = Path(os.environ.get("QUANTCLI_MODEL_CACHE", "/tmp/qc/models"))
    ap.add_argument("model", type=Path, nargs="?", default=cache / "gemma3-270m-f32.gguf")
    ap.add_argument("--text", type=Path, default=TEXTS / "exodus.txt")
    ap.add_argument("--calib", type=Path, default=TEXTS / "genesis.txt")
    ap.add_argument("--calib-chunks", type=int, default=512,
                    help="at most this many chunks of --calib (smooth's default; Genesis holds 96)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
