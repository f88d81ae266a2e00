"""The forward pass: an independent float64 reference per architecture, layer-sequential equals
whole-model, the ggml roundings (fp16 GELU table, fp16 KV, Q8 activations) and the config."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest

from quantcli.engine import ops
from quantcli.engine.config import ModelConfig
from quantcli.engine.model import Model, forward, run_layers
from quantcli.errors import InputError
from quantcli.formats import open_model
from tests.models import ARCHS, write_model


def reference_logits(path, tokens: np.ndarray) -> np.ndarray:
    """Straight from the papers/HF code, float64, via gguf-py only: [T] -> [T, n_vocab]."""
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer")}
    arch = f["general.architecture"]
    t = {x.name: gguf.quants.dequantize(x.data, x.tensor_type).astype(np.float64).reshape(
        [int(d) for d in reversed(x.shape)]) for x in r.tensors}
    H, Hkv = f[f"{arch}.attention.head_count"], f[f"{arch}.attention.head_count_kv"]
    D, E = f[f"{arch}.attention.key_length"], f[f"{arch}.embedding_length"]
    eps = f[f"{arch}.attention.layer_norm_rms_epsilon"]
    window = f.get(f"{arch}.attention.sliding_window", 0) if arch == "gemma3" else 0
    pattern = f.get(f"{arch}.attention.sliding_window_pattern", 6)
    T = len(tokens)
    pos = np.arange(T)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rotate(x, base):  # x [T, heads, D]; complex rotation by pos * base^(-2i/D)
        ang = pos[:, None, None] * base ** (-2.0 * np.arange(D // 2) / D)
        if arch == "llama":  # pairs (2i, 2i+1)
            c = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * ang)
            return np.stack([c.real, c.imag], -1).reshape(x.shape)
        c = (x[..., : D // 2] + 1j * x[..., D // 2:]) * np.exp(1j * ang)  # NEOX halves
        return np.concatenate([c.real, c.imag], -1)

    x = t["token_embd.weight"][tokens] * (math.sqrt(E) if arch == "gemma3" else 1.0)
    for il in range(f[f"{arch}.block_count"]):
        p = f"blk.{il}."
        swa = window and (il % pattern < pattern - 1)
        h = rms(x, t[p + "attn_norm.weight"])
        q = h @ t[p + "attn_q.weight"].T + t.get(p + "attn_q.bias", 0)
        k = h @ t[p + "attn_k.weight"].T + t.get(p + "attn_k.bias", 0)
        v = h @ t[p + "attn_v.weight"].T + t.get(p + "attn_v.bias", 0)
        q, k, v = q.reshape(T, H, D), k.reshape(T, Hkv, D), v.reshape(T, Hkv, D)
        if p + "attn_q_norm.weight" in t:
            q, k = rms(q, t[p + "attn_q_norm.weight"]), rms(k, t[p + "attn_k_norm.weight"])
        base = 10000.0 if swa else f.get(f"{arch}.rope.freq_base", 10000.0)
        q, k = rotate(q, base), rotate(k, base)
        out = np.zeros((T, H, D))
        for hh in range(H):
            s = q[:, hh] @ k[:, hh // (H // Hkv)].T / math.sqrt(D)
            mask = pos[None, :] > pos[:, None]
            if swa:
                mask |= pos[:, None] - pos[None, :] >= window
            s[mask] = -np.inf
            e = np.exp(s - s.max(1, keepdims=True))
            out[:, hh] = (e / e.sum(1, keepdims=True)) @ v[:, hh // (H // Hkv)]
        a = out.reshape(T, H * D) @ t[p + "attn_output.weight"].T
        if arch == "gemma3":
            a = rms(a, t[p + "post_attention_norm.weight"])
        x = x + a
        h = rms(x, t[p + "ffn_norm.weight"])
        g, u = h @ t[p + "ffn_gate.weight"].T, h @ t[p + "ffn_up.weight"].T
        if arch == "gemma3":
            act = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
        else:
            act = g / (1 + np.exp(-g))
        d = (act * u) @ t[p + "ffn_down.weight"].T
        if arch == "gemma3":
            d = rms(d, t[p + "post_ffw_norm.weight"])
        x = x + d
    out_w = t.get("output.weight", t["token_embd.weight"])
    return rms(x, t["output_norm.weight"]) @ out_w.T


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_float64_reference(tiny_model, arch):
    path = tiny_model(arch, n_layer=3, sliding_window=6 if arch == "gemma3" else 0)
    tokens = np.random.default_rng(1).integers(0, 275, 24)
    with open_model(path) as r:
        ours = forward(Model(r, kv_f16=False, act_quant=False), tokens[None])[0]
    ref = reference_logits(path, tokens)
    # float32 vs float64 (~1e-6); gemma's GELU goes through ggml's fp16 table (~4e-5). A wrong
    # rope pairing alone gives 0.07 .. 0.9
    tol = 5e-4 if arch == "gemma3" else 1e-5
    assert np.abs(ours - ref).max() < tol * np.abs(ref).max()


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_sequential_equals_whole_model(tiny_model, arch):
    path = tiny_model(arch, tied=arch != "qwen3", sliding_window=5 if arch == "gemma3" else 0)
    tokens = np.random.default_rng(2).integers(0, 275, (3, 20))
    with open_model(path) as r:
        m = Model(r)
        whole = forward(m, tokens)  # chunk by chunk through all layers
        hidden = m.embed(tokens)
        run_layers(m, hidden)  # layer by layer over all chunks
        rows = m.output_rows(0, m.config.n_vocab)
        seq = np.stack([m.logits(m.head_input(hidden[c]), rows) for c in range(3)])
    assert np.array_equal(whole, seq)


def test_sliding_window_changes_only_what_it_should(tiny_model):
    tokens = np.random.default_rng(3).integers(0, 275, 30)
    with open_model(tiny_model("gemma3", sliding_window=1000)) as r:
        wide = forward(Model(r), tokens[None])[0]
    with open_model(tiny_model("gemma3", sliding_window=8)) as r:
        narrow = forward(Model(r), tokens[None])[0]
    assert np.array_equal(wide[:8], narrow[:8])  # within the window nothing differs
    assert not np.allclose(wide[8:], narrow[8:])


def test_config_per_architecture(tiny_model):
    with open_model(tiny_model("gemma3", sliding_window=16, swa_pattern=3, n_layer=6)) as r:
        c = ModelConfig.from_reader(r)
    assert c.swa_layers == (True, True, False, True, True, False)
    assert c.rope_neox and c.qk_norm and c.post_norms and c.act == "gelu"
    assert c.embed_scale == pytest.approx(8.0) and c.rope_base == 1e6 and c.rope_base_swa == 10000.0
    with open_model(tiny_model("llama")) as r:
        c = ModelConfig.from_reader(r)
    assert not c.rope_neox and not c.qk_norm and c.act == "silu" and c.sliding_window == 0
    assert c.n_head_kv == 2 and c.attn_scale == pytest.approx(0.25)


def test_unsupported_architecture_is_refused(tmp_path):
    path = write_model(tmp_path / "m.gguf", "mamba", tokenizer=False, tensors=("token_embd.weight",))
    with open_model(path) as r, pytest.raises(InputError, match="architecture 'mamba'"):
        Model(r)


def test_quantized_weights_round_activations_like_ggml(tiny_model):
    tokens = np.random.default_rng(4).integers(0, 275, (1, 16))
    path = tiny_model("llama", dtype="Q8_0", tied=False)
    with open_model(path) as r:
        exact = forward(Model(r, act_quant=False), tokens)
        rounded = forward(Model(r, act_quant=True), tokens)
    assert not np.array_equal(exact, rounded)
    assert np.abs(exact - rounded).max() < 0.05 * np.abs(exact).max()


# -- ops -------------------------------------------------------------------------------------------


def test_gelu_is_ggml_fp16_table():
    x = np.linspace(-12, 12, 10001, dtype=np.float32)
    y = ops.gelu(x)
    x16 = x.astype(np.float16).astype(np.float64)  # ggml looks up the fp16-rounded input
    exact = 0.5 * x16 * (1 + np.tanh(math.sqrt(2 / math.pi) * x16 * (1 + 0.044715 * x16 * x16)))
    mid = np.abs(x) < 10
    # the table holds fp16 values: within half an fp16 ulp of the GELU of the rounded input (plus
    # float32's cancellation in 1 + tanh for x < -5, which ggml's tanhf shares)
    assert np.all(np.abs(y[mid] - exact[mid]) <= np.abs(exact[mid]) * 2.0 ** -11 + 3e-7)
    assert (y[x <= -10] == 0).all() and np.array_equal(y[x >= 10], x[x >= 10])


def test_q8_0_activations_match_gguf_quantizer():
    x = np.random.default_rng(5).standard_normal((8, 256)).astype(np.float32)
    ours = ops.quantize_activations(x, "Q8_0")
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    ref = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
    assert np.abs(ours - ref).max() <= 1e-6  # equal up to round-half ties (ggml-cpu rounds to even)


def test_q8_k_activations_keep_block_max_and_grid():
    x = np.random.default_rng(6).standard_normal((4, 512)).astype(np.float32)
    y = ops.quantize_activations(x, "Q8_K").reshape(4, 2, 256)
    xb = x.reshape(4, 2, 256)
    amax = np.abs(xb).max(-1)
    assert np.allclose(np.abs(y).max(-1), amax, rtol=1e-6)
    assert np.allclose(y / (amax[..., None] / 127), np.rint(y / (amax[..., None] / 127)), atol=1e-3)
    assert np.abs(y - xb).max() <= amax.max() / 127 * 0.5 + 1e-6


def test_rope_neox_and_normal_pairs():
    x = np.zeros((2, 1, 4), np.float32)
    x[:, 0, 0] = 1.0
    cos, sin = ops.rope_cache(2, 4, 10000.0, 1.0)
    neox = ops.rope(x, cos, sin, neox=True)
    normal = ops.rope(x, cos, sin, neox=False)
    assert np.allclose(neox[0, 0], [1, 0, 0, 0]) and np.allclose(normal[0, 0], [1, 0, 0, 0])
    assert np.allclose(neox[1, 0], [math.cos(1), 0, math.sin(1), 0], atol=1e-6)  # pairs (0, 2)
    assert np.allclose(normal[1, 0], [math.cos(1), math.sin(1), 0, 0], atol=1e-6)  # pairs (0, 1)


def test_attention_blocks_do_not_change_results():
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((50, h, 8)).astype(np.float32) for h in (4, 2, 2))
    full = ops.attention(q, k, v, 0.3, window=0, block=50)
    assert np.allclose(ops.attention(q, k, v, 0.3, window=0, block=7), full, atol=1e-6)
    sw = ops.attention(q, k, v, 0.3, window=5, block=50)
    assert np.allclose(ops.attention(q, k, v, 0.3, window=5, block=7), sw, atol=1e-6)
    assert np.allclose(sw[:5], full[:5], atol=1e-6) and not np.allclose(sw[5:], full[5:])


def _numpy_reference(kind: str, x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """The plain numpy formulations the compiled kernels replaced (ggml-cpu's arithmetic)."""
    if kind == "rms_norm":
        sq = (x * x).astype(np.float64)  # float32 squares, summed in double
        mean = (sq.sum(axis=-1) / x.shape[-1]).astype(np.float32)
        scale = np.float32(1.0) / np.sqrt(mean + np.float32(1e-6))
        return x * scale[..., None] * w
    if kind == "F16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    block = 32 if kind == "Q8_0" else 256
    xb = x.reshape(-1, x.shape[-1] // block, block)
    if kind == "Q8_0":
        amax = np.abs(xb).max(axis=-1, keepdims=True)
        with np.errstate(divide="ignore"):
            iscale = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
        d = (amax / np.float32(127.0)).astype(np.float16).astype(np.float32)
        return (np.rint(xb * iscale) * d).reshape(x.shape)
    vmax = np.take_along_axis(xb, np.abs(xb).argmax(axis=-1)[..., None], axis=-1)
    with np.errstate(divide="ignore"):
        iscale = np.where(vmax != 0, np.float32(-127.0) / vmax, np.float32(0.0)).astype(np.float32)
        d = np.where(iscale != 0, np.float32(1.0) / iscale, np.float32(0.0)).astype(np.float32)
    return (np.minimum(np.rint(xb * iscale), np.float32(127.0)) * d).reshape(x.shape)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 40.0, 1e5])
def test_compiled_kernels_equal_numpy_bit_for_bit(scale):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((24, 1024)) * scale).astype(np.float32)
    x[3, :256] = 0  # an all-zero block of each size
    x[7, 10] = -np.abs(x[7]).max() * 2  # a negative extreme decides Q8_K's sign
    w = rng.standard_normal(1024).astype(np.float32)
    for kind in ("Q8_0", "Q8_K", "F16"):
        ours = ops.quantize_activations(x, kind) if kind != "F16" else ops.round_fp16(x)
        assert np.array_equal(ours.view(np.uint32), _numpy_reference(kind, x).view(np.uint32)), kind
    assert np.array_equal(ops.rms_norm(x, w, 1e-6).view(np.uint32),
                          _numpy_reference("rms_norm", x, w).view(np.uint32))
    g = np.clip(x, -12, 12) if scale > 1 else x
    table = ops._gelu_table()
    with np.errstate(over="ignore"):
        ref = table[g.astype(np.float16).view(np.uint16)]
    ref = np.where(g <= -10, np.float32(0), np.where(g >= 10, g, ref)).astype(np.float32)
    assert np.array_equal(ops.gelu(g, times=w[None, :].repeat(24, 0)).view(np.uint32), (ref * w).view(np.uint32))
