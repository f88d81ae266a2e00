"""Cost of the error report: `quantize_with_error` and `measure` against `quantize` + `dequantize`
measured in the same run, interleaved (and `quantize` alone, and q+dq with the error computed in
numpy temporaries: what the fused pass replaces).

    python bench/codec_error.py [--rows 256] [--cols 4096] [--repeat 9] [--types Q4_K,Q8_0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantcli import codecs  # noqa: E402

TYPES = ["Q4_K", "Q8_0", "IQ4_XS", "IQ2_XXS"]


def numpy_error(x: np.ndarray, qtype: str, imp: np.ndarray) -> tuple[float, float, float]:
    """The same figures from numpy temporaries."""
    d = x.astype(np.float64) - codecs.dequantize(codecs.quantize(x, qtype, imp), qtype, x.shape)
    e2 = d * d
    return float(e2.sum()), float((e2 * imp).sum()), float(np.abs(d).max())


def interleaved_medians(fns: dict, repeat: int) -> dict[str, float]:
    """Median ms of each function, run in turn `repeat` times (after one warm-up round), so that
    a change in machine load hits every variant alike."""
    times = {k: [] for k in fns}
    for i in range(repeat + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i:
                times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--types", default=",".join(TYPES))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    imp = rng.exponential(1.0, args.cols).astype(np.float32)  # every type gets importance
    print(f"input {args.rows}x{args.cols} float32, importance on, median of {args.repeat} (ms); "
          f"ratios against quantize+dequantize")
    print(f"{'type':<9}{'q':>9}{'q+dq':>9}{'q+dq+np':>9}{'q+err':>9}{'measure':>9}"
          f"{'q/qdq':>8}{'np/qdq':>8}{'q+err/qdq':>11}{'meas/qdq':>10}")
    for qtype in args.types.split(","):
        codecs.quantize_with_error(x[:1], qtype, imp)  # compile / load the kernels
        t = {
            "q": lambda: codecs.quantize(x, qtype, imp),
            "qdq": lambda: codecs.dequantize(codecs.quantize(x, qtype, imp), qtype, x.shape),
            "np": lambda: numpy_error(x, qtype, imp),
            "qerr": lambda: codecs.quantize_with_error(x, qtype, imp),
            "meas": lambda: codecs.measure(x, qtype, imp),
        }
        ms = interleaved_medians(t, args.repeat)
        base = ms["qdq"]
        print(f"{qtype:<9}{ms['q']:>9.2f}{base:>9.2f}{ms['np']:>9.2f}{ms['qerr']:>9.2f}"
              f"{ms['meas']:>9.2f}{ms['q'] / base:>8.2f}{ms['np'] / base:>8.2f}"
              f"{ms['qerr'] / base:>11.2f}{ms['meas'] / base:>10.2f}")


if __name__ == "__main__":
    main()
