"""Readers list tensors lazily and decode them exactly; the writer round-trips through gguf-py."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from quantcli.formats import TensorSpec, create_writer, open_model
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
    with create_writer("gguf", path, meta, [TensorSpec("x", x.shape, "F32"), TensorSpec("h", half.shape, "F16")]) as w:
        w.write("x", x)
        w.write("h", half)
        w.finish()
    r = gguf.GGUFReader(path)  # an independent reader agrees
    assert [t.name for t in r.tensors] == ["x", "h"]
    assert np.array_equal(r.tensors[0].data, x) and np.array_equal(r.tensors[1].data, half)
    assert r.fields["some.list"].contents() == ["a", "bé"]
    with open_model(path) as m:  # and so does ours
        assert m.meta("llama.block_count") == 2 and m.meta("flag") is True
        assert list(m.meta("some.ints")) == [1, 2, 3]
        assert np.array_equal(m.load_f32("h"), half.astype(np.float32))


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


def _strings_blob(strings: list[bytes]) -> bytes:
    return b"".join(len(s).to_bytes(8, "little") + s for s in strings)


def _walk_one_by_one(blob: bytes, count: int) -> int | str:
    """Where `count` strings end, or which check fails: the plain reading of the format."""
    pos = 0
    for _ in range(count):
        if pos + 8 > len(blob):
            return "runs past the end"
        n = int.from_bytes(blob[pos:pos + 8], "little")
        pos += 8
        if n > len(blob) - pos:
            return "claims"
        pos += n
    return pos


@pytest.mark.parametrize("seed", range(8))
def test_string_array_walk_matches_one_by_one(seed):
    """The windowed walk over string arrays (runs of strings under 256 bytes) ends where reading
    one string at a time ends, and fails where it fails: long strings, empty ones, runs of zero
    bytes inside strings (false starts), arrays cut short."""
    from pathlib import Path

    from quantcli.errors import InputError
    from quantcli.formats.gguf import _Cursor, _skip_strings

    rng = np.random.default_rng(seed)
    strings = []
    odd = [0.0, 0.002, 0.02, 0.2][seed % 4]  # share of long strings and of zero-filled ones
    for _ in range(int(rng.integers(900, 20000))):
        kind = rng.random()
        if kind < odd / 2:
            s = bytes(rng.integers(0, 256, int(rng.integers(256, 700)), dtype=np.uint8))  # long
        elif kind < odd:
            s = b"\0" * int(rng.integers(0, 40))  # empty, or zeros: false starts inside the string
        else:
            s = bytes(rng.integers(0, 256, int(rng.integers(1, 30)), dtype=np.uint8))
        strings.append(s)
    blob = _strings_blob(strings) + b"tail"
    for count, cut in [(len(strings), len(blob)), (len(strings) - 7, len(blob)),
                       (len(strings), int(rng.integers(len(blob) // 2, len(blob) - 4)))]:
        data = blob[:cut]
        expect = _walk_one_by_one(data, count)
        cur = _Cursor(memoryview(data), Path("v.gguf"))
        if isinstance(expect, str):
            with pytest.raises(InputError, match=expect):
                _skip_strings(cur, count, "tokenizer.ggml.tokens")
        else:
            _skip_strings(cur, count, "tokenizer.ggml.tokens")
            assert cur.pos == expect
