"""IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M against live ggml on fresh inputs (skips without libggml).

The golden files pin a few seeds; these cases reach the rarer paths: off-grid groups and their
neighbour lists, qsort ties in the IQ1 split search (bf16-like values), all-zero and tiny
sub-blocks, one huge outlier per block.
"""

from __future__ import annotations

import numpy as np
import pytest

from quantcli import codecs
from tests import ggml_oracle

pytestmark = pytest.mark.usefixtures("oracle")  # skips without libggml-base

TYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]


def _bf16(x):
    """round toward zero to bf16: few distinct values, so many exact ties within a block."""
    return (np.asarray(x, np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)


def _make(kind: str, rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    if kind == "gauss":
        x = rng.standard_normal((rows, cols))
    elif kind == "heavy":
        x = rng.standard_t(2, (rows, cols))
    elif kind == "outliers":
        x = rng.standard_normal((rows, cols)) * 0.02
        x[rng.random((rows, cols)) < 0.005] *= 500
    elif kind == "zero_rows":
        x = rng.standard_normal((rows, cols))
        x[::2] = 0
        x[:, rng.integers(0, cols, cols // 3)] = 0  # whole zero sub-blocks happen too
    elif kind == "tiny":
        x = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-30, -6, (rows, 1))
    elif kind == "ties":
        x = _bf16(rng.standard_normal((rows, cols)) * 0.05)
    elif kind == "levels":
        x = rng.integers(-3, 4, (rows, cols)) * 0.5
    else:
        raise ValueError(kind)
    return np.ascontiguousarray(x, dtype=np.float32)


CASES = [
    ("gauss", 4, 4096),
    ("heavy", 4, 2048),
    ("outliers", 3, 1024),
    ("zero_rows", 4, 512),
    ("tiny", 4, 256),
    ("ties", 4, 1024),
    ("levels", 2, 768),
]


def _importance(rng: np.random.Generator, cols: int) -> np.ndarray:
    w = np.exp(rng.standard_normal(cols) * 1.5)
    w[rng.random(cols) < 0.05] = 0  # dead columns: zero weights in the sums
    return w.astype(np.float32)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize(("kind", "rows", "cols"), CASES, ids=[c[0] for c in CASES])
def test_matches_ggml(qtype, kind, rows, cols):
    seed = 1000 + TYPES.index(qtype) * 100 + [c[0] for c in CASES].index(kind)
    rng = np.random.default_rng(seed)
    x = _make(kind, rng, rows, cols)
    w = _importance(rng, cols)
    variants = [w] if codecs.get_codec(qtype).requires_importance else [None, w]
    for importance in variants:
        problem = ggml_oracle.block_mismatches(qtype, x, importance)
        assert not problem, f"{qtype} {kind} importance={importance is not None}: {problem}"
