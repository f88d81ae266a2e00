"""`quantize --format compressed-tensors --scheme W4A16`: int4 groups of 64 by the SYM4_B64 codec in
compressed-tensors' pack-quantized layout, read back with safetensors alone and unpacked here
independently of the writer (tests/pipelines/test_compressed_tensors_torch.py has the library's own
decompression)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from quantcli import codecs
from quantcli.cli.app import app
from quantcli.convert.to_hf import HFLayout, block_linear
from quantcli.formats import open_model
from tests.convert.lora_files import peft_factors, write_peft
from tests.models import ARCHS, write_model

runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def unpack_int32(packed: np.ndarray, cols: int) -> np.ndarray:
    """compressed-tensors' unpack_from_int32 for 4 bits, written out: value i of a row is bits
    4i..4i+3 of the row's little-endian words, minus 8."""
    words = packed.astype("<u4")
    shifts = np.arange(8, dtype=np.uint32) * 4
    vals = (words[:, :, None] >> shifts) & 0xF  # [rows, words, 8]
    return vals.reshape(packed.shape[0], -1)[:, :cols].astype(np.int32) - 8


W4A16_CONFIG = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                   "group_size": 64, "strategy": "group", "dynamic": False},
                "input_activations": None, "output_activations": None, "format": None}


@pytest.mark.parametrize("arch", ARCHS)
def test_w4a16_weights_are_the_sym4_codec_values(tmp_path, arch):
    extra = dict(sliding_window=8, swa_pattern=2) if arch == "gemma3" else {}
    src = write_model(tmp_path / f"{arch}.gguf", arch, n_layer=2, n_ff=128, tied=arch == "gemma3", **extra)
    out = tmp_path / "w4a16"
    res = _cli("quantize", src, out, "--format", "compressed-tensors", "--scheme", "W4A16", "-q")
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    assert qc["config_groups"] == {"group_0": W4A16_CONFIG} and qc["ignore"] == ["lm_head"]
    state = load_file(str(out / "model.safetensors"))
    reader = open_model(src)
    layout = HFLayout.of(reader)
    linears = [n for n in reader.tensors if block_linear(n)]
    assert linears
    for name in linears:
        module = layout.module(name)
        w = layout.to_hf(name, reader.load_f32(name))
        n_out, n_in = w.shape
        packed, scale, shape = (state[f"{module}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape"))
        assert (packed.dtype, packed.shape) == (np.int32, (n_out, n_in // 8))
        assert (scale.dtype, scale.shape) == (np.float32, (n_out, n_in // 64))
        assert shape.dtype == np.int64 and list(shape) == [n_out, n_in]
        q = unpack_int32(packed, n_in)
        assert q.min() >= -7 and q.max() <= 7
        dq = q.astype(np.float32) * np.repeat(scale, 64, axis=1)
        assert np.array_equal(dq, codecs.dequantize(codecs.quantize(w, "SYM4_B64"), "SYM4_B64", w.shape))
        assert f"{module}.weight" not in state
    for name in reader.tensors:
        if block_linear(name) is None and layout.name(name):
            assert np.array_equal(state[layout.name(name)], layout.to_hf(name, reader.load_f32(name)))
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.metadata()["quantcli.scheme"] == "W4A16" and f.metadata()["format"] == "pt"


def test_rows_that_do_not_split_into_groups_stay_float(tmp_path):
    """ffn_down of n_ff 96 has rows of 96: kept in its dtype, listed in `ignore`, with a warning."""
    src = write_model(tmp_path / "m.gguf", "llama", n_layer=2, n_ff=96, tied=False)
    out = tmp_path / "w4a16"
    res = _cli("quantize", src, out, "--format", "compressed-tensors", "--scheme", "W4A16", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["size"]["quantized_linears"] == 2 * 6
    assert any("do not split into groups of 64: kept in their stored dtype" in w for w in doc["warnings"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    state = load_file(str(out / "model.safetensors"))
    assert state["model.layers.0.mlp.down_proj.weight"].dtype == np.float32
    assert "model.layers.0.mlp.up_proj.weight_packed" in state


def test_w4a16_of_a_lora_merged_model(tmp_path):
    src = write_model(tmp_path / "m.gguf", "llama", n_layer=1, n_ff=128, tied=False)
    factors = peft_factors({"model.layers.0.mlp.up_proj": (64, 128)}, 8, seed=2)
    ad = write_peft(tmp_path / "ad", factors, 8, 16)
    out = tmp_path / "w4a16"
    assert _cli("quantize", src, out, "--format", "compressed-tensors", "--scheme", "W4A16", "--lora", ad,
                "-q").exit_code == 0
    state = load_file(str(out / "model.safetensors"))
    a, b = factors["model.layers.0.mlp.up_proj"]
    w = open_model(src).load_f32("blk.0.ffn_up.weight")
    merged = (w.astype(np.float64) + 2.0 * (b.astype(np.float64) @ a)).astype(np.float32)
    q = unpack_int32(state["model.layers.0.mlp.up_proj.weight_packed"], 64)
    dq = q.astype(np.float32) * np.repeat(state["model.layers.0.mlp.up_proj.weight_scale"], 64, axis=1)
    assert np.abs(dq - merged).max() <= np.abs(merged).max() / 7 / 2 * 1.0001
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta["quantcli.scheme"] == "W4A16" and meta["quantcli.codec"] == "SYM4_B64"
    assert json.loads(meta["quantcli.lora"])[0]["rank"] == [8]


@pytest.mark.parametrize("args,match", [
    (("--scheme", "W4A16"), "--scheme W4A16 is a compressed-tensors scheme: add --format compressed-tensors"),
    (("--format", "compressed-tensors"), "--format compressed-tensors needs --scheme W8A8 or W4A16"),
    (("--format", "compressed-tensors", "--scheme", "W3"), "needs --scheme W8A8 or W4A16, not 'W3'"),
    (("--format", "compressed-tensors", "--scheme", "W4A16", "--type", "Q4_K_M"), "--preset choose GGUF types"),
    (("--format", "onnx", "--scheme", "W4A16"), "unknown output format 'onnx'"),
])
def test_refusals(tmp_path, args, match):
    src = write_model(tmp_path / "m.gguf", "llama", n_layer=1, n_ff=128, tied=False)
    out = tmp_path / "never"
    res = _cli("quantize", src, out, *args)
    assert res.exit_code == 2, res.output
    assert match in res.output.splitlines()[0] and not out.exists()


def test_existing_directory_needs_force(tmp_path):
    src = write_model(tmp_path / "m.gguf", "llama", n_layer=1, n_ff=128, tied=False)
    out = tmp_path / "w4a16"
    out.mkdir()
    res = _cli("quantize", src, out, "--format", "compressed-tensors", "--scheme", "W4A16")
    assert res.exit_code == 4 and "already exists" in res.output
    assert _cli("quantize", src, out, "--format", "compressed-tensors", "--scheme", "W4A16", "-f", "-q").exit_code == 0
    assert (out / "config.json").is_file()
    assert Path(out).is_dir()
