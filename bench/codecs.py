"""Codec throughput: MB/s of float32 input per type, single thread, and the ratio against ggml's own
`ggml_quantize_chunk` measured in the same run (via ctypes on libggml-base: set QUANTCLI_GGML_LIB or
install llama-cpp-python), else against the `gguf` package where it has the type.

    python bench/codecs.py [--rows 256] [--cols 4096] [--repeat 5] [--types Q4_K,IQ4_XS]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import median_seconds  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants as gq  # noqa: E402

from quantcli import codecs  # noqa: E402
from tests import ggml_oracle  # noqa: E402

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ1_S",
         "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0",
         "TQ2_0", "MXFP4", "F16", "BF16"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--types", default=",".join(TYPES))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    imp = rng.exponential(1.0, args.cols).astype(np.float32)
    mb = x.nbytes / 1e6
    oracle = ggml_oracle.load() is not None
    base = "ggml" if oracle else "gguf-py"
    print(f"input {args.rows}x{args.cols} float32 ({mb:.1f} MB), median of {args.repeat}, baseline: {base}")
    print(f"{'type':<9}{'imatrix':>8}{'quantcli MB/s':>15}{base + ' MB/s':>14}{'ratio':>8}{'bytes':>8}")
    for name in args.types.split(","):
        qtype = Q[name]
        for weighted in (False, True):
            w = imp if weighted else None
            if codecs.get_codec(qtype).requires_importance and w is None:
                continue
            ours_out = codecs.quantize(x, qtype, w)
            ours = mb / median_seconds(lambda: codecs.quantize(x, qtype, w), args.repeat)
            if oracle:
                ref_out = ggml_oracle.quantize(x, qtype, w)
                ref = mb / median_seconds(lambda: ggml_oracle.quantize(x, qtype, w), args.repeat)
                same = "same" if np.array_equal(ours_out, ref_out) else "DIFF"
            elif qtype in gq._type_traits and w is None:
                try:
                    gq.quantize(x[:1], qtype)
                    ref = mb / median_seconds(lambda: gq.quantize(x, qtype), args.repeat)
                    same = "same" if np.array_equal(ours_out, gq.quantize(x, qtype)) else "DIFF"
                except NotImplementedError:
                    ref, same = float("nan"), "-"
            else:
                ref, same = float("nan"), "-"
            print(f"{name:<9}{'yes' if weighted else 'no':>8}{ours:>15.1f}{ref:>14.1f}"
                  f"{ours / ref if ref == ref else float('nan'):>8.2f}{same:>8}")


if __name__ == "__main__":
    main()
