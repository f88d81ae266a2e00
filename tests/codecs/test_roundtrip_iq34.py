"""dequantize(quantize(x)) for IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S: error bounds, zeros, bad shapes."""

from __future__ import annotations

import numpy as np
import pytest

from quantcli import codecs
from quantcli.errors import UsageError

# RMSE / std(x) on gaussian rows of 1024 (measured: 0.076, 0.077, 0.21, 0.17; with importance
# 0.076, 0.077, 0.20, 0.15). A bound is ~15% above the measurement: a broken search lands far above.
RMSE_BOUND = {"IQ4_NL": 0.088, "IQ4_XS": 0.088, "IQ3_XXS": 0.245, "IQ3_S": 0.195}
BLOCK = {"IQ4_NL": 32, "IQ4_XS": 256, "IQ3_XXS": 256, "IQ3_S": 256}


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("qtype", list(RMSE_BOUND))
def test_rmse_within_bound(qtype, weighted):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((32, 1024)).astype(np.float32) * np.float32(0.02)
    importance = rng.random(1024).astype(np.float32) if weighted else None
    data = codecs.quantize(x, qtype, importance)
    assert data.shape == (32, 1024 // BLOCK[qtype] * codecs.get_codec(qtype).type_size)
    back = codecs.dequantize(data, qtype, x.shape)
    rel = float(np.sqrt(np.mean((back - x) ** 2)) / x.std())
    assert rel < RMSE_BOUND[qtype], f"{qtype}: RMSE {rel:.4f} of std, bound {RMSE_BOUND[qtype]}"


@pytest.mark.parametrize("qtype", list(RMSE_BOUND))
def test_zero_rows_stay_zero(qtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    x[1] = 0
    importance = rng.random(512).astype(np.float32)
    for imp in (None, importance):
        back = codecs.dequantize(codecs.quantize(x, qtype, imp), qtype, x.shape)
        assert np.all(back[1] == 0)
        assert np.all(back[[0, 2]] != 0)


@pytest.mark.parametrize("qtype", list(RMSE_BOUND))
def test_cols_not_multiple_of_block(qtype):
    cols = BLOCK[qtype] + 16
    with pytest.raises(UsageError, match=f"block size {BLOCK[qtype]}; row length is {cols}"):
        codecs.quantize(np.ones((2, cols), dtype=np.float32), qtype)


@pytest.mark.parametrize("qtype", list(RMSE_BOUND))
def test_importance_length_checked(qtype):
    with pytest.raises(UsageError, match="importance has 128 values, rows have 512 columns"):
        codecs.quantize(np.ones((1, 512), dtype=np.float32), qtype, np.ones(128, dtype=np.float32))


def test_iq4_level_lookup_equals_ggml_binary_search():
    """best_index_int8 finds the level through a table on floor(x); ggml runs a binary search. Same
    index for a stride through every float32 bit pattern (the whole range was checked once:
    2^32 values, no difference), the levels, their midpoints and their neighbours."""
    from numba import njit

    from quantcli.codecs import iq4

    @njit(cache=False)
    def ggml_search(values, x):  # best_index_int8(16, values, x), ggml-quants.c
        if x <= values[0]:
            return 0
        if x >= values[15]:
            return 15
        ml, mu = 0, 15
        while mu - ml > 1:
            mav = (ml + mu) // 2
            if x < values[mav]:
                mu = mav
            else:
                ml = mav
        return mu - 1 if x - values[mu - 1] < values[mu] - x else mu

    @njit(cache=False)
    def differences(values, xs):
        n = 0
        for x in xs:
            n += ggml_search(values, x) != iq4.best_index_int8(values, x)
        return n

    v = iq4.KVALUES
    mids = ((v[1:] + v[:-1]) / 2).astype(np.float32)
    near = np.concatenate([v, mids, np.arange(-130, 120, dtype=np.float32)])
    xs = np.concatenate([np.arange(0, 1 << 32, 4093, dtype=np.uint64).astype(np.uint32).view(np.float32),
                         near, np.nextafter(near, np.float32(np.inf)), np.nextafter(near, np.float32(-np.inf))])
    assert differences(v, xs) == 0
