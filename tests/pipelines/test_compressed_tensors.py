"""`write_compressed_tensors`: HF names and layouts that read back to the source exactly, int8 W8A8
tensors equal to the engine's simulation, compressed-tensors' config, and an all-or-nothing output.

Everything here is numpy + safetensors: the loaders themselves (compressed-tensors, transformers)
are exercised in test_compressed_tensors_torch.py where torch is installed."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from quantcli.convert import hf_to_gguf_view
from quantcli.convert.to_hf import HFLayout, block_linear, hf_config
from quantcli.engine.config import ModelConfig
from quantcli.engine.w8a8 import fake_quant_weight
from quantcli.errors import InputError, NumericError, OutputError, UsageError
from quantcli.formats import SafetensorsReader, open_model
from quantcli.pipelines.compressed_tensors import write_compressed_tensors
from tests.convert.checkpoints import SPECS, build, spm_model_bytes
from tests.models import ARCHS, vocab, write_model

GEMMA_SWA = dict(sliding_window=8, swa_pattern=2)


def source(tmp_path: Path, arch: str, **kw) -> Path:
    """A synthetic GGUF model; Gemma's with a sliding window on every other layer."""
    return write_model(tmp_path / f"{arch}.gguf", arch, **({**GEMMA_SWA, **kw} if arch == "gemma3" else kw))


def spm_tokenizer(tmp_path: Path) -> Path:
    """tokenizer.model for tests/models.py's vocabulary (what the HF reader needs to read a
    directory back)."""
    d = tmp_path / "tok"
    d.mkdir(exist_ok=True)
    tokens, scores, types = vocab()
    (d / "tokenizer.model").write_bytes(spm_model_bytes(tokens, scores, types, unk=3, bos=2, eos=1, pad=0))
    return d


def engine_config(reader) -> ModelConfig:
    """The engine's hyperparameters, floats as the float32 a GGUF stores (the HF reader keeps
    config.json's decimals)."""
    cfg = ModelConfig.from_reader(reader)
    return dataclasses.replace(cfg, norm_eps=float(np.float32(cfg.norm_eps)),
                               rope_base=float(np.float32(cfg.rope_base)),
                               rope_base_swa=float(np.float32(cfg.rope_base_swa)))


def all_linears(reader) -> list[str]:
    return [n for n in reader.tensors if block_linear(n) is not None]


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order back to HF's, written out independently of convert.to_hf: per head
    the even rows are HF's first half, the odd rows its second half."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_value(arch: str, name: str, x: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """The HF checkpoint's values of GGUF tensor `name` (the test's own statement of the inverse)."""
    if arch == "llama" and name.startswith("blk.") and name.split(".")[2] in ("attn_q", "attn_k"):
        x = unpermute(x, n_head if name.split(".")[2] == "attn_q" else n_head_kv)
    if arch == "gemma3" and name.endswith("_norm.weight"):
        x = x - np.float32(1)
    return x


# -- names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_names_invert_gguf_py_tensor_mapping(tmp_path, arch):
    """Every tensor's HF name maps back to it through gguf-py's tensor mapping (what the converter
    uses); rope_freqs has none; anything else is an InputError that names the tensor."""
    with open_model(source(tmp_path, arch, bias=True, tied=False)) as src:
        layout = HFLayout.of(src)
        tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], 2)
        for name in src.tensors:
            hf = layout.name(name)
            assert tmap.get_name(hf, try_suffixes=(".weight", ".bias")) == name, (name, hf)
        assert layout.name("rope_freqs.weight") is None
        assert layout.module("blk.1.ffn_down.weight") == "model.layers.1.mlp.down_proj"
        with pytest.raises(InputError, match=f"'blk.0.mystery.weight' has no Hugging Face name in a {arch} model"):
            layout.name("blk.0.mystery.weight")


# -- round trips through quantcli's own HF reader -------------------------------------------------


@pytest.mark.parametrize("dtype", ["F32", "F16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_round_trip(tmp_path, arch, dtype):
    """linears=(): a plain HF checkpoint that quantcli's HF reader turns back into the source
    exactly (permuted q/k for llama, Gemma's norms), with config.json giving the engine the same
    hyperparameters."""
    # llama.cpp's converter writes no sliding-window pattern (llama.cpp assumes Gemma 3's 6), so the
    # Gemma model that can come back exactly has that pattern: 5 sliding layers, then a global one
    gemma = dict(n_layer=6, swa_pattern=6) if arch == "gemma3" else {}
    src_path = source(tmp_path, arch, tied=arch != "qwen3", dtype=dtype, **gemma)
    out = tmp_path / "out"
    with open_model(src_path) as src:
        res = write_compressed_tensors(src, out, linears=(), tokenizer_dir=spm_tokenizer(tmp_path))
        assert res.files == ("model.safetensors", "config.json", "tokenizer.model")
        assert res.n_quantized == 0 and res.warnings == ()
        assert res.bytes == sum((out / f).stat().st_size for f in res.files)
        config = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in config
        assert config["torch_dtype"] == {"F32": "float32", "F16": "float16"}[dtype]
        with hf_to_gguf_view(open_model(out)) as back:
            assert sorted(back.tensors) == sorted(src.tensors)
            for name, info in src.tensors.items():
                assert back.tensors[name].dtype == info.dtype and back.tensors[name].shape == info.shape, name
                assert np.array_equal(back.load_f32(name), src.load_f32(name)), name
            assert engine_config(back) == engine_config(src)


def test_quantized_ggml_tensors_are_written_f16(tmp_path):
    with open_model(source(tmp_path, "qwen3", dtype="Q8_0")) as src:
        res = write_compressed_tensors(src, tmp_path / "out", linears=(), tokenizer_dir=spm_tokenizer(tmp_path))
        assert res.warnings == ("15 tensors stored as Q8_0 (e.g. token_embd.weight) were decoded and written as F16",)
        with hf_to_gguf_view(open_model(tmp_path / "out")) as back:
            for name, info in src.tensors.items():
                want = src.load_f32(name)
                if info.dtype == "Q8_0":
                    assert back.tensors[name].dtype == "F16"
                    want = want.astype(np.float16).astype(np.float32)
                assert np.array_equal(back.load_f32(name), want), name


# tiny HF checkpoints (tests/convert/checkpoints.py) whose every tensor survives the trip bit for bit
HF_EXACT = ("llama-spm", "llama3-bpe", "qwen2", "qwen3", "gemma3-bpe")


@pytest.mark.parametrize("name", HF_EXACT)
def test_hf_checkpoint_round_trip(tmp_path, name):
    """From an HF directory seen as GGUF, with its own config.json: the checkpoint's own tensors
    again, byte for byte (BF16 too, sharded or not); Gemma's embedding rows past the tokenizer,
    which the converter drops, come back as zeros."""
    ckpt = build(name, tmp_path / "src")
    config = json.loads((ckpt / "config.json").read_text())
    out = tmp_path / "out"
    with hf_to_gguf_view(SafetensorsReader(ckpt)) as view, SafetensorsReader(ckpt) as orig:
        write_compressed_tensors(view, out, linears=(), source_config=config, tokenizer_dir=ckpt,
                                 shard_bytes=40_000)
        assert json.loads((out / "config.json").read_text()) == config
        with SafetensorsReader(out) as got:
            assert len(got._files) > 1 and (out / "model.safetensors.index.json").is_file()
            want = {n for n in orig.tensors if not n.endswith("rotary_emb.inv_freq")}
            assert set(got.tensors) == want
            for n in want:
                a, b = orig.tensors[n], got.tensors[n]
                assert (b.dtype, b.shape) == (a.dtype, a.shape), n
                if n == "model.embed_tokens.weight" and SPECS[name].extra_vocab:
                    keep = view.tensors["token_embd.weight"].shape[0]  # the rows the converter keeps
                    assert keep < a.shape[0]
                    assert np.array_equal(got.load_f32(n)[:keep], orig.load_f32(n)[:keep])
                    assert not got.load_f32(n)[keep:].any()
                else:
                    assert bytes(got.raw(n)) == bytes(orig.raw(n)), n
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        assert (out / f).is_file() == (ckpt / f).is_file()
        if (ckpt / f).is_file():
            assert (out / f).read_bytes() == (ckpt / f).read_bytes()


@pytest.mark.parametrize("name", sorted(set(SPECS) - {"mistral-hf"}))
def test_config_from_gguf_metadata_converts_back_to_it(tmp_path, name):
    """config.json made from GGUF metadata (no source config): llama.cpp's converter turns it back
    into the same `{arch}.*` metadata — rope scaling (linear, yarn, Llama 3's rope_freqs), Gemma's
    sliding window and softcap included — and the same tensors."""
    ckpt = build(name, tmp_path / "src")
    with hf_to_gguf_view(SafetensorsReader(ckpt)) as view:
        write_compressed_tensors(view, tmp_path / "out", linears=(), tokenizer_dir=ckpt)
        with hf_to_gguf_view(SafetensorsReader(tmp_path / "out")) as back:
            arch = view.architecture
            ours = {k: v.value for k, v in back.kv.items() if k.startswith(f"{arch}.")}
            theirs = {k: v.value for k, v in view.kv.items() if k.startswith(f"{arch}.")}
            assert ours == theirs
            assert sorted(back.tensors) == sorted(view.tensors)
            for t in view.tensors:
                assert np.array_equal(back.load_f32(t), view.load_f32(t)), t


def test_config_of_a_gemma3_gguf(tmp_path):
    """The Gemma 3 fields transformers reads, in the Hub's transformers-4 form."""
    with open_model(source(tmp_path, "gemma3", n_layer=4)) as src:
        cfg = hf_config(src)
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert (cfg["sliding_window"], cfg["sliding_window_pattern"]) == (8, 2)
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"]) == (1e6, 10000.0)
    assert cfg["query_pre_attn_scalar"] == 16 and cfg["head_dim"] == 16
    assert cfg["hidden_activation"] == "gelu_pytorch_tanh" and cfg["rms_norm_eps"] == 1e-6
    assert cfg["final_logit_softcapping"] is None and cfg["attn_logit_softcapping"] is None
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == 275
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (2, 1)


# -- W8A8 -----------------------------------------------------------------------------------------


# the linears vLLM fuses into one matmul (one input scale)
FUSED = {"attn_q": "qkv", "attn_k": "qkv", "attn_v": "qkv", "ffn_gate": "gate_up", "ffn_up": "gate_up"}


def fused_peers(name: str, names: list[str]) -> list[str]:
    """`name` and the linears of its layer that share its input in vLLM's fused matmul."""
    layer, kind = block_linear(name)
    if kind not in FUSED:
        return [name]
    return [n for n in names if block_linear(n)[0] == layer and FUSED.get(block_linear(n)[1]) == FUSED[kind]]


def expected_quantization_config(ignore: list[str], static: bool | str = False) -> dict:
    """compressed-tensors 0.20.1's W8A8 preset as `ModelCompressor.update_config` writes it;
    static="hybrid": a static group for every linear but down_proj, a dynamic one for it."""
    tensor = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "tensor",
              "dynamic": False}
    token = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token", "dynamic": True}

    def group(targets: list[str], act: dict) -> dict:
        return {"targets": targets,
                "weights": {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                            "strategy": "channel", "dynamic": False},
                "input_activations": act, "output_activations": None, "format": None}

    if static == "hybrid":
        groups = {"group_0": group(["re:.*[.](gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj)$"], tensor),
                  "group_1": group(["re:.*[.](down_proj)$"], token)}
    else:
        groups = {"group_0": group(["Linear"], tensor if static else token)}
    return {
        "config_groups": groups,
        "format": "int-quantized", "global_compression_ratio": None, "ignore": ignore, "kv_cache_scheme": None,
        "moe_sparsity_config": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {}, "version": "0.20.1",
    }


@pytest.mark.parametrize("activations", ["dynamic", "static", "hybrid"])
@pytest.mark.parametrize("arch", ARCHS)
def test_w8a8_tensors_equal_the_engine_simulation(tmp_path, arch, activations):
    """int8 weights [out, in] and float32 weight_scale [out, 1] whose product is the engine's
    fake-quantized weight in HF's row order; static input_scale [1] = max|x| / 127, one per fused
    q/k/v and gate/up group (hybrid: on every linear but down_proj); everything else as in the
    plain checkpoint."""
    out = tmp_path / "out"
    static = activations != "dynamic"
    with open_model(source(tmp_path, arch, tied=False)) as src:
        linears = all_linears(src)
        rng = np.random.default_rng(1)
        amax = {n: float(rng.uniform(1, 20)) for n in linears}
        res = write_compressed_tensors(src, out, linears=linears, activations=activations,
                                       input_max=amax if static else None, metadata={"quantcli.version": "x"})
        assert res.n_quantized == len(linears) == 14
        config = json.loads((out / "config.json").read_text())
        assert config["quantization_config"] == expected_quantization_config(
            ["lm_head"], "hybrid" if activations == "hybrid" else static)
        with safe_open(out / "model.safetensors", "np") as f:
            assert f.metadata() == {"quantcli.version": "x", "format": "pt"}
        tensors = load_file(out / "model.safetensors")
        layout = HFLayout.of(src)
        n_head, n_kv = layout.n_head, layout.n_head_kv
        for name in linears:
            module = layout.module(name)
            q, s = tensors.pop(module + ".weight"), tensors.pop(module + ".weight_scale")
            w = src.load_f32(name)
            assert q.dtype == np.int8 and q.shape == w.shape and np.abs(q.astype(np.int32)).max() <= 127
            assert s.dtype == np.float32 and s.shape == (w.shape[0], 1)
            want = hf_value(arch, name, fake_quant_weight(w), n_head, n_kv)
            assert np.array_equal(q.astype(np.float32) * s, want), name
            if static and not (activations == "hybrid" and module.endswith("down_proj")):
                x = tensors.pop(module + ".input_scale")
                assert x.dtype == np.float32 and x.shape == (1,)
                top = max(amax[p] for p in fused_peers(name, linears))
                assert x[0] == np.float32(np.float32(top) / np.float32(127)), name
        assert not any(k.endswith(("_scale", "zero_point")) for k in tensors)
        for name, info in src.tensors.items():
            if name not in linears:
                got = tensors.pop(layout.name(name))
                assert got.dtype == np.float32
                assert np.array_equal(got, hf_value(arch, name, src.load_f32(name), n_head, n_kv)), name
        assert not tensors


def test_unchosen_linears_are_ignored_and_stay_float(tmp_path):
    out = tmp_path / "out"
    with open_model(source(tmp_path, "llama", n_layer=3)) as src:
        kept = {"blk.0.ffn_down.weight", "blk.2.attn_q.weight", "blk.2.attn_k.weight", "blk.2.attn_v.weight"}
        res = write_compressed_tensors(src, out, linears=[n for n in all_linears(src) if n not in kept])
        assert res.n_quantized == 17
        config = json.loads((out / "config.json").read_text())
        assert config["quantization_config"]["ignore"] == [
            "lm_head", "model.layers.0.mlp.down_proj", "model.layers.2.self_attn.q_proj",
            "model.layers.2.self_attn.k_proj", "model.layers.2.self_attn.v_proj"]
        tensors = load_file(out / "model.safetensors")
        assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == np.float32
        assert "model.layers.0.mlp.down_proj.weight_scale" not in tensors
        assert np.array_equal(tensors["model.layers.2.self_attn.q_proj.weight"],
                              unpermute(src.load_f32("blk.2.attn_q.weight"), 4))
        assert tensors["model.layers.2.self_attn.o_proj.weight"].dtype == np.int8


def test_shards_and_index(tmp_path):
    """Over shard_bytes: model-0000i-of-0000n.safetensors and an index that quantcli's reader (as
    transformers') follows; a linear's weight and scales stay in one file."""
    with open_model(source(tmp_path, "qwen2", n_layer=4, tied=False)) as src:
        linears = all_linears(src)
        write_compressed_tensors(src, tmp_path / "one", linears=linears)
        res = write_compressed_tensors(src, tmp_path / "many", linears=linears, shard_bytes=50_000)
    shards = [f for f in res.files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    one = load_file(tmp_path / "one" / "model.safetensors")
    many = {}
    for f in shards:
        part = load_file(tmp_path / "many" / f)
        assert all(index["weight_map"][n] == f for n in part)
        many.update(part)
    assert set(index["weight_map"]) == set(one) == set(many)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in one.values())
    assert all(np.array_equal(one[n], many[n]) for n in one)
    for n in index["weight_map"]:
        if n.endswith(".weight_scale"):
            assert index["weight_map"][n] == index["weight_map"][n.replace("_scale", "")]


def test_no_tokenizer_is_a_warning(tmp_path):
    with open_model(source(tmp_path, "qwen3")) as src:
        res = write_compressed_tensors(src, tmp_path / "out", linears=all_linears(src))
    assert res.files == ("model.safetensors", "config.json")
    assert res.warnings == (f"no tokenizer written: the source is a GGUF file and no tokenizer directory was "
                            f"given; copy tokenizer.json or tokenizer.model into {tmp_path / 'out'} before "
                            "loading it with transformers or vLLM",)


# -- bad cases -------------------------------------------------------------------------------------


def test_choices_vllm_cannot_run_are_refused(tmp_path):
    with open_model(source(tmp_path, "llama")) as src:
        out = tmp_path / "out"
        cases = [
            (["blk.0.attn_q.weight", "blk.0.attn_k.weight"],
             UsageError, r"blk.0.attn_k.weight is chosen for int8 but blk.0.attn_v.weight is not: vLLM runs "
                         r"attn_q \+ attn_k \+ attn_v of a layer as one matmul"),
            (["blk.1.ffn_up.weight"], UsageError, "but blk.1.ffn_gate.weight is not"),
            (["output.weight"], UsageError, "no tensor named 'output.weight'"),
            (["token_embd.weight"], UsageError, "only block linears' weights can"),
            (["blk.0.attn_norm.weight"], UsageError, "only block linears' weights can"),
        ]
        for linears, err, match in cases:
            with pytest.raises(err, match=match):
                write_compressed_tensors(src, out, linears=linears)
        with pytest.raises(UsageError, match="unknown activation scheme 'per-token'; known: dynamic, static, hybrid"):
            write_compressed_tensors(src, out, linears=[], activations="per-token")
        down = ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
        with pytest.raises(UsageError, match="static activations need input_max"):
            write_compressed_tensors(src, out, linears=down, activations="static")
        with pytest.raises(UsageError, match="input_max has no max|x| for blk.1.ffn_down.weight"):
            write_compressed_tensors(src, out, linears=down, activations="static",
                                     input_max={"blk.0.ffn_down.weight": 1.0})
        with pytest.raises(NumericError, match=r"input_max\[blk.0.ffn_down.weight\] is 0.0"):
            write_compressed_tensors(src, out, linears=down, activations="static",
                                     input_max={"blk.0.ffn_down.weight": 0.0, "blk.1.ffn_down.weight": 1.0})
        with pytest.raises(InputError, match="config.json's architecture 'Qwen2ForCausalLM' is not the model's"):
            write_compressed_tensors(src, out, linears=[], source_config={"architectures": ["Qwen2ForCausalLM"]})
    assert sorted(os.listdir(tmp_path)) == ["llama.gguf"]


def test_existing_output_is_refused_then_replaced_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with open_model(source(tmp_path, "qwen2")) as src:
        with pytest.raises(OutputError, match="already exists") as exc:
            write_compressed_tensors(src, out, linears=all_linears(src))
        assert exc.value.hint == "pass --force to replace it"
        assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
        (tmp_path / "file").write_text("x")
        with pytest.raises(OutputError, match="exists and is not a directory"):
            write_compressed_tensors(src, tmp_path / "file", linears=[], force=True)
        with pytest.raises(OutputError, match="does not exist"):
            write_compressed_tensors(src, tmp_path / "no" / "out", linears=[])
        res = write_compressed_tensors(src, out, linears=all_linears(src), force=True)
    assert sorted(os.listdir(out)) == sorted(res.files) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["file", "out", "qwen2.gguf"]


def test_output_holding_an_input_is_refused_even_with_force(tmp_path):
    ckpt = build("qwen2", tmp_path / "src")
    with hf_to_gguf_view(SafetensorsReader(ckpt)) as view:
        for out in (ckpt, tmp_path / "src"):
            with pytest.raises(OutputError, match="holds the input"):
                write_compressed_tensors(view, out, linears=[], force=True)
    with open_model(source(tmp_path, "qwen2")) as src:
        with pytest.raises(OutputError, match="holds the input"):
            write_compressed_tensors(src, ckpt, linears=[], tokenizer_dir=ckpt, force=True)


class FailingReader:
    """A reader whose `load_f32` fails on one tensor: a crash half way through the writing."""

    def __init__(self, reader, fail_on: str, exc: BaseException) -> None:
        self._reader, self._fail_on, self._exc = reader, fail_on, exc

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def load_f32(self, name: str) -> np.ndarray:
        if name == self._fail_on:
            raise self._exc
        return self._reader.load_f32(name)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), InputError("boom"), OSError(28, "No space left on device")])
def test_an_error_midway_leaves_nothing(tmp_path, exc):
    """Neither the output nor a temporary directory survives; an existing output (force) is kept."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with open_model(source(tmp_path, "gemma3", n_layer=3)) as src:
        bad = FailingReader(src, "blk.2.ffn_down.weight", exc)
        for out, force in ((tmp_path / "out", False), (old, True)):
            with pytest.raises(OutputError if isinstance(exc, OSError) else type(exc),
                               match="write failed: disk full" if isinstance(exc, OSError) else None):
                write_compressed_tensors(bad, out, linears=all_linears(src), shard_bytes=20_000, force=force)
    assert sorted(os.listdir(tmp_path)) == ["gemma3.gguf", "old"]
    assert os.listdir(old) == ["keep.txt"]


def test_nan_weights_are_a_numeric_error(tmp_path):
    class NaNReader(FailingReader):
        def load_f32(self, name):
            x = self._reader.load_f32(name)
            if name == self._fail_on:
                x = x.copy()
                x[0, 0] = np.nan
            return x

    with open_model(source(tmp_path, "qwen3")) as src:
        with pytest.raises(NumericError, match="blk.1.attn_v.weight: NaN or Inf weights"):
            write_compressed_tensors(NaNReader(src, "blk.1.attn_v.weight", None), tmp_path / "out",
                                     linears=all_linears(src))
    assert sorted(os.listdir(tmp_path)) == ["qwen3.gguf"]
