"""The specification's contracts, checked on the real GGML formats.

spec/001 (4-bit block quantization, FALSIFY-QUANT-001..005) is written for a symmetric 4-bit code;
Q4_0 is ggml's: blocks of 32, one fp16 scale d = max/-8, q in [-8, 7] stored as nibbles.
spec/000 (FALSIFY-QO-001): bytes strictly increase Q4_K < Q6_K < Q8_0 < F16 < F32 for the same count.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from quantcli import codecs
from quantcli.errors import UsageError


def _q4_0_blocks(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    blocks = data.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32) - 8  # ggml's nibble order
    return d, q


def test_quant_001_round_trip_error_bounded_by_scale():
    x = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    data = codecs.quantize(x, "Q4_0")
    d, q = _q4_0_blocks(data)
    assert q.min() >= -8 and q.max() <= 7
    back = codecs.dequantize(data, "Q4_0", x.shape)
    err = np.abs(back - x).reshape(-1, 32)
    # spec: |x - x_hat| < scale. The value of largest magnitude maps to -8 exactly; the other side can
    # reach +8 steps and is clamped to 7, so one step |d| (plus fp16 rounding of d) is the bound
    assert (err <= np.abs(d)[:, None] * (1 + 2**-9)).all()
    mse = (err ** 2).mean(axis=1)
    assert (mse <= (np.abs(d) ** 2) / 4 + 1e-9).all()  # uniform-quantization bound


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "IQ4_NL", "Q8_0", "Q6_K"])
def test_quant_002_zeros_stay_zero(qtype):
    x = np.zeros((3, 256), np.float32)
    data = codecs.quantize(x, qtype)
    assert not np.any(codecs.dequantize(data, qtype, x.shape))


def test_quant_003_blocks_quantize_independently():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 32 * 7)).astype(np.float32)
    whole = codecs.quantize(x, "Q4_0").reshape(4, 7, 18)
    for b in range(7):
        alone = codecs.quantize(x[:, 32 * b:32 * (b + 1)], "Q4_0").reshape(4, 18)
        assert np.array_equal(whole[:, b], alone)


def test_quant_004_odd_block_counts_pack_nibbles_in_place():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 32 * 3)).astype(np.float32)  # an odd number of blocks
    data = codecs.quantize(x, "Q4_0")
    assert data.shape == (1, 3 * 18)
    d, q = _q4_0_blocks(data)
    assert np.allclose(codecs.dequantize(data, "Q4_0", x.shape).reshape(-1, 32), d[:, None] * q)
    with pytest.raises(UsageError, match="divisible by its block size 32; row length is 33"):
        codecs.quantize(np.ones((1, 33), np.float32), "Q4_0")


def test_quant_005_compression_ratio():
    block, size = GGML_QUANT_SIZES[Q.Q4_0]
    ratio = 4 * block / size  # F32 bytes / Q4_0 bytes
    assert ratio == pytest.approx(32 * 4 / 18) and ratio > 6.0
    x = np.ones((8, 4096), np.float32)
    assert codecs.quantize(x, "Q4_0").nbytes * ratio == pytest.approx(x.nbytes)


def test_qo_001_size_ordering_strict():
    n = 256 * 1000
    sizes = [n // GGML_QUANT_SIZES[t][0] * GGML_QUANT_SIZES[t][1] for t in (Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.F16, Q.F32)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 5
    per_32 = [s * 32 / n for s in sizes]
    assert per_32 == [18.0, 26.25, 34.0, 64.0, 128.0]  # Q6_K is 210/256 bytes, not spec's 26/32
