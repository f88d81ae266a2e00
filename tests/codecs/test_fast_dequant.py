"""The compiled decoders (`codecs/_dequant.py`) against `gguf.quants.dequantize`, bit for bit.

Raw blocks are random bytes with every fp16 scale field set to a random finite half (any sign and
exponent: zeros, subnormals, up to 65504; NaN/Inf would make the comparison one of NaN payloads),
so every bit of every field is reached, not only the codes a quantizer writes; real data from
`codecs.quantize` is compared too. Then the row handling and the `out=` path of `dequantize_rows`.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq

from quantcli import codecs
from quantcli.codecs import _dequant

# byte offsets of the fp16 fields (d, m / dmin) in each block (ggml-common.h)
FP16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
FAST = list(FP16_FIELDS)
KERNELS = {name: getattr(_dequant, f"dequant_{name.lower()}") for name in FAST}


def random_blocks(rng: np.random.Generator, name: str, n_blocks: int) -> np.ndarray:
    """(n_blocks, type_size) uint8: random bytes, fp16 fields finite."""
    _, type_size = GGML_QUANT_SIZES[Q[name]]
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for pos in FP16_FIELDS[name]:
        h = rng.integers(0, 1 << 16, n_blocks, dtype=np.uint16)
        h[(h & 0x7C00) == 0x7C00] &= 0xBFFF  # exponent 31 (Inf/NaN) -> 15
        # +-0, the smallest and largest subnormal, the smallest normal, +-65504, 1
        edges = [0x0000, 0x8000, 0x0001, 0x83FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00]
        h[:len(edges)] = edges[:n_blocks]
        raw[:, pos:pos + 2] = h.view(np.uint8).reshape(-1, 2)
    return raw


def assert_bits_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    diff = ours.view(np.uint32) != ref.view(np.uint32)
    if diff.any():
        i = np.argwhere(diff)[0]
        pytest.fail(f"{int(diff.sum())} values differ; first at {tuple(i)}: "
                    f"{ours[tuple(i)]!r} vs gguf {ref[tuple(i)]!r}")


def test_fast_types_have_kernels():
    for name in FAST:
        assert codecs.get_codec(name).dequant_kernel is KERNELS[name], name


@pytest.mark.parametrize("name", FAST)
def test_random_blocks_match_gguf(name):
    rng = np.random.default_rng(sum(name.encode()))
    block_size, _ = GGML_QUANT_SIZES[Q[name]]
    raw = random_blocks(rng, name, 3000).reshape(30, -1)  # 30 rows of 100 blocks
    ours = codecs.get_codec(name).dequantize_rows(raw, 100 * block_size)
    assert_bits_equal(ours, gq.dequantize(raw, Q[name]))


@pytest.mark.parametrize("name", FAST)
def test_quantized_rows_match_gguf(name):
    rng = np.random.default_rng(7)
    cols = 1024 if name.endswith("_K") else 96
    x = rng.standard_normal((12, cols)) * 10.0 ** rng.uniform(-4, 3, (12, 1))
    x[3] = 0.0
    x[5, ::7] = -0.0
    importance = rng.uniform(0.1, 2.0, cols).astype(np.float32)
    for imp in (None, importance):
        raw = codecs.quantize(x.astype(np.float32), name, importance=imp)
        ours = codecs.dequantize(raw, name, (2, 6, cols))
        assert_bits_equal(ours, gq.dequantize(raw, Q[name]).reshape(2, 6, cols))


@pytest.mark.parametrize("name", FAST)
def test_rows_and_out(name):
    codec = codecs.get_codec(name)
    block_size, type_size = GGML_QUANT_SIZES[Q[name]]
    rng = np.random.default_rng(3)
    rows, nb = 5, 4
    cols = nb * block_size
    raw = random_blocks(rng, name, rows * nb).reshape(rows, nb * type_size)
    ref = gq.dequantize(raw, Q[name])
    for r in range(rows):  # each row decodes alone as it does among the others
        assert_bits_equal(codec.dequantize_rows(raw[r:r + 1], cols), ref[r:r + 1])
    out = np.full((rows, cols), np.nan, np.float32)
    assert codec.dequantize_rows(raw, cols, out=out) is out
    assert_bits_equal(out, ref)
    sliced = np.asfortranarray(raw)  # not C-contiguous: decoded from a copy
    assert_bits_equal(codec.dequantize_rows(sliced, cols), ref)
    assert codec.dequantize_rows(raw[:0], cols).shape == (0, cols)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", "IQ4_NL", "Q4_K"])
def test_out_checked_and_filled_by_every_decoder(name):
    codec = codecs.get_codec(name)
    x = np.random.default_rng(5).standard_normal((3, 256)).astype(np.float32)
    raw = codecs.quantize(x, name)
    ref = codec.dequantize_rows(raw, 256)
    out = np.zeros((3, 256), np.float32)
    assert codec.dequantize_rows(raw, 256, out=out) is out
    assert_bits_equal(out, ref)
    bad = [np.zeros((3, 512), np.float32), np.zeros((3, 256), np.float64),
           np.zeros((256, 3), np.float32).T]
    for b in bad:
        with pytest.raises(ValueError, match=r"out must be .* shape \(3, 256\)"):
            codec.dequantize_rows(raw, 256, out=b)


def test_kernel_refuses_a_short_output():
    raw = random_blocks(np.random.default_rng(0), "Q4_K", 2)
    with pytest.raises(ValueError, match="fewer values"):
        _dequant.dequant_q4_k(raw, np.empty(511, np.float32))
