"""GPTQ's int8 rounding (calibrate/gptq.py): the lazy-batch algorithm equals the column-by-column
one, keeps round to nearest's grid, lowers the output error on correlated inputs, and through
`smooth --format compressed-tensors --gptq` writes those integers, resumes to the same bytes and
lowers the simulated W8A8 error of the model; and it is refused where it does not apply."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from quantcli.calibrate.gptq import gptq_int8, output_error
from quantcli.cli.app import app
from quantcli.engine.w8a8 import quantize_weight
from quantcli.errors import NumericError
from tests.models import write_model

runner = CliRunner()
TEXT = "In the beginning God created the heaven and the earth. And the earth was without form. " * 40
CTX = ["--ctx", "64", "--chunks", "4"]


def correlated(n_tokens: int, n_in: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = np.eye(n_in) + 0.3 * rng.standard_normal((n_in, n_in))
    return (rng.standard_normal((n_tokens, n_in)) @ mix).astype(np.float32)


def gptq_columns(w: np.ndarray, h: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """The paper's algorithm 1 without batching: round column j, spread its error over j+1.. at once."""
    n = w.shape[1]
    scale = np.abs(w).max(axis=1).astype(np.float32) / np.float32(127)
    hd = np.array(h, np.float64)
    hd[np.diag_indices(n)] += damp * np.mean(np.diag(hd))
    u = np.linalg.cholesky(np.linalg.inv(hd)).T
    W = w.astype(np.float64)
    q = np.zeros(w.shape, np.int8)
    for j in range(n):
        q[:, j] = np.clip(np.rint(W[:, j] / scale), -127, 127)
        err = (W[:, j] - q[:, j] * scale.astype(np.float64)) / u[j, j]
        W[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    return q


def test_lazy_batches_equal_the_column_by_column_algorithm_and_keep_the_grid():
    x = correlated(2000, 96)
    w = np.random.default_rng(1).standard_normal((40, 96)).astype(np.float32)
    h = x.T.astype(np.float64) @ x / len(x)
    q, scale = gptq_int8(w, h, block=32)
    ref = gptq_columns(w, h)
    assert q.dtype == np.int8 and np.abs(q.astype(np.int32)).max() <= 127
    assert np.mean(q != ref) < 1e-3 and np.abs(q.astype(np.int32) - ref).max() <= 1  # float ties at most
    np.testing.assert_array_equal(scale, quantize_weight(w)[1])  # round to nearest's scales
    q0, _ = quantize_weight(w)
    assert output_error(w, q, scale, h) < 0.7 * output_error(w, q0, scale, h)
    assert np.mean(q != q0) > 0.05  # it does round differently


def test_act_order_rounds_the_loudest_inputs_first():
    x = correlated(2000, 64, seed=3) * np.linspace(0.2, 4.0, 64, dtype=np.float32)[::-1][np.random.default_rng(4).permutation(64)]
    w = np.random.default_rng(5).standard_normal((24, 64)).astype(np.float32)
    h = x.T.astype(np.float64) @ x / len(x)
    order = np.argsort(-(np.diag(h) + 0.01 * np.mean(np.diag(h))), kind="stable")
    ref = np.empty((24, 64), np.int8)
    ref[:, order] = gptq_columns(w[:, order], h[np.ix_(order, order)])
    q, scale = gptq_int8(w, h, block=16, act_order=True)
    assert np.mean(q != ref) < 1e-3 and np.abs(q.astype(np.int32) - ref).max() <= 1
    plain = gptq_int8(w, h, block=16)[0]
    assert (plain != q).any()
    q0 = quantize_weight(w)[0]
    assert output_error(w, q, scale, h) < output_error(w, q0, scale, h)


def test_nan_activations_are_a_numeric_error():
    h = np.eye(8)
    h[2, 2] = np.nan
    with pytest.raises(NumericError, match="blk.0.attn_q.weight: its inputs' second moment is not finite"):
        gptq_int8(np.ones((4, 8), np.float32), h, name="blk.0.attn_q.weight")
    w = np.ones((4, 8), np.float32)
    w[1, 3] = np.inf
    with pytest.raises(NumericError, match="blk.0.attn_q.weight: NaN or Inf weights cannot be quantized"):
        gptq_int8(w, np.eye(8), name="blk.0.attn_q.weight")


def test_dead_inputs_round_to_nearest_and_a_zero_row_stays_zero():
    x = correlated(1000, 32)
    x[:, 5] = 0.0
    w = np.random.default_rng(2).standard_normal((8, 32)).astype(np.float32)
    w[3] = 0.0
    h = x.T.astype(np.float64) @ x / len(x)
    q, scale = gptq_int8(w, h, block=8)
    q0, _ = quantize_weight(w)
    assert scale[3] == 0 and not q[3].any()
    np.testing.assert_array_equal(q[:, 5], q0[:, 5])  # no other column's error flows into it
    assert (q != q0).any() and np.isfinite(output_error(w, q, scale, h))


@pytest.fixture
def setup(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    src = write_model(tmp_path / "m.gguf", "gemma3", n_layer=2)
    return tmp_path, src, text


def smooth(*args: str):
    return runner.invoke(app, ["smooth", *args])


def test_compressed_tensors_with_gptq_writes_its_integers_on_the_same_scales(setup, monkeypatch):
    tmp, src, text = setup
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    common = [str(src), "--calib", str(text), *CTX, "--alpha", "0.5", "--mappings", "all",
              "--format", "compressed-tensors", "--json"]
    rtn = smooth(*common, "-o", str(tmp / "rtn"))
    assert rtn.exit_code == 0, rtn.output
    res = smooth(*common, "-o", str(tmp / "gptq"), "--gptq", "--keep-checkpoints")
    assert res.exit_code == 0, res.output
    g = json.loads(res.stdout)["gptq"]
    assert g["linears"] == 14 and 0 < g["error_gptq"] < g["error_rtn"] and g["reduction"] > 0.05
    assert json.loads(rtn.stdout)["gptq"] is None
    a, b = load_file(tmp / "rtn" / "model.safetensors"), load_file(tmp / "gptq" / "model.safetensors")
    assert a.keys() == b.keys()
    changed = 0
    for k in a:
        if k.endswith(".weight") and a[k].dtype == np.int8:
            np.testing.assert_array_equal(a[k.replace(".weight", ".weight_scale")],
                                          b[k.replace(".weight", ".weight_scale")])
            assert b[k].dtype == np.int8 and np.abs(b[k].astype(np.int32)).max() <= 127
            changed += int((a[k] != b[k]).sum())
        elif not k.endswith("_scale"):
            np.testing.assert_array_equal(a[k], b[k])  # norms, embeddings: the same smoothed values
    assert changed > 0
    meta = json.loads((tmp / "gptq" / "config.json").read_text())
    assert meta["quantization_config"]["format"] == "int-quantized"
    header = json.loads(__import__("safetensors").safe_open(tmp / "gptq" / "model.safetensors", "np")
                        .metadata()["quantcli.smooth"])
    assert header["weights"] == "gptq"
    # resumed from the kept checkpoints, a minute later: the same bytes, the first run's date too
    data = (tmp / "gptq" / "model.safetensors").read_bytes()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000060")
    again = smooth(*common, "-o", str(tmp / "gptq"), "--gptq", "--keep-checkpoints", "--force")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["resumed_layers"] == 2
    assert (tmp / "gptq" / "model.safetensors").read_bytes() == data


@pytest.mark.parametrize("extra, words", [
    ((), "--gptq rounds the int8 per-channel weights of --format compressed-tensors"),
    (("--format", "compressed-tensors", "--ray"), "--gptq rounds each layer where"),
])
def test_gptq_where_it_does_not_apply_is_one_line_and_writes_nothing(setup, extra, words):
    tmp, src, text = setup
    before = sorted(p.name for p in tmp.iterdir())
    res = smooth(str(src), "-o", str(tmp / "out"), "--calib", str(text), *CTX, "--gptq", *extra)
    assert res.exit_code == 2, res.output
    assert words in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in tmp.iterdir()) == before
