"""The numba ports of ggml's `quantize_row_*_ref` (Q8_0, TQ1_0, TQ2_0, MXFP4, the legacy types
without importance) and row converters (F16, BF16) against the live ggml (tests/ggml_oracle.py),
and the single-pass input checks of `codecs.quantize` in front of them.

The inputs reach what bytes depend on: C's `amax = 0.0f` start and first-of-equal choices (blocks of
signed zeros), `1.0f/d` overflowing to Inf and C's float -> int conversion of Inf/NaN (subnormal
blocks), round-half-away ties (roundf, lroundf) and round-to-nearest-even ties (fp16, bf16), fp16
scales just below overflow, and `floorf(log2f(amax))` next to every power of two (MXFP4).
The oracle tests skip when libggml-base is not found (set QUANTCLI_GGML_LIB to a llama.cpp build's
bin/ folder); the input-check tests always run.
"""

from __future__ import annotations

import numpy as np
import pytest

from quantcli import codecs
from quantcli.errors import NumericError
from tests import ggml_oracle

FAST_TYPES = ["Q8_0", "TQ1_0", "TQ2_0", "MXFP4", "F16", "BF16", "F32",
              "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
KINDS = ["gauss", "signed_zeros", "subnormal", "ties", "near_limit", "zero_rows", "mixed_scales"]
FP16_LIMIT = 65519.0  # the largest float32 that still rounds to fp16's 65504
# a block scale d = amax / div must stay below FP16_LIMIT: amax = FP16_LIMIT * div is the edge
# (the _1 types store the min in fp16 too, which bounds them first)
SCALE_DIV = {"Q8_0": 127.0, "TQ1_0": 1.0, "TQ2_0": 1.0, "F16": 1.0, "Q4_0": 8.0, "Q5_0": 16.0,
             "Q4_1": 1.0, "Q5_1": 1.0}


def make_rows(rng: np.random.Generator, kind: str, qtype: str, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) float32 of one distribution."""
    if kind == "gauss":
        x = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-3, 2)
    elif kind == "signed_zeros":  # blocks of -0.0, of +0.0, mixed, and zeros beside small values
        x = rng.choice([0.0, -0.0], (rows, cols))
        x[0] = -0.0
        x[1, ::2] = 1e-3 * rng.standard_normal(cols // 2)
    elif kind == "subnormal":  # scales whose reciprocal overflows: 1/d = Inf, x * Inf, 0 * Inf
        x = rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-45, -34, (rows, 1))
    elif kind == "ties":  # k/2, k/4 and k/8 for integers k: ties in roundf and the fp4/fp16 grids
        x = rng.integers(-24, 25, (rows, cols)) / rng.choice([2.0, 4.0, 8.0], (rows, 1))
        # block maxima with exact reciprocals: d = 1 or 0.5 (Q8_0), 1/16 (TQ), fp4 steps 2 or 1
        x[:, ::32] = rng.choice([127.0, 63.5, 16.0, 12.0], (rows, 1))
        odd = rng.choice([-3, -1, 1, 3], (rows, cols // 32))
        x[:, 1::32] = 1.0 + odd * 2.0**-8  # halfway between two bf16 values
        x[:, 2::32] = 1.0 + odd * 2.0**-11  # halfway between two fp16 values
    elif kind == "near_limit":  # the largest values each type can hold: fp16 scales just below Inf
        top = {"BF16": 3.38e38, "MXFP4": 3.4e38, "F32": 3.4e38}.get(qtype)
        top = top or FP16_LIMIT * SCALE_DIV[qtype]
        x = rng.uniform(-1, 1, (rows, cols)) * top
        x[:, ::16] = np.sign(x[:, ::16]) * top
    elif kind == "zero_rows":
        x = rng.standard_normal((rows, cols))
        x[0] = 0.0
        x[-1] = -0.0
    else:  # every row at another scale, from subnormal to large
        x = rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-40, 4, (rows, 1))
    return x.astype(np.float32)




@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", FAST_TYPES)
def test_fast_types_match_ggml(oracle, qtype, kind):
    rng = np.random.default_rng([FAST_TYPES.index(qtype), KINDS.index(kind), 7153])
    legacy = qtype.startswith("Q") and qtype[-1] in "01" and qtype != "Q8_0"
    for cols in (256, 512, 256 * int(rng.integers(3, 17))):
        x = make_rows(rng, kind, qtype, 5, cols)
        # ggml ignores importance for all but the legacy types (whose weighted path is elsewhere)
        for imp in [None] if legacy else [None, rng.random(cols).astype(np.float32)]:
            problem = ggml_oracle.block_mismatches(qtype, x, imp)
            weighted = imp is not None
            assert not problem, f"{qtype} {kind} cols={cols} importance={weighted}: {problem}"


def test_mxfp4_exponent_next_to_every_power_of_two(oracle):
    """e = floorf(log2f(amax)) - 2 + 127: log2f rounds up to the next integer just below 2^k."""
    ulps = np.arange(-6, 7)
    exps = np.arange(-149, 128)
    amax = (np.ldexp(1.0, exps)[:, None] * (1.0 + ulps * 2.0**-23)[None, :]).astype(np.float32)
    amax = amax[np.isfinite(amax) & (amax > 0)].reshape(-1)
    amax = np.concatenate([amax, np.nextafter(amax, np.float32(0)),
                           np.nextafter(amax, np.float32(np.inf))])
    amax = amax[np.isfinite(amax)]
    rng = np.random.default_rng(7154)
    x = rng.uniform(-1, 1, (amax.size, 32)).astype(np.float32) * amax[:, None]
    x[:, 0] = amax * rng.choice([-1, 1], amax.size)
    x = x[: x.shape[0] // 32 * 32].reshape(-1, 1024)  # (rows, 32 blocks)
    problem = ggml_oracle.block_mismatches("MXFP4", x, None)
    assert not problem, f"MXFP4 near powers of two: {problem}"


@pytest.mark.parametrize("qtype", FAST_TYPES)
def test_many_rows_match_ggml(oracle, qtype):
    rng = np.random.default_rng([11, FAST_TYPES.index(qtype)])
    x = make_rows(rng, "gauss", qtype, 67, 768)
    problem = ggml_oracle.block_mismatches(qtype, x, None)
    assert not problem, f"{qtype} (67, 768): {problem}"


# -- input checks in front of every codec (no oracle needed) -----------------------------------

@pytest.mark.parametrize("qtype", FAST_TYPES + ["Q4_K"])
@pytest.mark.parametrize("bad", [np.nan, -np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused_with_its_position(qtype, bad):
    x = np.random.default_rng(1).standard_normal((6, 512)).astype(np.float32)
    x[4, 0] = 1e3  # a larger finite value before the bad one must not hide it
    x[4, 300] = bad
    with pytest.raises(NumericError, match="row 4, column 300"):
        codecs.quantize(x, qtype)


@pytest.mark.parametrize("col", [0, 255, 256, 511])
def test_nan_is_found_at_any_column(col):
    x = np.ones((3, 512), np.float32)
    x[2, col] = np.float32(np.nan)
    with pytest.raises(NumericError, match=f"row 2, column {col}"):
        codecs.quantize(x, "Q8_0")


def test_row_absmax_matches_numpy_and_propagates_non_finite():
    from quantcli.codecs._ggml_math import row_absmax

    rng = np.random.default_rng(2)
    x = (rng.standard_normal((9, 1000)) * 10.0 ** rng.integers(-44, 30, (9, 1))).astype(np.float32)
    x[0] = -0.0
    np.testing.assert_array_equal(row_absmax(x.view(np.int32)), np.abs(x).max(axis=1))
    x[3, 999] = np.nan
    x[5, 0] = -np.inf
    x[6, 10] = -np.float32(np.nan)
    amax = row_absmax(x.view(np.int32))
    assert np.isnan(amax[3]) and np.isinf(amax[5]) and np.isnan(amax[6])
    assert np.isfinite(np.delete(amax, [3, 5, 6])).all()


@pytest.mark.parametrize("qtype, top", [("Q8_0", 65520.0 * 127), ("TQ1_0", 65520.0),
                                        ("TQ2_0", 65520.0), ("F16", 65520.0), ("Q4_0", 65520.0 * 8),
                                        ("Q5_1", 1e38), ("BF16", 3.4028235e38)])
def test_overflowing_scale_is_refused(qtype, top):
    x = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
    x[2, 40] = np.float32(top)
    with pytest.raises(NumericError, match="row 2 has values up to"):
        codecs.quantize(x, qtype)


@pytest.mark.parametrize("qtype", ["Q8_0", "TQ1_0", "TQ2_0", "F16", "Q4_0", "Q5_0"])
def test_largest_scale_below_overflow_is_kept(qtype):
    x = np.random.default_rng(4).standard_normal((4, 256)).astype(np.float32)
    x[2, 40] = np.float32(FP16_LIMIT * SCALE_DIV[qtype])
    back = codecs.dequantize(codecs.quantize(x, qtype), qtype, x.shape)
    assert np.isfinite(back).all()
