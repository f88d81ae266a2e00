"""LoRA merge (`quantize/dequantize --lora`): W' = W + S * (alpha / r) * B @ A, checked against
computations that do not go through quantcli's mapping: in Hugging Face's own layout, and against a
checkpoint with the update written into it beforehand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.convert import hf_to_gguf_view
from quantcli.convert.lora import AdapterSpec, merged
from quantcli.convert.to_hf import HFLayout, LINEARS
from quantcli.formats import open_model
from tests.convert.checkpoints import build
from tests.convert.lora_files import PREFIX, peft_factors, write_gguf_adapter, write_peft
from tests.models import write_model

runner = CliRunner()


def _cli(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _llama(tmp_path: Path, **kw) -> Path:
    return write_model(tmp_path / "llama.gguf", "llama", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=96,
                       tied=False, **kw)


def _modules(layers: int, kinds=("attn_q", "attn_k", "attn_v", "attn_output", "ffn_down"), n_embd=64, n_ff=96,
             kv=32) -> dict[str, tuple[int, int]]:
    """HF module -> (in, out) of a write_model llama's linears."""
    shapes = {"attn_q": (n_embd, n_embd), "attn_k": (n_embd, kv), "attn_v": (n_embd, kv),
              "attn_output": (n_embd, n_embd), "ffn_gate": (n_embd, n_ff), "ffn_up": (n_embd, n_ff),
              "ffn_down": (n_ff, n_embd)}
    return {f"model.layers.{i}.{LINEARS[k]}": shapes[k] for i in range(layers) for k in kinds}


@pytest.mark.parametrize("r,rslora", [(8, False), (16, False), (8, True), (16, True)])
def test_peft_merge_into_gguf_equals_the_update_in_hf_layout(tmp_path, r, rslora):
    """Each merged GGUF tensor, taken back to HF's layout (to_hf: the inverse row order), is the HF
    weight plus alpha/r (alpha/sqrt(r) with rsLoRA) * B @ A: the q/k rows were permuted like the weight."""
    base = open_model(_llama(tmp_path))
    factors = peft_factors(_modules(2), r, seed=r)
    adapter = write_peft(tmp_path / "ad", factors, r, alpha=2 * r if not rslora else 16, rslora=rslora)
    view = merged(base, [AdapterSpec(adapter, 0.75)])
    layout = HFLayout.of(base)
    hf_to_gguf = {layout.name(n): n for n in base.tensors if layout.name(n)}
    factor = 0.75 * (2 * r if not rslora else 16) / (np.sqrt(r) if rslora else r)
    for module, (a, b) in factors.items():
        name = hf_to_gguf[module + ".weight"]
        expect = layout.to_hf(name, base.load_f32(name)).astype(np.float64) + factor * (b.astype(np.float64) @ a)
        got = layout.to_hf(name, view.load_f32(name))
        np.testing.assert_allclose(got, expect, rtol=0, atol=2e-6)
        assert view.tensors[name].dtype == "F32"
    untouched = [n for n in base.tensors if n not in view.deltas]
    assert untouched and all(np.array_equal(view.raw(n), base.raw(n)) for n in untouched)
    for name in view.deltas:  # row slices are the whole tensor's rows
        rows = view.tensors[name].shape[0]
        np.testing.assert_array_equal(np.concatenate([view.load_rows(name, 0, 5), view.load_rows(name, 5, rows)]),
                                      view.load_f32(name))


def _premerged(src: Path, dst: Path, factors, factor: float) -> Path:
    """A copy of HF checkpoint `src` with W + factor * B @ A written into its F32 weights (numpy's own
    product, in float64)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    for module, (a, b) in factors.items():
        w = tensors[module + ".weight"].astype(np.float64)  # the merge's rule: one rounding from float64
        tensors[module + ".weight"] = (w + factor * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("r,rslora", [(8, False), (16, True)])
def test_quantize_lora_into_an_hf_checkpoint_equals_quantizing_the_premerged_checkpoint(tmp_path, monkeypatch,
                                                                                         r, rslora):
    """`quantize HF_DIR OUT --lora A` writes the tensors of `quantize HF_DIR' OUT'`, where HF_DIR' has
    the update added in HF's layout beforehand (q/k permuted by the converter, not by the merge)."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    src = build("llama-spm", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    h, kv = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    mods = _modules(cfg["num_hidden_layers"], ("attn_q", "attn_k", "attn_v", "ffn_up"), h, cfg["intermediate_size"], kv)
    factors = peft_factors(mods, r, seed=3)
    adapter = write_peft(tmp_path / "ad", factors, r, alpha=16, rslora=rslora)
    pre = _premerged(src, tmp_path / "pre", factors, 16 / (np.sqrt(r) if rslora else r))
    for qtype in ("F32", "Q8_0"):
        r1 = _cli("quantize", src, tmp_path / f"lora-{qtype}.gguf", "--type", qtype, "--lora", adapter, "-q")
        r2 = _cli("quantize", pre, tmp_path / f"pre-{qtype}.gguf", "--type", qtype, "-q")
        assert r1.exit_code == 0 and r2.exit_code == 0, (r1.output, r2.output)
        with open_model(tmp_path / f"lora-{qtype}.gguf") as a, open_model(tmp_path / f"pre-{qtype}.gguf") as b:
            assert list(a.tensors) == list(b.tensors)
            for name in a.tensors:
                assert a.tensors[name].dtype == b.tensors[name].dtype
                if qtype == "F32":
                    np.testing.assert_allclose(a.load_f32(name), b.load_f32(name), rtol=0, atol=1e-6)
                else:
                    assert np.array_equal(a.raw(name), b.raw(name)) or name.endswith("norm.weight"), name
            lora_meta = json.loads(a.meta("quantcli.lora"))
            assert lora_meta == [{"file": "ad", "format": "peft", "sha256": lora_meta[0]["sha256"], "scale": 1.0,
                                  "alpha": 16.0, "rank": [r], "tensors": len(factors)}]
            import hashlib
            assert lora_meta[0]["sha256"] == hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
            recipe = json.loads(a.meta("quantcli.recipe"))
            assert recipe["lora"] == [{"sha256": lora_meta[0]["sha256"], "scale": 1.0}]
            assert b.meta("quantcli.lora") is None


def test_dequantize_lora_keeps_hf_names_and_adds_the_update(tmp_path):
    """dequantize an HF checkpoint with --lora to safetensors: HF names, no permutation, W + dW."""
    from safetensors.numpy import load_file

    src = build("llama-spm", tmp_path)
    mods = _modules(2, ("attn_q", "attn_v"), 64, 96, 32)
    factors = peft_factors(mods, 4, seed=5)
    adapter = write_peft(tmp_path / "ad", factors, 4, alpha=4)
    res = _cli("dequantize", src, tmp_path / "m.safetensors", "--lora", adapter, "--lora-scale", "0.5", "-q")
    assert res.exit_code == 0, res.output
    out, before = load_file(str(tmp_path / "m.safetensors")), load_file(str(src / "model.safetensors"))
    for name, w in before.items():
        module = name.removesuffix(".weight")
        if module in factors:
            a, b = factors[module]
            np.testing.assert_allclose(out[name], w + 0.5 * (b @ a), rtol=0, atol=1e-6)
        else:
            assert np.array_equal(out[name], w), name


def test_gguf_adapter_merges_as_llama_cpp_applies_it(tmp_path):
    """A llama.cpp GGUF adapter: names and rows are the base's; scale * alpha / r, or scale alone
    when alpha is 0 (llama_adapter_lora_weight::get_scale); token_embd's a/b are flipped."""
    base = open_model(_llama(tmp_path))
    rng = np.random.default_rng(7)
    factors = {"blk.0.attn_q.weight": (rng.standard_normal((4, 64)).astype(np.float32),
                                       rng.standard_normal((64, 4)).astype(np.float32) * 0.1),
               "blk.1.ffn_down.weight": (rng.standard_normal((4, 96)).astype(np.float32),
                                         rng.standard_normal((64, 4)).astype(np.float32) * 0.1),
               "token_embd.weight": (rng.standard_normal((275, 4)).astype(np.float32) * 0.1,
                                     rng.standard_normal((64, 4)).astype(np.float32))}
    for alpha, factor in ((8.0, 2.0 * 8.0 / 4), (0.0, 2.0)):
        path = write_gguf_adapter(tmp_path / f"a{alpha}.gguf", "llama", factors, alpha)
        view = merged(base, [AdapterSpec(path, 2.0)])
        for name, (a, b) in factors.items():
            delta = a @ b.T if name == "token_embd.weight" else b @ a
            np.testing.assert_allclose(view.load_f32(name), base.load_f32(name) + factor * delta, rtol=0, atol=1e-5)
        assert view.adapters[0].provenance()["format"] == "gguf"


def test_two_adapters_add(tmp_path):
    base = open_model(_llama(tmp_path))
    f1, f2 = peft_factors(_modules(1), 4, seed=1), peft_factors(_modules(1), 8, seed=2)
    a1, a2 = write_peft(tmp_path / "a1", f1, 4, 8), write_peft(tmp_path / "a2", f2, 8, 8)
    both = merged(base, [AdapterSpec(a1, 1.0), AdapterSpec(a2, -1.0)])
    one = merged(base, [AdapterSpec(a1, 1.0)])
    name = "blk.0.attn_v.weight"
    a, b = f2["model.layers.0.self_attn.v_proj"]
    np.testing.assert_allclose(both.load_f32(name), one.load_f32(name) - b @ a, rtol=0, atol=1e-6)


# -- the contract's LoRA obligations (spec/000) ----------------------------------------------------


def test_qo_002_alpha_scaling_is_exactly_alpha_over_rank(tmp_path):
    """FALSIFY-QO-002: the merged update is (alpha / rank) * B @ A; alpha 16, rank 64 gives 0.25."""
    base = open_model(_llama(tmp_path))
    mods = {"model.layers.0.self_attn.q_proj": (64, 64)}
    factors = peft_factors(mods, 64, seed=11)
    a, b = factors["model.layers.0.self_attn.q_proj"]
    w = base.load_f32("blk.0.attn_q.weight")
    layout = HFLayout.of(base)
    deltas = {}
    for alpha in (16, 32):
        view = merged(base, [AdapterSpec(write_peft(tmp_path / f"a{alpha}", factors, 64, alpha), 1.0)])
        deltas[alpha] = layout.to_hf("blk.0.attn_q.weight", view.load_f32("blk.0.attn_q.weight")) - layout.to_hf(
            "blk.0.attn_q.weight", w)
        assert view.deltas["blk.0.attn_q.weight"][0].factor == alpha / 64
    ba = b @ a
    ratio = deltas[16].astype(np.float64).ravel() @ ba.ravel() / (ba.ravel() @ ba.ravel())
    assert ratio == pytest.approx(0.25, rel=1e-6)
    np.testing.assert_allclose(deltas[32], 2 * deltas[16], rtol=0, atol=1e-6)


def test_qo_004_dropout_leaves_the_expected_output_unchanged(tmp_path):
    """FALSIFY-QO-004: dropout is a training-time Bernoulli mask scaled by 1/(1-p), E[mask] = 1, so
    the expected LoRA output is the merged one's; at inference p = 0. The merge of an adapter trained
    with lora_dropout 0.3 is the merge of the same weights at 0.0, and the mean of masked outputs
    converges to the merged layer's output."""
    base = open_model(_llama(tmp_path))
    mods = {"model.layers.0.mlp.down_proj": (96, 64)}
    factors = peft_factors(mods, 8, seed=4)
    views = [merged(base, [AdapterSpec(write_peft(tmp_path / f"d{p}", factors, 8, 16, dropout=p), 1.0)])
             for p in (0.0, 0.3)]
    name = "blk.0.ffn_down.weight"
    assert np.array_equal(views[0].raw(name), views[1].raw(name))
    rng = np.random.default_rng(0)
    x = rng.standard_normal(96).astype(np.float64)
    a, b = (f.astype(np.float64) for f in factors["model.layers.0.mlp.down_proj"])
    w, p, n = base.load_f32(name).astype(np.float64), 0.3, 20000
    masks = (rng.random((n, 96)) >= p) / (1 - p)
    assert masks.mean() == pytest.approx(1.0, abs=0.01)  # E[mask_i / (1-p)] = 1
    train = w @ x + 2.0 * ((masks * x) @ a.T) @ b.T  # [n, 64]: the training-time outputs
    merged_out = views[1].load_f32(name).astype(np.float64) @ x
    sem = train.std(axis=0) / np.sqrt(n)
    assert (np.abs(train.mean(axis=0) - merged_out) < 5 * sem + 1e-5).all()


# -- refusals ------------------------------------------------------------------------------------


def _refused(tmp_path: Path, base: Path, adapter: Path, match: str, *extra: str, code: int = 3) -> None:
    out = tmp_path / "never.gguf"
    res = _cli("quantize", base, out, "--type", "Q8_0", "--lora", adapter, *extra)
    assert res.exit_code == code, res.output
    first = res.output.strip().splitlines()[0]
    assert first.startswith("error:") and match in first, res.output
    assert "Traceback" not in res.output and not out.exists()
    assert not list(tmp_path.glob("never.gguf*"))


def test_refusals(tmp_path):
    base = _llama(tmp_path)
    factors = peft_factors(_modules(1, ("attn_q",)), 8)
    ok = write_peft(tmp_path / "ok", factors, 8, 16)
    _refused(tmp_path, base, write_peft(tmp_path / "dora", factors, 8, 16, config={"use_dora": True}), "DoRA")
    _refused(tmp_path, base, write_peft(tmp_path / "ia3", factors, 8, 16, config={"peft_type": "IA3"}),
             "peft_type IA3 cannot be merged")
    _refused(tmp_path, base, write_peft(tmp_path / "rank", factors, 16, 16), "has rank 8, the config says r = 16")
    big = peft_factors({"model.layers.0.self_attn.q_proj": (128, 128)}, 8)
    _refused(tmp_path, base, write_peft(tmp_path / "big", big, 8, 16), "the update is 128x128 but blk.0.attn_q.weight is 64x64")
    absent = peft_factors({"model.layers.7.self_attn.q_proj": (64, 64)}, 8)
    _refused(tmp_path, base, write_peft(tmp_path / "absent", absent, 8, 16), "module 'model.layers.7.self_attn.q_proj' is not in the base")
    _refused(tmp_path, base, write_peft(tmp_path / "tm", factors, 8, 16, targets=["q_proj", "qkv_proj"]),
             "target module(s) qkv_proj are not in the base")
    nan = {k: (a, b.copy()) for k, (a, b) in factors.items()}
    next(iter(nan.values()))[1][0, 0] = np.nan
    _refused(tmp_path, base, write_peft(tmp_path / "nan", nan, 8, 16), "has NaN or Inf values")
    bad = write_peft(tmp_path / "badjson", factors, 8, 16)
    (bad / "adapter_config.json").write_text("{not json")
    _refused(tmp_path, base, bad, "adapter_config.json: not valid JSON (line 1")
    nofile = write_peft(tmp_path / "nofile", factors, 8, 16)
    (nofile / "adapter_model.safetensors").unlink()
    (nofile / "adapter_model.bin").write_bytes(b"\x80\x02")
    _refused(tmp_path, base, nofile, "adapter_model.bin (a PyTorch pickle)")
    _refused(tmp_path, base, tmp_path / "missing", "no such LoRA adapter")
    _refused(tmp_path, base, base, "general.type is None, not 'adapter'")
    _refused(tmp_path, base, ok, "2 --lora-scale for 1 --lora", "--lora-scale", "1", "--lora-scale", "2", code=2)
    alora = write_gguf_adapter(tmp_path / "alora.gguf", "llama",
                               {"blk.0.attn_q.weight": (np.ones((2, 64), np.float32), np.ones((64, 2), np.float32))},
                               8.0, extra={})
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "alora2.gguf"), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_array("adapter.alora.invocation_tokens", [1, 2])
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((2, 64), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.ones((64, 2), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _refused(tmp_path, base, tmp_path / "alora2.gguf", "activated LoRA (aLoRA)")
    qwen = write_gguf_adapter(tmp_path / "qwen.gguf", "qwen2", {}, 8.0)
    _refused(tmp_path, base, qwen, "adapter for qwen2")
    assert alora.exists()


def test_quantized_base_needs_allow_requantize(tmp_path):
    base = _llama(tmp_path, dtype="Q8_0")
    ad = write_peft(tmp_path / "ad", peft_factors(_modules(1, ("attn_q",)), 8), 8, 16)
    _refused(tmp_path, base, ad, "blk.0.attn_q.weight is stored as Q8_0: merging a LoRA into a quantized base",
             code=2)
    res = _cli("quantize", base, tmp_path / "ok.gguf", "--type", "Q8_0", "--lora", ad, "--allow-requantize", "-q")
    assert res.exit_code == 0, res.output
    # dequantize decodes anyway: no flag needed
    res = _cli("dequantize", base, tmp_path / "ok-f32.gguf", "--lora", ad, "-q")
    assert res.exit_code == 0, res.output


def test_rebuild_from_names_the_adapters(tmp_path):
    base = _llama(tmp_path)
    ad = write_peft(tmp_path / "ad", peft_factors(_modules(1, ("attn_q",)), 8), 8, 16)
    out = tmp_path / "m.gguf"
    assert _cli("quantize", base, out, "--type", "Q8_0", "--lora", ad, "-q").exit_code == 0
    res = _cli("verify", out, "--rebuild-from", base, "--json")
    doc = json.loads(res.output)
    check = next(c for c in doc["checks"] if c["name"] == "rebuild")
    assert not check["ok"] and "LoRA" in check["detail"]


def test_peft_prefix_and_embedding_forms(tmp_path):
    """Keys with or without PEFT's base_model.model. and model. prefixes, and an embedding update
    (B @ A)^T, map onto the same tensors; on a tied model lm_head is the embedding."""
    base = open_model(_llama(tmp_path))
    rng = np.random.default_rng(9)
    a = rng.standard_normal((4, 275)).astype(np.float32)
    b = rng.standard_normal((64, 4)).astype(np.float32) * 0.1
    ad = write_peft(tmp_path / "emb", {"model.embed_tokens": (a, b)}, 4, 4, embedding=("model.embed_tokens",),
                    targets=["embed_tokens"])
    view = merged(base, [AdapterSpec(ad, 1.0)])
    np.testing.assert_allclose(view.load_f32("token_embd.weight"), base.load_f32("token_embd.weight") + (b @ a).T,
                               rtol=0, atol=1e-6)
    # the same update, keyed "layers.0..." (an adapter saved on LlamaModel, without "model.")
    f = peft_factors({"layers.0.self_attn.o_proj": (64, 64)}, 4)
    ad2 = write_peft(tmp_path / "short", f, 4, 4)
    assert list(merged(base, [AdapterSpec(ad2, 1.0)]).deltas) == ["blk.0.attn_output.weight"]
    assert PREFIX == "base_model.model."


def test_hf_view_base_merges_before_the_converter_permutation(tmp_path):
    """Through hf_to_gguf_view (quantize's reader for an HF directory) the merge sees GGUF names and
    rows, like a GGUF base."""
    src = build("llama-spm", tmp_path)
    view = hf_to_gguf_view(open_model(src))
    f = peft_factors({"model.layers.1.self_attn.k_proj": (64, 32)}, 4, seed=8)
    m = merged(view, [AdapterSpec(write_peft(tmp_path / "ad", f, 4, 8), 1.0)])
    layout = HFLayout.of(view)
    a, b = f["model.layers.1.self_attn.k_proj"]
    np.testing.assert_allclose(layout.to_hf("blk.1.attn_k.weight", m.load_f32("blk.1.attn_k.weight")),
                               layout.to_hf("blk.1.attn_k.weight", view.load_f32("blk.1.attn_k.weight")) + 2 * (b @ a),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("r,rslora", [(8, False), (16, False), (8, True), (16, True)])
def test_real_gemma_merge_equals_the_update(real_f32, tmp_path, r, rslora):
    """A PEFT adapter on Gemma 3 270M's q/v/down projections of four layers, through `quantize
    --lora`: the merged tensors (kept F32 here) are W + alpha/r * B @ A computed in float64 (Gemma's
    rows are not permuted); every other tensor is what Q8_0 of the base gives."""
    from quantcli import codecs

    base = open_model(real_f32)
    layers, kinds = (0, 5, 11, 17), ("attn_q", "attn_v", "ffn_down")
    mods = {}
    for il in layers:
        for k in kinds:
            n_out, n_in = base.tensors[f"blk.{il}.{k}.weight"].shape
            mods[f"model.layers.{il}.{LINEARS[k]}"] = (n_in, n_out)
    factors = peft_factors(mods, r, seed=r)
    adapter = write_peft(tmp_path / "ad", factors, r, alpha=32, rslora=rslora, targets=["q_proj", "v_proj", "down_proj"])
    out = tmp_path / "merged.gguf"
    res = _cli("quantize", real_f32, out, "--type", "Q8_0", "--lora", adapter, "-q",
               "--tensor-type", r"blk\.(0|5|11|17)\.(attn_q|attn_v|ffn_down)\.weight=F32")
    assert res.exit_code == 0, res.output
    factor = 32 / (np.sqrt(r) if rslora else r)
    with open_model(out) as m:
        for module, (a, b) in factors.items():
            il, kind = int(module.split(".")[2]), next(k for k in kinds if LINEARS[k] in module)
            name = f"blk.{il}.{kind}.weight"
            expect = base.load_f32(name).astype(np.float64) + factor * (b.astype(np.float64) @ a.astype(np.float64))
            got = m.load_f32(name)
            assert m.tensors[name].dtype == "F32"
            np.testing.assert_allclose(got, expect, rtol=0, atol=1e-6)
            assert np.abs(got - base.load_f32(name)).max() > 1e-3  # the update is there
        for name in ("blk.1.attn_q.weight", "blk.17.ffn_up.weight"):
            assert m.tensors[name].dtype == "Q8_0"
            assert np.array_equal(m.raw(name).reshape(-1), codecs.quantize(base.load_f32(name), "Q8_0").reshape(-1))
