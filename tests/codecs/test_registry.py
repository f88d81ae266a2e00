"""Every registered codec, through the public entry points: a new codec gets these tests for free.

Decoding is tested for `registered_types(quantizable=False)` (read-only codecs too), encoding for
`registered_types()`. Arrays are a few rows of 512 (every block size divides it) so that the slow
IQ1/IQ2 searches stay cheap.
"""

from __future__ import annotations

import re
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from quantcli import codecs
from quantcli.codecs.base import _REGISTRY, Codec
from quantcli.errors import UsageError

DECODE = codecs.registered_types(quantizable=False)
ENCODE = codecs.registered_types()
READ_ONLY = [t for t in DECODE if t not in ENCODE]
COLS = 512

# Round-trip RMSE bounds on N(0,1) rows (4 x 512, seed 0; importance uniform in [0.5, 2) for the
# types that require it). Measured over seeds 0-19 (range in the comment) and set to ~1.4x the
# largest, rounded to two digits: a kernel that is off by a scale, a shift or a code is far outside,
# one that writes zeros gives ~1.0. TQ1_0/TQ2_0 (ternary, d = absmax, meant for ternary-trained
# weights) lose ~0.8 on Gaussian data, so their bound is 1.13x to stay under 1.0; they are also
# checked to be exact on ternary data below.
RMSE_BOUND = {
    "F32": 0.0,  # exact
    "F16": 0.00032,  # 0.000202-0.000217
    "BF16": 0.0024,  # 0.00159-0.00170
    "Q8_0": 0.0078,  # 0.00506-0.00557
    "TQ1_0": 0.95,  # 0.768-0.837
    "TQ2_0": 0.95,  # 0.768-0.837 (same values as TQ1_0, packed in 2 bits)
    "MXFP4": 0.17,  # 0.111-0.120
    "Q4_0": 0.13,  # 0.0808-0.0891
    "Q4_1": 0.12,  # 0.0752-0.0819
    "Q5_0": 0.063,  # 0.0412-0.0448
    "Q5_1": 0.055,  # 0.0363-0.0389
    "Q2_K": 0.43,  # 0.287-0.305
    "Q3_K": 0.22,  # 0.146-0.157
    "Q4_K": 0.11,  # 0.0688-0.0738
    "Q5_K": 0.052,  # 0.0346-0.0371
    "Q6_K": 0.026,  # 0.0172-0.0182
    "IQ4_NL": 0.11,  # 0.0734-0.0780
    "IQ4_XS": 0.11,  # 0.0740-0.0785
    "IQ3_XXS": 0.31,  # 0.203-0.218
    "IQ3_S": 0.25,  # 0.159-0.173
    "IQ2_XXS": 0.5,  # 0.336-0.356, with importance
    "IQ2_XS": 0.44,  # 0.292-0.312, with importance
    "IQ2_S": 0.39,  # 0.256-0.276
    "IQ1_S": 0.71,  # 0.475-0.506, with importance
    "IQ1_M": 0.85,  # 0.559-0.607 (0.47 with importance: without, ggml weights by x^2)
}  # fmt: skip


def gaussian(qtype: Q, rows: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """N(0,1) rows, and a random positive importance where the type requires one."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, COLS)).astype(np.float32)
    need = codecs.get_codec(qtype).requires_importance
    return x, rng.uniform(0.5, 2.0, COLS).astype(np.float32) if need else None


def ids(types: list[Q]) -> list[str]:
    return [t.name for t in types]


# -- decoding: every registered type ------------------------------------------------------------
@pytest.mark.parametrize("qtype", DECODE, ids=ids(DECODE))
def test_row_bytes_are_ggmls(qtype):
    codec = codecs.get_codec(qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    assert (codec.block_size, codec.type_size) == (block, size)
    for cols in (block, 512, 4096):
        assert codec.row_bytes(cols) == cols // block * size
    back = codecs.dequantize(np.zeros(3 * codec.row_bytes(COLS), np.uint8), qtype, (3, COLS))
    assert back.shape == (3, COLS) and back.dtype == np.float32
    with pytest.raises(UsageError, match=f"needs {3 * codec.row_bytes(COLS)} bytes, got"):
        codecs.dequantize(np.zeros(3 * codec.row_bytes(COLS) + 1, np.uint8), qtype, (3, COLS))


@pytest.mark.parametrize("qtype", DECODE, ids=ids(DECODE))
def test_zero_bytes_decode_to_zeros(qtype):
    data = np.zeros(2 * codecs.get_codec(qtype).row_bytes(COLS), np.uint8)
    assert not codecs.dequantize(data, qtype, (2, COLS)).any()


@pytest.mark.parametrize("qtype", DECODE, ids=ids(DECODE))
def test_rows_decode_independently(qtype):
    codec = codecs.get_codec(qtype)
    data = np.random.default_rng(5).integers(0, 256, (3, codec.row_bytes(COLS)), dtype=np.uint8)
    whole = codecs.dequantize(data, qtype, (3, COLS))
    for r in range(3):
        alone = codecs.dequantize(data[r], qtype, (COLS,))
        assert np.array_equal(whole[r], alone, equal_nan=True)


# -- encoding: every type quantcli writes -------------------------------------------------------
@pytest.mark.parametrize("qtype", ENCODE, ids=ids(ENCODE))
def test_quantize_output_is_row_bytes(qtype):
    x, imp = gaussian(qtype, rows=3)
    data = codecs.quantize(x, qtype, imp)
    assert data.dtype == np.uint8 and data.shape == (3, codecs.get_codec(qtype).row_bytes(COLS))


@pytest.mark.parametrize("qtype", ENCODE, ids=ids(ENCODE))
def test_zeros_stay_zeros(qtype):
    x = np.zeros((2, COLS), np.float32)
    for imp in (None, np.ones(COLS, np.float32)):
        if imp is None and codecs.get_codec(qtype).requires_importance:
            continue
        data = codecs.quantize(x, qtype, imp)
        assert not codecs.dequantize(data, qtype, x.shape).any()


@pytest.mark.parametrize("qtype", ENCODE, ids=ids(ENCODE))
def test_rows_quantize_independently(qtype):
    x, imp = gaussian(qtype, rows=3, seed=2)
    x[1] *= 40.0  # rows of very different scale: no statistic may leak from one row to another
    whole = codecs.quantize(x, qtype, imp)
    for r in range(3):
        assert np.array_equal(codecs.quantize(x[r], qtype, imp)[0], whole[r])


def test_every_quantizable_type_has_an_rmse_bound():
    assert sorted(RMSE_BOUND) == sorted(ids(ENCODE))


@pytest.mark.parametrize("qtype", ENCODE, ids=ids(ENCODE))
def test_round_trip_rmse(qtype):
    x, imp = gaussian(qtype)
    back = codecs.dequantize(codecs.quantize(x, qtype, imp), qtype, x.shape)
    rmse = float(np.sqrt(np.mean((back.astype(np.float64) - x) ** 2)))
    assert rmse <= RMSE_BOUND[qtype.name]


@pytest.mark.parametrize("qtype", ["TQ1_0", "TQ2_0"])
def test_ternary_types_are_exact_on_ternary_data(qtype):
    x = np.random.default_rng(3).integers(-1, 2, (2, COLS)).astype(np.float32) * 0.5
    x[:, 0] = 0.5  # every block of 256 reaches the scale
    x[:, 256] = -0.5
    assert np.array_equal(codecs.dequantize(codecs.quantize(x, qtype), qtype, x.shape), x)


@pytest.mark.parametrize("qtype", [t for t in ENCODE if codecs.get_codec(t).requires_importance],
                         ids=lambda t: t.name)
def test_types_that_need_importance_refuse_without(qtype):
    with pytest.raises(UsageError, match=f"{qtype.name} cannot be quantized without importance"):
        codecs.quantize(np.ones((1, COLS), np.float32), qtype)


@pytest.mark.parametrize("qtype", READ_ONLY, ids=ids(READ_ONLY))
def test_read_only_types_refuse_to_quantize(qtype):
    with pytest.raises(UsageError, match=f"quantizing to {qtype.name} is not supported; "
                                         f"supported: F32, F16"):
        codecs.quantize(np.ones((1, COLS), np.float32), qtype)


# -- the registry itself --------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", DECODE, ids=ids(DECODE))
def test_duplicate_registration_refused(qtype):
    before = dict(_REGISTRY)
    owner = codecs.get_codec(qtype)
    owner_name = re.escape(f"{owner.__module__}.{owner.__qualname__}")
    with pytest.raises(ValueError, match=rf"GGML type {qtype.name} is already registered to "
                                         rf"{owner_name}; {__name__}\..*\.Again cannot register"):
        class Again(Codec, ggml_type=qtype):
            pass
    assert _REGISTRY == before


def test_each_type_has_one_codec_of_its_own():
    assert all(codecs.get_codec(t).ggml_type == t for t in DECODE)
    assert len({codecs.get_codec(t) for t in DECODE}) == len(DECODE)


def test_unknown_names_list_the_known():
    known = ", ".join(ids(ENCODE))
    named = ", ".join(t.name for t in codecs.named_types())
    with pytest.raises(UsageError, match=f"unknown type 'Q4K'; known: {known}, and outside GGUF {named}$"):
        codecs.quantize(np.ones((1, 32), np.float32), "Q4K")
    with pytest.raises(UsageError, match=f"type Q8_K has no codec; known: {known}$"):
        codecs.get_codec("Q8_K")
    with pytest.raises(UsageError, match="unknown GGML type id 9999"):
        codecs.get_codec(9999)
    assert codecs.get_codec(" q4_k ") is codecs.get_codec(Q.Q4_K) is codecs.get_codec(12)
