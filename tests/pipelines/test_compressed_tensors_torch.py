"""`write_compressed_tensors`' directory through the libraries that load it: compressed-tensors
parses its config as its own W8A8 preset and decompresses our int8 weights to the engine's values;
transformers runs it to the engine's W8A8 logits. Skipped without torch, transformers and
compressed-tensors (the project does not depend on them; CI has none)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,  # noqa: E402
                                             preset_name_to_scheme)
from compressed_tensors.quantization.lifecycle.helpers import disable_quantization  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from quantcli.convert.to_hf import HFLayout, block_linear  # noqa: E402
from quantcli.engine.model import Model, forward  # noqa: E402
from quantcli.engine.w8a8 import W8A8, fake_quant_weight, mode_of  # noqa: E402
from quantcli.formats import open_model  # noqa: E402
from quantcli.pipelines.compressed_tensors import SCHEMA_VERSION, write_compressed_tensors  # noqa: E402
from tests.models import ARCHS, write_model  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 275, (1, 24))


def written(tmp_path: Path, arch: str, activations: str = "dynamic"):
    """(source reader, output directory, chosen linears, input maxima) of a 4-layer model."""
    extra = dict(sliding_window=8, swa_pattern=2) if arch == "gemma3" else {}
    src = open_model(write_model(tmp_path / f"{arch}.gguf", arch, n_layer=4, tied=arch == "gemma3", **extra))
    linears = [n for n in src.tensors if block_linear(n) is not None]
    amax = {n: 3.0 + i for i, n in enumerate(linears)}
    out = tmp_path / "out"
    write_compressed_tensors(src, out, linears=linears, activations=activations,
                             input_max=amax if activations == "static" else None)
    return src, out, linears, amax


# -- compressed-tensors --------------------------------------------------------------------------


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_config_is_compressed_tensors_own_w8a8(tmp_path, activations):
    """quantization_config equals what compressed-tensors' ModelCompressor.update_config writes
    for its W8A8 preset (with a per-tensor static input for "static"), version aside."""
    _, out, _, _ = written(tmp_path, "llama", activations)
    ours = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = preset_name_to_scheme("W8A8", ["Linear"])
    if activations == "static":
        scheme.input_activations = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor",
                                                    dynamic=False)
    lib = QuantizationConfig(config_groups={"group_0": scheme}, format="int-quantized",
                             quantization_status="compressed", ignore=["lm_head"])
    theirs = {"version": ct.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
              "transform_config": {}, **lib.model_dump(exclude=["quant_method"])}
    theirs = json.loads(json.dumps(theirs, default=str))
    assert {k: v for k, v in ours.items() if k != "version"} == {k: v for k, v in theirs.items() if k != "version"}
    assert ours["version"] == SCHEMA_VERSION
    parsed = QuantizationConfig.model_validate(ours)
    assert parsed.format == "int-quantized" and parsed.ignore == ["lm_head"]


@pytest.mark.parametrize("arch", ARCHS)
def test_compressed_tensors_decompresses_to_the_engine_weights(tmp_path, arch):
    """The library's int-quantized compressor turns weight and weight_scale back into exactly the
    engine's fake-quantized weights (in HF's row order); static input_scale loads as its shape."""
    src, out, linears, _ = written(tmp_path, arch, "static")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    compressor = BaseCompressor.get_value_from_registry(qc["format"])
    assert compressor.compression_param_names(scheme) == ("weight", "weight_scale")
    state = load_file(out / "model.safetensors")
    layout = HFLayout.of(src)
    for name in linears:
        module = layout.module(name)
        local = {k: state[f"{module}.{k}"] for k in ("weight", "weight_scale", "input_scale")}
        assert local["input_scale"].shape == (1,)
        dense = compressor.decompress(local, scheme)["weight"]
        want = layout.to_hf(name, fake_quant_weight(src.load_f32(name)))
        assert dense.dtype == torch.float32 and np.array_equal(dense.numpy(), want), name


# -- transformers ----------------------------------------------------------------------------------


class _WeightsOnly(W8A8):
    """The engine with int8 weights and unquantized activations."""

    def activations(self, name: str, x: np.ndarray) -> np.ndarray:
        return x


class _GgmlGelu(torch.nn.Module):
    """GELU as the engine (and ggml-cpu) evaluates it: a table over fp16 inputs holding fp16 values;
    0 below -10, the identity above 10."""

    def forward(self, x):
        y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x < -10, 0.0, torch.where(x > 10, x, y))


def _vllm_int8_input(module, args):
    """vLLM's dynamic_scaled_int8_quant: per token scale max|x| / 127, round half to even, int8."""
    (x,) = args
    scale = x.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(scale > 0, x / torch.where(scale > 0, scale, 1.0), 0.0).round().clamp(-128, 127)
    return (q * scale,)


def _logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()[0]


def _engine_matmuls(model: Model, tokens: np.ndarray) -> tuple[dict, dict]:
    """Every block linear's input and output (bias added) in the engine's forward pass."""
    inputs, outputs = {}, {}
    x = model.embed(tokens)
    for il in range(model.config.n_layer):
        x = model.layer(il, model.layer_weights(il), x, hook=lambda n, h: inputs.setdefault(n, h.copy()),
                        on_output=lambda n, y: outputs.setdefault(n, y.copy()))
    return inputs, outputs


def _hf_columns(layout: HFLayout, name: str, y: np.ndarray) -> np.ndarray:
    """An engine matmul output [T, n_out] with its columns in HF's order (llama's q/k rows are
    permuted in GGUF: undone here by hand, per head even columns first, then odd ones)."""
    heads = {"attn_q": layout.n_head, "attn_k": layout.n_head_kv}.get(block_linear(name)[1])
    if layout.arch != "llama" or heads is None:
        return y
    d = y.shape[1] // heads
    return y.reshape(y.shape[0], heads, d // 2, 2).swapaxes(2, 3).reshape(y.shape)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_runs_the_engine_w8a8(tmp_path, arch):
    """transformers loads the directory (its compressed-tensors quantizer) with exactly our
    linears quantized, and computes what the engine's W8A8 simulation computes.

    Compared with compressed-tensors' activation fake quantization switched off, so that each side
    runs one rule: weights only (int8 weights, float activations), and vLLM's int8 activation rule
    put on each quantized Linear (`_vllm_int8_input`). The engine keeps K/V in float32 as
    transformers does (kv_f16=False), and Gemma's GELU is swapped for the ggml fp16 table that the
    engine reproduces. Tolerances:

    - weights only, whole model: float32 summation order, ~1e-6 of the logits; 1e-4 of max|logit|
      bounds it (2e-4 for Gemma, where an fp16 rounding of a GELU input can still fall either way).
    - W8A8, each quantized matmul fed the engine's own input: both sides then quantize the same
      float32 numbers by the same IEEE operations to the same int8 values, so only the summation
      order differs: 1e-5 of max|output|.
    - W8A8, whole model: the inputs differ by that float error, and an activation whose x/scale
      lands within it of k + 1/2 rounds apart; from then on that token (and, through its keys and
      values, later ones) draws part of its quantization noise anew. Measured over 3 seeds x 4
      architectures: mean |difference| at most 0.26 of the mean |W8A8 - float|; asserted: 0.5.
    - compressed-tensors' own fake quantization (scale max|x| / 127.5, -128..127) is another W8A8:
      measured 0.9-1.05 of W8A8's own effect away from the engine's; asserted: 1.5."""
    src, out, linears, _ = written(tmp_path, arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    layout = HFLayout.of(src)
    quantized = {n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    assert quantized == {layout.module(n) for n in linears}
    own = _logits(model, TOKENS)  # compressed-tensors' own activation fake quantization; decompresses
    if arch == "gemma3":
        for layer in model.model.layers:
            layer.mlp.act_fn = _GgmlGelu()
    model.apply(disable_quantization)
    weights_only = _logits(model, TOKENS)
    for n in quantized:
        model.get_submodule(n).register_forward_pre_hook(_vllm_int8_input)
    w8a8 = _logits(model, TOKENS)

    engine = Model(src, kv_f16=False, simulate=W8A8("token"))
    sim = forward(engine, TOKENS)[0]
    sim_weights = forward(Model(src, kv_f16=False, simulate=_WeightsOnly("token")), TOKENS)[0]
    plain = forward(Model(src, kv_f16=False), TOKENS)[0]
    scale = np.abs(sim).max()
    assert np.abs(weights_only - sim_weights).max() <= (2e-4 if arch == "gemma3" else 1e-4) * scale

    inputs, outputs = _engine_matmuls(engine, TOKENS[0])
    assert set(inputs) == set(linears)
    for name in linears:
        with torch.no_grad():
            got = model.get_submodule(layout.module(name))(torch.from_numpy(inputs[name])).numpy()
        want = _hf_columns(layout, name, outputs[name])
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name

    effect = np.abs(sim - plain).mean()
    assert np.abs(w8a8 - sim).mean() <= 0.5 * effect
    assert np.abs(own - sim).mean() <= 1.5 * effect


def _fused_max(amax: dict[str, float], name: str) -> float:
    """The largest max|x| of the linears vLLM fuses with `name` (q/k/v, gate/up), or its own."""
    layer, kind = block_linear(name)
    group = next((g for g in (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up")) if kind in g), (kind,))
    return max(amax[f"blk.{layer}.{k}.weight"] for k in group)


def _with_headroom(tmp_path: Path, arch: str) -> tuple[Any, list[str], dict[str, float]]:
    """(source reader, its block linears, 1.5x each one's max|x| on TOKENS): static scales that
    clip nothing."""
    extra = dict(sliding_window=8, swa_pattern=2) if arch == "gemma3" else {}
    src = open_model(write_model(tmp_path / f"{arch}.gguf", arch, n_layer=4, **extra))
    linears = [n for n in src.tensors if block_linear(n) is not None]
    seen: dict[str, float] = {}
    forward(Model(src, kv_f16=False), TOKENS,
            hook=lambda n, h: seen.__setitem__(n, max(seen.get(n, 0.0), float(np.abs(h).max()))))
    return src, linears, {n: 1.5 * seen[n] for n in linears}


@pytest.mark.parametrize("activations", ["static", "hybrid"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_transformers_uses_the_static_input_scales(tmp_path, arch, activations):
    """Static activations: transformers loads input_scale as written (max|x| / 127, the fused
    group's largest), and compressed-tensors' own fake quantization with it gives each matmul the
    engine's per-tensor W8A8 output for the same input (1e-5 of max|output|: summation order). The
    maxima have 50% headroom, so no input is clipped: beyond its scale compressed-tensors (and
    vLLM's static_scaled_int8_quant) clamp to -128..127, the engine to -127..127. Hybrid: the
    library parses both config groups and gives each module the engine's scheme, down_proj
    dynamic per token without input_scale (its weights decompress to the engine's exactly), the
    others static as above."""
    src, linears, amax = _with_headroom(tmp_path, arch)
    write_compressed_tensors(src, tmp_path / "out", linears=linears, activations=activations, input_max=amax)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert len(QuantizationConfig.model_validate(qc).config_groups) == (2 if activations == "hybrid" else 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    layout = HFLayout.of(src)
    group = {n: _fused_max(amax, n) for n in linears}
    _logits(model, TOKENS[:, :2])  # decompresses
    mode = "tensor" if activations == "static" else "hybrid"
    engine = Model(src, kv_f16=False, simulate=W8A8(mode, act_max=group))
    inputs, outputs = _engine_matmuls(engine, TOKENS[0])
    for name in linears:
        module = model.get_submodule(layout.module(name))
        act = module.quantization_scheme.input_activations
        if mode_of(mode, name) == "token":
            assert (act.strategy, act.dynamic) == ("token", True) and not hasattr(module, "input_scale"), name
            want = layout.to_hf(name, fake_quant_weight(src.load_f32(name)))
            assert np.array_equal(module.weight.detach().numpy(), want), name
            continue
        assert (act.strategy, act.dynamic) == ("tensor", False), name
        assert module.input_scale.item() == np.float32(np.float32(group[name]) / np.float32(127)), name
        with torch.no_grad():
            got = module(torch.from_numpy(inputs[name])).numpy()
        want = _hf_columns(layout, name, outputs[name])
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name
    assert activations == "static" or any(mode_of(mode, n) == "token" for n in linears)


# -- W4A16 (quantize --format compressed-tensors --scheme W4A16) ------------------------------------


def _w4a16(tmp_path: Path, arch: str, edit=None) -> tuple[Path, Path]:
    """(source GGUF, W4A16 directory) of a 4-layer model whose rows all split into groups of 64."""
    from typer.testing import CliRunner

    from quantcli.cli.app import app

    extra = dict(sliding_window=8, swa_pattern=2) if arch == "gemma3" else {}
    src = write_model(tmp_path / f"{arch}.gguf", arch, n_layer=4, n_ff=128, tied=arch == "gemma3", **extra)
    out = tmp_path / "w4a16"
    res = CliRunner().invoke(app, ["quantize", str(src), str(out), "--format", "compressed-tensors",
                                   "--scheme", "W4A16", "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return src, out


def _sym4(x: np.ndarray) -> np.ndarray:
    from quantcli import codecs

    return codecs.dequantize(codecs.quantize(x, "SYM4_B64"), "SYM4_B64", x.shape)


@pytest.mark.parametrize("arch", ARCHS)
def test_w4a16_config_is_the_library_preset_and_decompresses_to_the_codec(tmp_path, arch):
    """quantization_config is compressed-tensors' W4A16 preset with group_size 64 (version aside);
    its pack-quantized compressor turns weight_packed/weight_scale/weight_shape back into exactly
    the SYM4_B64 codec's dequantized weights, in HF's row order."""
    src_path, out = _w4a16(tmp_path, arch)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    scheme.weights.group_size = 64
    lib = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                             quantization_status="compressed", ignore=["lm_head"])
    theirs = {"version": ct.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
              "transform_config": {}, **lib.model_dump(exclude=["quant_method"])}
    theirs = json.loads(json.dumps(theirs, default=str))
    assert {k: v for k, v in qc.items() if k != "version"} == {k: v for k, v in theirs.items() if k != "version"}
    parsed = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    compressor = BaseCompressor.get_value_from_registry(qc["format"])
    assert compressor.compression_param_names(parsed) == ("weight_packed", "weight_scale", "weight_shape")
    state = load_file(out / "model.safetensors")
    src = open_model(src_path)
    layout = HFLayout.of(src)
    linears = [n for n in src.tensors if block_linear(n) is not None]
    for name in linears:
        module = layout.module(name)
        local = {k: state[f"{module}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
        dense = compressor.decompress(local, parsed)["weight"]
        want = _sym4(layout.to_hf(name, src.load_f32(name)))
        assert dense.dtype == torch.float32 and np.array_equal(dense.numpy(), want), name


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_runs_w4a16_as_the_engine_runs_the_codec_weights(tmp_path, arch):
    """transformers loads the W4A16 directory with exactly the block linears quantized, and its
    logits are the engine's on the same model with those linears replaced by the codec's values
    (float32 summation order apart: 1e-4 of max|logit|, 2e-4 for Gemma's fp16 GELU table)."""
    src_path, out = _w4a16(tmp_path, arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    src = open_model(src_path)
    layout = HFLayout.of(src)
    linears = [n for n in src.tensors if block_linear(n) is not None]
    quantized = {n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    assert quantized == {layout.module(n) for n in linears}
    if arch == "gemma3":
        for layer in model.model.layers:
            layer.mlp.act_fn = _GgmlGelu()
    logits = _logits(model, TOKENS)
    extra = dict(sliding_window=8, swa_pattern=2) if arch == "gemma3" else {}
    fq = write_model(tmp_path / "fq.gguf", arch, n_layer=4, n_ff=128, tied=arch == "gemma3", **extra,
                     edit=lambda n, x: _sym4(x) if block_linear(n) is not None else x)
    sim = forward(Model(open_model(fq), kv_f16=False), TOKENS)[0]
    plain = forward(Model(src, kv_f16=False), TOKENS)[0]
    assert np.abs(logits - sim).max() <= (2e-4 if arch == "gemma3" else 1e-4) * np.abs(sim).max()
    assert np.abs(sim - plain).mean() > 10 * np.abs(logits - sim).mean()  # int4 moved the logits
