"""`quantize_with_error` / `measure`: the figures are those numpy computes from `quantize` and
`dequantize`, slices merge into the whole, and the bytes are `quantize`'s."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from quantcli import codecs
from quantcli.codecs import QuantError, error
from quantcli.errors import NumericError, UsageError

TYPES = ["Q4_K", "Q8_0", "Q4_0", "IQ4_XS", "IQ2_XXS", "TQ2_0", "F16", "BF16", "F32"]
REL = 1e-12  # sums in another order: float64 rounding only


def data(rows: int = 6, cols: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    return x, rng.exponential(1.0, cols).astype(np.float32)


def reference(x: np.ndarray, qtype: str, imp: np.ndarray | None) -> dict[str, float]:
    """The figures from numpy temporaries, in float64."""
    back = codecs.dequantize(codecs.quantize(x, qtype, imp), qtype, x.shape).astype(np.float64)
    w = np.ones(x.shape[1]) if imp is None else imp.astype(np.float64)
    x64 = x.astype(np.float64)
    d = x64 - back
    return {"sse": (d * d).sum(), "weighted_sse": (w * d * d).sum(), "max_abs": np.abs(d).max(),
            "norm": (x64 * x64).sum(), "weighted_norm": (w * x64 * x64).sum(),
            "row_sse": (d * d).sum(axis=1), "row_max_abs": np.abs(d).max(axis=1)}


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
def test_figures_equal_numpy(qtype, weighted):
    x, imp = data()
    imp = imp if weighted or codecs.get_codec(qtype).requires_importance else None
    ref = reference(x, qtype, imp)
    q_bytes, err = codecs.quantize_with_error(x, qtype, imp)
    assert np.array_equal(q_bytes, codecs.quantize(x, qtype, imp))
    assert err == codecs.measure(x, qtype, imp)
    assert (err.ggml_type, err.rows, err.cols, err.count) == (Q[qtype], 6, 512, 6 * 512)
    for name in ("sse", "weighted_sse", "norm", "weighted_norm"):
        assert getattr(err, name) == pytest.approx(ref[name], rel=REL, abs=1e-300)
    assert err.max_abs == ref["max_abs"]  # one float64 difference per value: exact
    assert np.array_equal(err.row_max_abs, ref["row_max_abs"])
    np.testing.assert_allclose(err.row_sse, ref["row_sse"], rtol=REL)
    assert err.mse == pytest.approx(ref["sse"] / x.size, rel=REL)
    assert err.rmse == pytest.approx(math.sqrt(ref["sse"] / x.size), rel=REL)
    np.testing.assert_allclose(err.row_rmse, np.sqrt(ref["row_sse"] / 512), rtol=REL)
    rel = ref["weighted_sse"] / ref["weighted_norm"]
    assert err.relative == pytest.approx(rel, rel=REL)
    if imp is None:
        assert err.weighted_sse == err.sse and err.weighted_norm == err.norm
    if qtype == "F32":
        assert err.sse == err.max_abs == err.relative == 0.0
    else:
        assert 0 < err.rmse < 1


def test_importance_weights_the_squared_error():
    x, imp = data(seed=1)
    # Q8_0 ignores importance, so the bytes are the same and only the weighting differs
    spiky = np.where(np.arange(512) == 7, 1000.0, 1.0).astype(np.float32)
    weighted, plain = codecs.measure(x, "Q8_0", spiky), codecs.measure(x, "Q8_0")
    back = codecs.dequantize(codecs.quantize(x, "Q8_0"), "Q8_0", x.shape).astype(np.float64)
    col7 = ((x[:, 7] - back[:, 7]) ** 2).sum()
    assert weighted.sse == plain.sse and weighted.max_abs == plain.max_abs
    assert weighted.weighted_sse == pytest.approx(plain.sse + 999 * col7, rel=REL)
    assert plain.weighted_sse == plain.sse
    # Q4_K searches for the weighted optimum: its bytes with the imatrix lose less of what the
    # imatrix weighs than its bytes without
    back = codecs.dequantize(codecs.quantize(x, "Q4_K"), "Q4_K", x.shape).astype(np.float64)
    assert codecs.measure(x, "Q4_K", imp).weighted_sse < (imp * (x - back) ** 2).sum()


@pytest.mark.parametrize("qtype", ["Q4_K", "IQ2_XXS", "F16"])
def test_slices_merge_into_the_whole(qtype):
    x, imp = data(rows=10, seed=2)
    whole = codecs.measure(x, qtype, imp)
    parts = [codecs.measure(x[a:b], qtype, imp) for a, b in ((0, 3), (3, 4), (4, 10))]
    merged = QuantError.merge(parts)
    assert parts[0].add(parts[1]).add(parts[2]) == merged
    assert (merged.ggml_type, merged.rows, merged.cols) == (whole.ggml_type, 10, 512)
    # each row's figures come from the same loop and the totals are correctly rounded sums of
    # them: equal, not close
    assert merged == whole and merged.relative == whole.relative and merged.rmse == whole.rmse
    assert np.array_equal(merged.per_row, whole.per_row)


def test_merge_refuses_other_types_and_widths():
    x, _ = data()
    a = codecs.measure(x, "Q4_K")
    with pytest.raises(ValueError, match="cannot merge the error of Q8_0 rows of 512 into that of Q4_K"):
        a.add(codecs.measure(x, "Q8_0"))
    with pytest.raises(ValueError, match="rows of 256 into that of Q4_K rows of 512"):
        a.add(codecs.measure(x[:, :256], "Q4_K"))
    with pytest.raises(ValueError, match="at least one"):
        QuantError.merge([])


def test_chunks_bound_memory_and_change_nothing(monkeypatch):
    x, imp = data(rows=9, seed=3)
    whole = codecs.quantize_with_error(x, "IQ4_XS", imp)[1]
    measured = codecs.measure(x, "IQ4_XS", imp)
    monkeypatch.setattr(error, "CHUNK_VALUES", 2 * 512)  # two rows a pass, the last pass one
    for err in (codecs.quantize_with_error(x, "IQ4_XS", imp)[1], codecs.measure(x, "IQ4_XS", imp)):
        assert err == whole == measured
        assert np.array_equal(err.row_sse, whole.row_sse)


@pytest.mark.parametrize("qtype", ["Q4_K", "IQ2_XXS", "Q8_0", "F16"])
def test_zeros_give_zero_error(qtype):
    x = np.zeros((3, 256), np.float32)
    err = codecs.measure(x, qtype, np.ones(256, np.float32))
    assert (err.sse, err.weighted_sse, err.max_abs, err.rmse, err.relative) == (0, 0, 0, 0, 0)
    empty = codecs.measure(np.zeros((0, 256), np.float32), qtype)
    assert (empty.rows, empty.rmse, empty.max_abs, empty.relative) == (0, 0.0, 0.0, 0.0)


def test_relative_error_of_a_lost_signal_is_infinite():
    err = QuantError.from_rows(Q.Q4_K, 256, np.array([[1.0, 1.0, 0.0, 0.0, 0.5]]))
    assert err.relative == math.inf


def test_to_json():
    x, _ = data()
    err = codecs.measure(x, "Q8_0")
    doc = err.to_json()
    assert doc == {"type": "Q8_0", "rows": 6, "cols": 512, "rmse": err.rmse, "max_abs": err.max_abs,
                   "weighted_sse": err.weighted_sse, "relative": err.relative}


@pytest.mark.parametrize("fn", [codecs.measure, codecs.quantize_with_error], ids=["measure", "with_error"])
def test_refusals_are_quantizes(fn):
    x = np.ones((2, 256), np.float32)
    for args, exc in ((("IQ2_XXS",), UsageError), (("NVFP4",), UsageError), (("Q4K",), UsageError)):
        with pytest.raises(exc) as ours:
            fn(x, *args)
        with pytest.raises(exc) as theirs:
            codecs.quantize(x, *args)
        assert str(ours.value) == str(theirs.value) and ours.value.hint == theirs.value.hint
    with pytest.raises(UsageError, match="divisible by its block size 256; row length is 100"):
        fn(np.ones((1, 100), np.float32), "Q4_K")
    bad = np.ones((300, 256), np.float32)
    bad[299, 3] = np.nan
    with pytest.raises(NumericError, match="in row 299, column 3"):
        fn(bad, "Q4_K")


def test_overflow_names_the_row_of_the_whole_input(monkeypatch):
    x = np.ones((5, 256), np.float32)
    x[3] = 1e6  # Q4_0's fp16 scale, 1e6 / 8, overflows
    monkeypatch.setattr(error, "CHUNK_VALUES", 256)  # one row a pass: row 3 is in the 4th chunk
    with pytest.raises(NumericError, match="row 3 has values up to 1e\\+06: Q4_0"):
        codecs.measure(x, "Q4_0")
    with pytest.raises(NumericError, match="row 3 has values up to 1e\\+06: Q4_0"):
        codecs.quantize_with_error(x, "Q4_0")
