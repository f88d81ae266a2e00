"""Q2_K..Q6_K and Q4_0..Q5_1 against the live ggml (tests/ggml_oracle.py) on fresh inputs.

Every distribution below reaches a branch of ggml's search that bytes depend on: the min clamp of
make_qkx*_quants (all-positive rows), max == min groups (constant sub-blocks), GROUP_MAX_EPS and
iscale overflow (subnormals), `if (!d) continue` (outliers), exact rounding ties (small integers),
blocks of signed zeros (C keeps its 0.0f start value), and degenerate importance (all zero).
Skips when libggml-base is not found (set QUANTCLI_GGML_LIB to a llama.cpp build's bin/ folder).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import ggml_oracle

K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
LEGACY_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1"]
KINDS = ["gauss", "heavy", "outliers", "zero", "tiny", "ties", "positive", "const", "sparse"]


pytestmark = pytest.mark.usefixtures("oracle")  # skips without libggml-base


def make_rows(rng: np.random.Generator, kind: str, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) float32 of one distribution."""
    if kind == "gauss":
        x = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-3, 1)
    elif kind == "heavy":  # Student t with 2 degrees of freedom
        x = rng.standard_t(2, (rows, cols))
    elif kind == "outliers":  # a few values 500x the rest, as in real attention weights
        x = rng.standard_normal((rows, cols)) * 0.02
        x[rng.random((rows, cols)) < 0.01] *= 500
    elif kind == "zero":  # whole zero rows, zero halves, mostly-zero rows
        x = rng.standard_normal((rows, cols))
        x[0] = 0
        x[1, : cols // 2] = 0
        x[2, rng.random(cols) < 0.9] = 0
    elif kind == "tiny":  # down to float32 subnormals, below every GROUP_MAX_EPS
        x = rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-44, -6, (rows, 1))
    elif kind == "ties":  # small integers (times a power of two): exact ties in every rounding
        x = rng.integers(-8, 9, (rows, cols)) * rng.choice([0.25, 1.0, 3.0])
    elif kind == "positive":  # no negative value: the min is clamped to 0
        x = np.abs(rng.standard_normal((rows, cols))) + rng.uniform(0, 2)
    elif kind == "const":  # constant runs of 16: max == min groups, down to subnormal
        x = np.repeat(rng.standard_normal((rows, cols // 16)), 16, axis=1)
        x *= 10.0 ** rng.integers(-40, 2, (rows, 1))
    else:  # sparse, with -0.0 where a negative value was masked
        x = rng.standard_normal((rows, cols)) * (rng.random((rows, cols)) < 0.05)
    return x.astype(np.float32)


def importances(rng: np.random.Generator, cols: int) -> list[np.ndarray | None]:
    """No importance, a plain one, a sparse heavy one, and all zeros (every weight sum 0)."""
    return [
        None,
        rng.random(cols).astype(np.float32),
        ((rng.standard_normal(cols) ** 2 * 1e3) * (rng.random(cols) < 0.7)).astype(np.float32),
        np.zeros(cols, np.float32),
    ]




def check(qtype: str, kind: str, cols_options: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for cols in cols_options:
        x = make_rows(rng, kind, 4, cols)
        for imp in importances(rng, cols):
            problem = ggml_oracle.block_mismatches(qtype, x, imp)
            weighted = imp is not None
            assert not problem, f"{qtype} {kind} cols={cols} importance={weighted}: {problem}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", K_TYPES)
def test_kquants_match_ggml(qtype, kind):
    seed = [K_TYPES.index(qtype), KINDS.index(kind), 7151]
    n = int(np.random.default_rng(seed).integers(3, 15))
    check(qtype, kind, [256, 512, 4096, 256 * n], seed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", LEGACY_TYPES)
def test_legacy_match_ggml(qtype, kind):
    seed = [LEGACY_TYPES.index(qtype), KINDS.index(kind), 7152]
    n = int(np.random.default_rng(seed).integers(4, 127))
    check(qtype, kind, [32, 64, 96, 4096, 32 * n], seed)


@pytest.mark.parametrize("qtype", K_TYPES + LEGACY_TYPES)
def test_many_rows_match_ggml(qtype):
    """Chunks of super-blocks span rows: a tall input crosses every chunk boundary."""
    rng = np.random.default_rng([9, (K_TYPES + LEGACY_TYPES).index(qtype)])
    x = make_rows(rng, "heavy", 67, 768)
    for imp in (None, rng.random(768).astype(np.float32)):
        problem = ggml_oracle.block_mismatches(qtype, x, imp)
        assert not problem, f"{qtype} (67, 768) importance={imp is not None}: {problem}"
