"""IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S against the live ggml (tests/ggml_oracle.py) on fresh inputs.

Skips when libggml-base is not found (set QUANTCLI_GGML_LIB to a llama.cpp build's bin/ folder).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import ggml_oracle

TYPES = ["IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S"]
KINDS = ["gauss", "heavy", "outliers", "zero", "tiny", "ties"]


pytestmark = pytest.mark.usefixtures("oracle")  # skips without libggml-base


def make_rows(rng: np.random.Generator, kind: str, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) float32 of one distribution; every kind has some structure ggml branches on."""
    if kind == "gauss":
        x = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-3, 1)
    elif kind == "heavy":  # Student t with 2 degrees of freedom
        x = rng.standard_t(2, (rows, cols))
    elif kind == "outliers":  # a few values 500x the rest, as in real attention weights
        x = rng.standard_normal((rows, cols)) * 0.02
        x[rng.random((rows, cols)) < 0.01] *= 500
    elif kind == "zero":  # whole zero rows, zero blocks and zero halves inside a row
        x = rng.standard_normal((rows, cols))
        x[0] = 0
        x[1, : cols // 2] = 0
        x[2, rng.random(cols) < 0.9] = 0
    elif kind == "tiny":  # down to float32 subnormals, below every GROUP_MAX_EPS
        x = rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-44, -6, (rows, 1))
    else:  # small integers: exact ties in every rounding
        x = rng.integers(-8, 9, (rows, cols)).astype(np.float64)
    return x.astype(np.float32)




@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", TYPES)
def test_matches_ggml(qtype, kind):
    rng = np.random.default_rng([TYPES.index(qtype), KINDS.index(kind), 20250])
    block = 32 if qtype == "IQ4_NL" else 256
    for cols in sorted({block, 4096, block * int(rng.integers(2, 4096 // block + 1))}):
        x = make_rows(rng, kind, 4, cols)
        importance = [
            None,
            rng.random(cols).astype(np.float32),
            (rng.standard_normal(cols) ** 2 * 1e3).astype(np.float32) * (rng.random(cols) < 0.7),
        ]
        for imp in importance:
            problem = ggml_oracle.block_mismatches(qtype, x, imp)
            where = f"{qtype} {kind} cols={cols} importance={imp is not None}"
            assert not problem, f"{where}: {problem}"
