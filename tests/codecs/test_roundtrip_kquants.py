"""Q2_K..Q6_K, Q4_0..Q5_1: what quantize -> dequantize keeps, without ggml at hand.

RMSE bounds are relative to the data's standard deviation, measured on Gaussian and Student-t(4)
rows of 4096 with and without importance, plus ~25% headroom:
    Q2_K 0.28-0.34   Q3_K 0.15-0.18   Q4_K 0.072-0.088   Q5_K 0.036-0.044   Q6_K 0.018-0.023
    Q4_0 0.083-0.115 Q4_1 0.072-0.093 Q5_0 0.041-0.058   Q5_1 0.035-0.045
"""

from __future__ import annotations

import numpy as np
import pytest

from quantcli import codecs
from quantcli.errors import UsageError

REL_RMSE = {
    "Q2_K": 0.40, "Q3_K": 0.22, "Q4_K": 0.11, "Q5_K": 0.055, "Q6_K": 0.028,
    "Q4_0": 0.14, "Q4_1": 0.12, "Q5_0": 0.07, "Q5_1": 0.055,
}  # fmt: skip
TYPES = list(REL_RMSE)
K_TYPES = [t for t in TYPES if t.endswith("_K")]


def roundtrip(x: np.ndarray, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:
    return codecs.dequantize(codecs.quantize(x, qtype, importance), qtype, x.shape)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("dist", ["gauss", "student_t4"])
@pytest.mark.parametrize("weighted", [False, True])
def test_rmse_within_bound(qtype, dist, weighted):
    rng = np.random.default_rng([TYPES.index(qtype), 31])
    shape = (16, 4096)
    x = rng.standard_normal(shape) if dist == "gauss" else rng.standard_t(4, shape)
    x = (x * 0.02).astype(np.float32)  # weights-sized values; the bound is scale-free
    importance = rng.random(4096).astype(np.float32) if weighted else None
    back = roundtrip(x, qtype, importance)
    rel = np.sqrt(np.mean((back - x) ** 2)) / x.std()
    assert rel < REL_RMSE[qtype], f"{qtype} {dist}: RMSE {rel:.4f} x std"


@pytest.mark.parametrize("qtype", TYPES)
def test_importance_lowers_weighted_error(qtype):
    """With skewed importance, the weighted search must beat the plain one on weighted error."""
    rng = np.random.default_rng([TYPES.index(qtype), 32])
    x = rng.standard_normal((16, 4096)).astype(np.float32)
    importance = (10.0 ** rng.uniform(-3, 3, 4096)).astype(np.float32)
    err = [np.sqrt(np.mean(importance * (roundtrip(x, qtype, imp) - x) ** 2))
           for imp in (None, importance)]
    assert err[1] < 0.9 * err[0], f"{qtype}: weighted error {err[1]:.4g} vs plain {err[0]:.4g}"


@pytest.mark.parametrize("qtype", TYPES)
def test_zero_rows_stay_zero(qtype):
    rng = np.random.default_rng(33)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    x[1] = 0.0
    x[2, :256] = -0.0
    for imp in (None, rng.random(512).astype(np.float32)):
        back = roundtrip(x, qtype, imp)
        assert np.all(back[1] == 0) and np.all(back[2, :256] == 0)


@pytest.mark.parametrize("qtype", TYPES)
def test_blocks_are_independent(qtype):
    """Without importance every super-block (block) is quantized on its own: one row of 16 blocks
    and 16 rows of one block give the same bytes. The K-quants' importance path keeps this too
    (its sigma2 is per super-block); the legacy types' does not (sigma2 spans the row)."""
    codec = codecs.get_codec(qtype)
    rng = np.random.default_rng([TYPES.index(qtype), 34])
    x = rng.standard_t(3, (2, 16 * codec.block_size)).astype(np.float32)
    whole = codecs.quantize(x, qtype).reshape(-1, codec.type_size)
    alone = codecs.quantize(x.reshape(-1, codec.block_size), qtype).reshape(-1, codec.type_size)
    np.testing.assert_array_equal(whole, alone)
    if qtype in K_TYPES:
        imp = rng.random(x.shape[1]).astype(np.float32)
        whole = codecs.quantize(x, qtype, imp).reshape(-1, codec.type_size)
        for b in range(16):
            cols = slice(b * 256, (b + 1) * 256)
            part = codecs.quantize(x[:, cols], qtype, imp[cols])
            np.testing.assert_array_equal(whole.reshape(2, 16, -1)[:, b], part)


@pytest.mark.parametrize("qtype", K_TYPES)
@pytest.mark.parametrize("cols", [32, 128, 300, 4000])
def test_rows_must_fill_superblocks(qtype, cols):
    x = np.ones((2, cols), np.float32)
    with pytest.raises(UsageError, match="divisible by its block size 256"):
        codecs.quantize(x, qtype)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_rows_must_fill_blocks(qtype):
    with pytest.raises(UsageError, match="divisible by its block size 32"):
        codecs.quantize(np.ones((2, 48), np.float32), qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_importance_length_is_checked(qtype):
    with pytest.raises(UsageError, match="importance has 255 values, rows have 256 columns"):
        codecs.quantize(np.ones((1, 256), np.float32), qtype, np.ones(255, np.float32))


@pytest.mark.parametrize("qtype", TYPES)
def test_row_bytes_and_dtype(qtype):
    codec = codecs.get_codec(qtype)
    out = codecs.quantize(np.zeros((5, 1024), np.float32), qtype)
    assert out.dtype == np.uint8 and out.shape == (5, 1024 // codec.block_size * codec.type_size)
