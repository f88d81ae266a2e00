"""IQ2_* and IQ1_*: round-trip error, zero rows, and the importance requirement."""

from __future__ import annotations

import numpy as np
import pytest

from quantcli import codecs
from quantcli.errors import UsageError

# RMSE / std on a (16, 2048) gaussian, uniform-ish importance; measured 0.35, 0.31, 0.26, 0.50, 0.47
# with importance (IQ2_S 0.26 and IQ1_M 0.59 without). Bounds leave ~10-15% headroom.
RMSE_BOUND = {"IQ2_XXS": 0.40, "IQ2_XS": 0.36, "IQ2_S": 0.30, "IQ1_S": 0.56, "IQ1_M": 0.65}
NEEDS_IMPORTANCE = ["IQ2_XXS", "IQ2_XS", "IQ1_S"]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 2048)).astype(np.float32)
    w = (rng.random(2048) + 0.1).astype(np.float32)
    return x, w


@pytest.mark.parametrize("qtype", sorted(RMSE_BOUND))
@pytest.mark.parametrize("weighted", [True, False], ids=["importance", "plain"])
def test_rmse_within_bound(data, qtype, weighted):
    if not weighted and qtype in NEEDS_IMPORTANCE:
        pytest.skip("ggml refuses this type without importance")
    x, w = data
    q = codecs.quantize(x, qtype, w if weighted else None)
    assert q.shape == (16, codecs.get_codec(qtype).row_bytes(2048))
    back = codecs.dequantize(q, qtype, x.shape)
    rel = float(np.sqrt(np.mean((back - x) ** 2)) / x.std())
    assert rel < RMSE_BOUND[qtype], f"{qtype}: rmse/std {rel:.3f}"


@pytest.mark.parametrize("qtype", sorted(RMSE_BOUND))
def test_zero_rows_stay_zero(data, qtype):
    x, w = data
    x = x[:4].copy()
    x[1] = 0
    x[3, :256] = 0  # a zero super-block inside a non-zero row
    back = codecs.dequantize(codecs.quantize(x, qtype, w), qtype, x.shape)
    assert not back[1].any()
    assert not back[3, :256].any()
    assert np.isfinite(back).all()


@pytest.mark.parametrize("qtype", NEEDS_IMPORTANCE)
def test_refuses_without_importance(qtype):
    x = np.ones((1, 256), dtype=np.float32)
    with pytest.raises(UsageError, match="importance") as err:
        codecs.quantize(x, qtype)
    assert "--imatrix" in (err.value.hint or "")
    assert codecs.get_codec(qtype).requires_importance


@pytest.mark.parametrize("qtype", sorted(RMSE_BOUND))
def test_rows_must_be_whole_superblocks(qtype):
    with pytest.raises(UsageError, match="256"):
        codecs.quantize(np.ones((1, 128), dtype=np.float32), qtype, np.ones(128, np.float32))


def test_iq1_sort_indices_is_a_stable_sort():
    """sort_indices ranks values by unique integer keys (glibc's qsort is a stable merge sort on
    the comparator x < y, where -0.0 == 0.0): same order as numpy's stable sort, on ties,
    signed zeros, extremes and subnormals."""
    from quantcli.codecs import iq1

    rng = np.random.default_rng(3)
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, np.inf, -np.inf, 1.0, -1.0],
                       dtype=np.float32)
    idx = np.empty(32, np.int64)
    key = np.empty(32, np.int64)
    for trial in range(500):
        n = 32 if trial % 2 else 16
        pool = rng.standard_normal(4).astype(np.float32) if trial % 3 else special
        x = rng.choice(pool, size=(1, n)).astype(np.float32)
        if trial % 5 == 0:
            x = rng.standard_normal((1, n)).astype(np.float32)
        iq1.sort_indices(x, 0, 0, n, idx, key)
        expect = np.argsort(x[0] + np.float32(0.0), kind="stable")  # -0.0 + 0.0 is 0.0
        assert idx[:n].tolist() == expect.tolist(), x
