"""`quantcli warmup`: load or compile every numba kernel quantcli runs, into numba's on-disk cache.

A kernel is compiled the first time a process needs it and cached on disk (`cache=True`), keyed
on its source file's sha256, its signature and the CPU. A wheel built from source ships the cache
of every kernel (setup.py runs this module against the build tree); this command fills the cache
where that one is not used: a wheel built on another machine, NUMBA_CACHE_DIR set, a read-only
install. Each kernel is run once on a block of zeros, through the same entry points the pipelines
call (so with the same argument types).

    python -m quantcli.pipelines.warmup   # what setup.py runs; prints the WarmupResult
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from quantcli.progress import Progress

# the modules whose numba functions the pipelines call (their helpers are compiled into them)
KERNEL_MODULES = ("_ggml_math", "_dequant", "gguf_backed", "legacy", "kquants", "iq4", "iq3",
                  "iq2", "iq1")


@dataclass(frozen=True)
class WarmupOptions:
    types: tuple[str, ...] = ()  # GGML type names to warm; empty: every type quantcli reads or writes
    engine: bool = True  # also the forward pass's kernels (imatrix, perplexity)


@dataclass
class WarmupResult:
    steps: list[str] = field(default_factory=list)  # what ran, e.g. "Q4_K encode (imatrix)"
    loaded: int = 0  # kernel signatures found in the cache
    compiled: int = 0  # kernel signatures compiled (and written to the cache)
    cache_dirs: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _dispatchers() -> list:
    """The numba dispatchers of the kernel modules, the engine's included."""
    import importlib

    from numba.core.registry import CPUDispatcher

    mods = [importlib.import_module(f"quantcli.codecs.{m}") for m in KERNEL_MODULES]
    mods.append(importlib.import_module("quantcli.engine._kernels"))
    seen = {}
    from quantcli.codecs import error

    compiled = error._error_kernel.dispatcher  # compiled on first use, not at import
    if compiled is not None:
        seen[id(compiled)] = compiled
    for mod in mods:
        for obj in vars(mod).values():
            if isinstance(obj, CPUDispatcher) and obj.py_func.__module__ == mod.__name__:
                seen[id(obj)] = obj
    return list(seen.values())


def _codec_steps(names: tuple[str, ...]) -> list[tuple[str, Callable[[], object]]]:
    from quantcli import codecs
    from quantcli.codecs._ggml_math import readonly, row_absmax
    from quantcli.codecs.base import resolve_type

    types = ([resolve_type(n) for n in names] if names
             else codecs.registered_types(quantizable=False))
    steps: list[tuple[str, Callable[[], object]]] = [
        # quantize() takes its row maxima of the caller's array, read-only (a memory map) or not
        ("row maxima", lambda: row_absmax(np.zeros((1, 32), np.int32))),
        ("row maxima (read-only)", lambda: row_absmax(readonly(np.zeros((1, 32), np.int32)))),
        # the error reports' pass (codecs.measure / quantize_with_error), the same for every type
        ("error report", lambda: codecs.measure(np.zeros((1, 32), np.float32), "Q8_0")),
    ]
    for t in types:
        codec = codecs.get_codec(t)
        n = codec.block_size
        steps.append((f"{t.name} decode", lambda c=codec: codecs.dequantize(
            np.zeros(c.type_size, np.uint8), c.ggml_type, (c.block_size,))))
        if not codec.can_quantize:
            continue
        zeros = np.zeros((1, n), np.float32)
        if not codec.requires_importance:
            steps.append((f"{t.name} encode", lambda c=codec, x=zeros: codecs.quantize(x, c.ggml_type)))
        steps.append((f"{t.name} encode (imatrix)", lambda c=codec, x=zeros: codecs.quantize(
            x, c.ggml_type, np.ones(x.shape[1], np.float32))))
    return steps


def _engine_steps() -> list[tuple[str, Callable[[], object]]]:
    from quantcli.engine import ops

    x = np.zeros((2, 256), np.float32)
    w = np.ones(256, np.float32)
    return [
        ("rms_norm", lambda: (ops.rms_norm(x, w, 1e-6), ops.rms_norm(x, None, 1e-6))),
        ("gelu", lambda: (ops.gelu(x), ops.gelu(x, x))),
        ("activation rounding", lambda: [ops.quantize_activations(x, t) for t in ("F16", "Q8_0", "Q8_K")]),
    ]


def run(opts: WarmupOptions = WarmupOptions(), progress: Callable[[Progress], None] | None = None
        ) -> WarmupResult:
    start = time.perf_counter()
    steps = _codec_steps(opts.types) + (_engine_steps() if opts.engine else [])
    result = WarmupResult()
    for i, (label, fn) in enumerate(steps):
        fn()
        result.steps.append(label)
        if progress is not None:
            progress(Progress("kernel", i + 1, len(steps), label))
    dirs = set()
    for d in _dispatchers():
        stats = d.stats
        result.loaded += sum(stats.cache_hits.values())
        result.compiled += sum(stats.cache_misses.values())
        if stats.cache_hits or stats.cache_misses:
            dirs.add(stats.cache_path)
    result.cache_dirs = sorted(dirs)
    result.seconds = time.perf_counter() - start
    return result


def main() -> None:
    """setup.py's build step (and a plain-Python `quantcli warmup`): warm everything, report it."""
    result = run()
    print(f"quantcli warmup: {len(result.steps)} steps, {result.compiled} kernels compiled, "
          f"{result.loaded} loaded, {result.seconds:.1f} s; cache: {', '.join(result.cache_dirs)}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
