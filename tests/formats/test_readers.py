"""Readers list tensors lazily and decode them exactly; the writer round-trips through gguf-py."""

from __future__ import annotations

import io
import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from quantcli.formats import GGUFWriter, open_model
from quantcli.formats.dtypes import bf16_to_f32
from tests.conftest import safetensors_bytes


def test_gguf_reader_lists_and_loads(tiny_gguf):
    with open_model(tiny_gguf) as m:
        assert m.format == "gguf" and m.architecture == "llama"
        assert list(m.tensors) == ["token_embd.weight", "blk.0.attn_norm.weight",
                                   "blk.0.attn_q.weight", "blk.1.attn_q.weight"]
        info = m.tensors["token_embd.weight"]
        assert info.shape == (16, 64) and info.gguf_shape == (64, 16) and info.dtype == "F32"
        x = m.load_f32("token_embd.weight")
        ref = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
        assert np.array_equal(x, ref)
        assert m.summary()["layers"] == 2


def test_writer_round_trip_through_gguf_py(tmp_path):
    x = np.arange(64 * 4, dtype=np.float32).reshape(4, 64)
    half = x.astype(np.float16)
    meta = {"general.architecture": "llama", "llama.block_count": 2, "some.float": 0.5,
            "some.list": ["a", "bé"], "some.ints": np.array([1, 2, 3], dtype=np.int32), "flag": True}
    path = tmp_path / "w.gguf"
    with open(path, "wb") as fh:
        w = GGUFWriter(fh, meta, [("x", x.shape, Q.F32), ("h", half.shape, Q.F16)])
        w.write_tensor("x", x)
        w.write_tensor("h", half)
        w.finish()
    r = gguf.GGUFReader(path)  # an independent reader agrees
    assert [t.name for t in r.tensors] == ["x", "h"]
    assert np.array_equal(r.tensors[0].data, x) and np.array_equal(r.tensors[1].data, half)
    assert r.fields["some.list"].contents() == ["a", "bé"]
    with open_model(path) as m:  # and so does ours
        assert m.meta("llama.block_count") == 2 and m.meta("flag") is True
        assert list(m.meta("some.ints")) == [1, 2, 3]
        assert np.array_equal(m.load_f32("h"), half.astype(np.float32))


def test_writer_refuses_out_of_order_and_wrong_size():
    fh = io.BytesIO()
    w = GGUFWriter(fh, {}, [("a", (2, 32), Q.F32), ("b", (2, 32), Q.F32)])
    with pytest.raises(ValueError, match="out of order"):
        w.write_tensor("b", np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match="needs 256"):
        w.write_tensor("a", np.zeros((2, 16), np.float32))


def test_safetensors_dtypes(tmp_path):
    vals = np.array([1.5, -2.25, 3.0e-3, 65504.0], dtype=np.float32)
    bf16 = (vals.view(np.uint32) >> 16).astype("<u2")
    header = {
        "f32": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "f16": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]},
        "bf16": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [24, 32]},
        "i64": {"dtype": "I64", "shape": [2], "data_offsets": [32, 48]},
        "f64": {"dtype": "F64", "shape": [1], "data_offsets": [48, 56]},
    }
    data = (vals.tobytes() + vals.astype("<f2").tobytes() + bf16.tobytes()
            + np.array([7, -9], "<i8").tobytes() + np.array([0.1], "<f8").tobytes())
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes(header=header, data=data))
    with open_model(path) as m:
        assert m.format == "safetensors"
        assert np.array_equal(m.load_f32("f32"), vals)
        assert np.array_equal(m.load_f32("f16"), vals.astype(np.float16).astype(np.float32))
        assert np.array_equal(m.load_f32("bf16").reshape(-1), bf16_to_f32(bf16))
        assert m.load_f32("i64").tolist() == [7.0, -9.0]
        assert m.load_f32("f64")[0] == np.float32(0.1)


def test_bf16_decode_is_exact():
    bits = np.arange(0, 1 << 16, 97, dtype=np.uint16)
    got = bf16_to_f32(bits.view(np.uint8))
    expect = (bits.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(got.view(np.uint32), expect.view(np.uint32))


def test_hf_directory_sharded(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 8,
        "vocab_size": 10, "max_position_embeddings": 64}))
    (tmp_path / "a.safetensors").write_bytes(safetensors_bytes({"x": np.ones((2, 8), np.float32)}))
    (tmp_path / "b.safetensors").write_bytes(safetensors_bytes({"y": np.zeros((8,), np.float16)}))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    with open_model(tmp_path) as m:
        assert set(m.tensors) == {"x", "y"}
        assert m.summary()["architecture"] == "LlamaForCausalLM" and m.summary()["layers"] == 2
        assert m.meta("hf.hidden_size") == 8
        assert m.load_f32("x").sum() == 16.0


def test_real_model_lists_236_tensors(real_model):
    with open_model(real_model) as m:
        assert len(m.tensors) == 236
        assert m.architecture == "gemma3" and m.summary()["layers"] == 18
