"""spec/001's contract, FALSIFY-QUANT-001..005, on the codec it describes: SYM4_B64, symmetric
4-bit blocks of 64 with float32 scales (quantcli/codecs/sym4.py). The Q4_0 versions of these tests
stay in test_contracts.py as Q4_0 tests."""

from __future__ import annotations

import numpy as np
import pytest

from quantcli import codecs
from quantcli.codecs.sym4 import BLOCK, pack_nibbles, reference_quantize, unpack_nibbles
from quantcli.errors import UsageError

NAME = "SYM4_B64"


def _blocks(data: np.ndarray, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """One row's bytes -> (scales (n_blocks,), q (cols,)) read independently of the codec."""
    raw, scales, qs, pos = data.tobytes(), [], [], 0
    for b0 in range(0, cols, BLOCK):
        n = min(BLOCK, cols - b0)
        scales.append(np.frombuffer(raw[pos:pos + 4], "<f4")[0])
        nib = np.frombuffer(raw[pos + 4:pos + 4 + (n + 1) // 2], np.uint8)
        q = np.stack([nib & 15, nib >> 4], axis=1).reshape(-1).astype(np.float32) - 8
        qs.append(q[:n])
        pos += 4 + (n + 1) // 2
    assert pos == len(raw)
    return np.array(scales, np.float32), np.concatenate(qs)


def _data(seed: int, shape: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[:, ::17] *= 40  # outliers in some blocks
    return x


def test_quant_001_round_trip_error_bounded_by_scale():
    """|x - x_hat| < scale for every value, q in [-7, 7], scale = max|x|/7 >= 0, and the block
    MSE at most scale^2 / 4 (the uniform bound; see the codec's docstring on the contract's wording)."""
    x = _data(1, (16, 64 * 9))
    data = codecs.quantize(x, NAME)
    back = codecs.dequantize(data, NAME, x.shape)
    for r in range(x.shape[0]):
        scale, q = _blocks(data[r], x.shape[1])
        assert q.min() >= -7 and q.max() <= 7
        assert (scale >= 0).all()
        blocks = x[r].reshape(-1, BLOCK)
        assert np.array_equal(scale, (np.abs(blocks).max(axis=1) / np.float32(7)).astype(np.float32))
        err = np.abs(back[r] - x[r]).reshape(-1, BLOCK)
        assert (err < scale[:, None]).all()
        assert (err <= scale[:, None] / 2 * (1 + 1e-6)).all()  # the nearest step, never clamped
        assert ((err.astype(np.float64) ** 2).mean(axis=1) <= scale.astype(np.float64) ** 2 / 4).all()
        assert np.array_equal(back[r], (q.reshape(-1, BLOCK) * scale[:, None]).reshape(-1))


def test_quant_002_zeros_stay_zero():
    """All-zero input: scale 0, q = 0, x_hat = 0, whole rows and single zero blocks between others."""
    x = np.zeros((2, 64 * 3 + 5), np.float32)
    data = codecs.quantize(x, NAME)
    assert not np.any(codecs.dequantize(data, NAME, x.shape))
    scale, q = _blocks(data[0], x.shape[1])
    assert not scale.any() and not q.any()
    y = _data(2, (1, 64 * 3))
    y[0, 64:128] = 0.0
    back = codecs.dequantize(codecs.quantize(y, NAME), NAME, y.shape)
    assert not back[0, 64:128].any() and np.signbit(back[0, 64:128]).sum() == 0


def test_quant_003_blocks_quantize_independently():
    """A row of 7 blocks gives the bytes of its blocks quantized one by one, in order."""
    x = _data(3, (4, 64 * 7))
    whole = codecs.quantize(x, NAME).reshape(4, 7, 36)
    for b in range(7):
        alone = codecs.quantize(x[:, 64 * b:64 * (b + 1)], NAME)
        assert np.array_equal(whole[:, b], alone)


@pytest.mark.parametrize("n", [1, 3, 63, 65, 127, 129, 333])
def test_quant_004_odd_lengths_pack_nibble_pairs(n):
    """Odd lengths: ceil(n/2) nibble bytes after ceil(n/64) scales, value 2k low and 2k+1 high, the
    last high nibble 0; every value decodes where it was."""
    x = _data(4, (3, n))
    data = codecs.quantize(x, NAME)
    nb = -(-n // 64)
    assert data.shape == (3, 4 * nb + (n + 1) // 2) == (3, codecs.get_codec(NAME).row_bytes(n))
    back = codecs.dequantize(data, NAME, x.shape)
    for r in range(3):
        scale, q = _blocks(data[r], n)
        assert np.array_equal(back[r], q * np.repeat(scale, 64)[:n])
        if n % 2:
            assert data[r, -1] >> 4 == 0
    q = np.arange(-7, 8, dtype=np.int8)[None, :]  # 15 values: odd
    assert np.array_equal(unpack_nibbles(pack_nibbles(q), 15), q)


def test_quant_005_compression_ratio():
    """32 / (4 + 32/64) = 7.11x against float32: 64 values in 36 bytes (the contract's "~6x" note
    disagrees with its own formula; the formula holds)."""
    x = _data(5, (8, 4096))
    packed = codecs.quantize(x, NAME)
    assert packed.shape == (8, 4096 // 64 * 36)
    ratio = x.nbytes / packed.nbytes
    assert ratio == pytest.approx(32 / (4 + 32 / 64)) and ratio > 6.0


def test_rounding_is_half_away_from_zero():
    """Exact halves round away from zero (Rust's f32::round), not to even as numpy's rint."""
    x = np.zeros((1, 64), np.float32)
    x[0, :6] = [7.0, 0.5, 1.5, -2.5, 2.5, -0.5]  # scale = 7/7 = 1
    _, q = _blocks(codecs.quantize(x, NAME)[0], 64)
    assert list(q[:6]) == [7, 1, 2, -3, 3, -1]


@pytest.mark.parametrize("seed", range(4))
def test_qo_005_vectorised_equals_the_scalar_reference(seed):
    """FALSIFY-QO-005 on this codec: the block-vectorised numpy path gives the bytes of the
    one-value-at-a-time reference written from the contract."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    x = (rng.standard_normal((5, n)) * rng.uniform(1e-3, 1e3)).astype(np.float32)
    x[0, : min(n, 64)] = np.round(x[0, : min(n, 64)] * 2) / 2  # ties
    data = codecs.quantize(x, NAME)
    for r in range(5):
        assert reference_quantize(x[r].tolist())[2] == data[r].tobytes()


def test_registered_by_name_not_as_a_ggml_type():
    codec = codecs.get_codec("sym4_b64")
    assert codec.ggml_type.name == NAME and codec.block_size == 64
    assert NAME not in [t.name for t in codecs.registered_types()]
    assert codecs.named_types() == [NAME]
    with pytest.raises(UsageError, match="unknown type 'SYM4'.*outside GGUF SYM4_B64"):
        codecs.get_codec("SYM4")
    with pytest.raises(Exception, match="non-finite"):
        codecs.quantize(np.array([[1.0, np.nan]], np.float32), NAME)
    err = codecs.measure(_data(6, (4, 200)), NAME)
    assert err.to_json()["type"] == NAME and 0 < err.relative < 0.05
