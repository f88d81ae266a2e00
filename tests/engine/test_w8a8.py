"""W8A8 fake quantization: against a plain numpy reference, its known properties, the model's
simulate hook (which linears it touches) and `report --simulate` through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.engine.model import LINEARS, Model, forward
from quantcli.engine.perplexity import PerplexityOptions, evaluate
from quantcli.engine.w8a8 import (W8A8, Saturation, dequantize, fake_quant_activations, fake_quant_weight, mode_of,
                                  quantize_per_tensor, quantize_per_token, quantize_weight)
from quantcli.errors import InputError, UsageError
from quantcli.formats import open_model
from tests.models import write_model

TEXT = "In the beginning God created the heaven and the earth. " * 60


def _reference(x: np.ndarray, scale: np.ndarray, lo: float = -127.0) -> np.ndarray:
    """int8 the plain way, element by element in float64: round half to even, clamp to lo..127."""
    q = np.zeros(x.shape)
    for idx in np.ndindex(x.shape):
        s = float(np.broadcast_to(scale, x.shape)[idx])
        q[idx] = 0.0 if s == 0 else min(127.0, max(lo, round(float(x[idx]) / s)))  # round(): half to even
    return q


def test_weights_per_output_channel_match_a_plain_reference():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 40)) * rng.exponential(1.0, (8, 1))).astype(np.float32)
    w[3] = 0.0  # a zero row
    w[5, 7] = 50.0  # an outlier sets its row's scale only
    q, scale = quantize_weight(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (8,)
    assert np.array_equal(scale, (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32))
    assert np.array_equal(q, _reference(w, scale[:, None]).astype(np.int8))
    assert q[3].tolist() == [0] * 40 and scale[3] == 0 and not np.isnan(fake_quant_weight(w)).any()
    assert np.abs(q).max() == 127 and q.min() >= -127  # -128 unused
    assert all(np.abs(q[i]).max() == 127 for i in range(8) if i != 3)  # every row's max maps to +-127
    assert q[5, 7] == 127
    assert np.array_equal(fake_quant_weight(w), q.astype(np.float32) * scale[:, None])
    # per-channel: scaling a row scales its dequantized values and nothing else
    w2 = w.copy()
    w2[1] *= 8.0
    assert np.array_equal(quantize_weight(w2)[0], q)


def test_rounding_is_half_to_even():
    # 127 / 127 = scale 1: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0, -1.5 -> -2
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]], np.float32)
    q, scale = quantize_per_token(x)
    assert scale.tolist() == [1.0] and q.tolist() == [[127, 0, 2, 2, 0, -2]]


def test_activations_per_token_and_per_tensor():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 32)).astype(np.float32)
    x[2] = 0.0
    x[4] *= 30.0
    q, scale = quantize_per_token(x)
    assert np.array_equal(scale, (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float32))
    assert np.array_equal(q, _reference(x, scale[:, None]).astype(np.int8))
    assert q[2].tolist() == [0] * 32 and scale[2] == 0
    # static: one scale from the calibration max; values beyond it clip to -128..127 (vLLM's kernel)
    qt, st = quantize_per_tensor(x, 10.0)
    assert st == np.float32(np.float32(10.0) / np.float32(127))
    assert np.array_equal(qt, _reference(x, np.float32(st), lo=-128.0).astype(np.int8))
    assert qt[4].max() == 127 and qt[4].min() == -128 and (x[4] > 10).any() and (x[4] < -10.1).any()
    assert np.array_equal(fake_quant_activations(x, "tensor", 10.0), dequantize(qt, st))
    assert np.array_equal(fake_quant_activations(x, "token"), dequantize(q, scale))
    # per-token error is at most half a step per element
    assert np.all(np.abs(fake_quant_activations(x, "token") - x) <= scale[:, None] / 2 + 1e-7)


def test_options_are_validated():
    with pytest.raises(UsageError, match="unknown W8A8 activation mode 'row'; known: token, tensor, hybrid"):
        W8A8("row")
    for mode in ("tensor", "hybrid"):
        with pytest.raises(UsageError, match="needs act_max"):
            W8A8(mode)
    with pytest.raises(InputError, match="no calibration max"):
        W8A8("tensor", act_max={}).activations("blk.0.attn_q.weight", np.ones((2, 4), np.float32))


@pytest.mark.parametrize("mode", ["token", "tensor", "hybrid"])
def test_model_runs_every_block_linear_as_w8a8(tmp_path, mode):
    """Each linear sees dequant(q_x) @ dequant(q_W).T (+ bias), hybrid: ffn_down's input per token and
    the others' per tensor; the head and embeddings are as before."""
    path = write_model(tmp_path / "m.gguf", "qwen2", n_layer=2)  # qwen2: with q/k/v biases
    chunk = np.random.default_rng(0).integers(0, 275, 32)
    with open_model(path) as r:
        plain = Model(r, act_quant=False)
        maxima: dict[str, float] = {}
        ins: list[tuple[str, np.ndarray]] = []
        forward(plain, chunk, lambda n, x: maxima.__setitem__(n, max(maxima.get(n, 0.0), float(np.abs(x).max()))))
        sim = W8A8(mode, act_max=maxima if mode != "token" else None)
        m = Model(r, simulate=sim)
        w = m.layer_weights(0)
        raw = plain.layer_weights(0)
        for short in LINEARS:
            assert np.array_equal(w[short], fake_quant_weight(raw[short])), short
        assert np.array_equal(w["attn_norm"], raw["attn_norm"])
        pairs: dict[str, list] = {}
        x = m.embed(chunk)
        m.layer(0, w, x, lambda n, a: ins.append((n, a.copy())), lambda n, y: pairs.setdefault(n, []).append(y))
        for name, a in ins:
            short = name.split(".")[2]
            xq = fake_quant_activations(a, mode_of(mode, name), maxima.get(name))
            assert mode_of(mode, name) == ("token" if mode == "token" or (mode == "hybrid" and short == "ffn_down")
                                           else "tensor")
            y = xq @ w[short].T + (w[short + ".bias"] if short + ".bias" in w else 0)
            assert np.allclose(pairs[name][0], y, rtol=1e-5, atol=1e-5), name
        assert len(ins) == len(LINEARS)
        # the simulation changes the logits, but little
        z_plain, z_sim = forward(plain, chunk), forward(m, chunk)
        assert not np.array_equal(z_plain, z_sim)
        assert np.linalg.norm(z_sim - z_plain) < 0.1 * np.linalg.norm(z_plain)


@pytest.mark.parametrize("mode", ["token", "tensor"])
def test_linears_the_engine_keeps_in_float_are_not_simulated(tmp_path, mode):
    """W8A8(keep=...): those linears keep their float weights and inputs (per-token mode: attn_k
    out of q/k/v, which share the rest's rounded input); the others are simulated as before."""
    path = write_model(tmp_path / "m.gguf", "llama", n_layer=2)
    chunk = np.random.default_rng(0).integers(0, 275, 32)
    keep = frozenset({"blk.0.attn_k.weight", "blk.1.ffn_down.weight"})
    with open_model(path) as r:
        plain = Model(r, act_quant=False)
        maxima: dict[str, float] = {}
        forward(plain, chunk, lambda n, x: maxima.__setitem__(n, max(maxima.get(n, 0.0), float(np.abs(x).max()))))
        act_max = maxima if mode == "tensor" else None
        m = Model(r, simulate=W8A8(mode, act_max=act_max, keep=keep))
        full = Model(r, simulate=W8A8(mode, act_max=act_max))
        for il in range(2):
            w, raw, sim = m.layer_weights(il), plain.layer_weights(il), full.layer_weights(il)
            for short in LINEARS:
                want = raw if f"blk.{il}.{short}.weight" in keep else sim
                assert np.array_equal(w[short], want[short]), (il, short)
        seen: dict[str, np.ndarray] = {}
        ref: dict[str, np.ndarray] = {}
        x = m.embed(chunk)
        m.layer(0, m.layer_weights(0), x, None, lambda n, y: seen.setdefault(n, y))
        plain.layer(0, plain.layer_weights(0), x, None, lambda n, y: ref.setdefault(n, y))
        # attn_k computes in float; attn_q, which reads the same input, does not
        np.testing.assert_allclose(seen["blk.0.attn_k.weight"], ref["blk.0.attn_k.weight"], rtol=1e-6, atol=1e-6)
        assert not np.allclose(seen["blk.0.attn_q.weight"], ref["blk.0.attn_q.weight"], rtol=1e-6, atol=1e-6)
        z_keep, z_full = forward(m, chunk), forward(full, chunk)
        assert not np.array_equal(z_keep, z_full)


def test_perplexity_options_simulate_only_the_model(tmp_path):
    path = write_model(tmp_path / "m.gguf", "llama", n_layer=2)
    with open_model(path) as r:
        plain = evaluate(r, TEXT, PerplexityOptions(ctx=64, chunks=2))
        sim = evaluate(r, TEXT, PerplexityOptions(ctx=64, chunks=2, simulate=W8A8("token")), base=r)
    assert sim.perplexity != plain.perplexity and sim.base_perplexity == pytest.approx(plain.perplexity, rel=1e-12)
    assert 0 < sim.kld_mean < 0.05


def test_report_simulate_through_the_cli(tmp_path):
    model = write_model(tmp_path / "m.gguf", "llama", n_layer=2)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    runner = CliRunner()
    args = ["report", str(model), "--json", "--eval-text", str(text), "--ctx", "64", "--chunks", "2"]
    plain = json.loads(runner.invoke(app, args).output)["evaluation"]
    found = {}
    for spec in ("w8a8", "w8a8:token", "w8a8:tensor", "w8a8:hybrid"):
        res = runner.invoke(app, args + ["--simulate", spec])
        assert res.exit_code == 0, res.output
        found[spec] = json.loads(res.output)["evaluation"]
        assert found[spec]["simulate"] == spec
    assert found["w8a8"]["perplexity"] == found["w8a8:token"]["perplexity"] != plain["perplexity"]
    assert len({found[s]["perplexity"] for s in ("w8a8:token", "w8a8:tensor", "w8a8:hybrid")}) == 3
    assert all(abs(f["perplexity"] / plain["perplexity"] - 1) < 0.05 for f in found.values())
    bad = runner.invoke(app, args + ["--simulate", "w4a8"])
    assert bad.exit_code == 2
    assert "unknown simulation 'w4a8'; known: w8a8, w8a8:token, w8a8:tensor, w8a8:hybrid" in bad.output
    lonely = runner.invoke(app, ["report", str(model), "--simulate", "w8a8"])
    assert lonely.exit_code == 2 and "--simulate needs --eval-text" in lonely.output
    shown = runner.invoke(app, args[:2] + args[3:] + ["--simulate", "w8a8:tensor"])
    assert shown.exit_code == 0 and "perplexity as w8a8:tensor " in shown.output
    # static scales (MSE-clipped, on the eval text itself) clip some tokens; the report says which
    clip = found["w8a8:tensor"]["static_clipping"]
    assert found["w8a8:token"]["static_clipping"] is None and clip["linears"] == 2 * len(LINEARS)
    assert 0 < clip["linears_clipping"] <= clip["linears"] and 0 < clip["clipped_share"] < 1
    worst = clip["worst"][0]
    assert 0 < worst["clipped_tokens"] <= worst["tokens"] == 2 * 64 and worst["overshoot"] > 1
    # hybrid: ffn_down's input is per token and clips nothing; the other linears are tallied as static
    hybrid = found["w8a8:hybrid"]["static_clipping"]
    assert hybrid["linears"] == 2 * (len(LINEARS) - 1)
    assert not any(w["linear"].split(".")[2] == "ffn_down" for w in hybrid["worst"])
    assert (f"static scales (the eval text's own): {clip['linears_clipping']} of {clip['linears']} linears clip"
            in " ".join(shown.output.split()))


def test_saturation_counts_the_tokens_the_static_kernel_clamps():
    """A token is clipped exactly when rint(x / scale) of one of its values falls outside -128..127
    (what vLLM's static kernel clamps), counted against a float64 reference, at the boundaries too."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((40, 16)) * 0.4).astype(np.float32)
    x[30:] *= 4  # a few tokens well beyond the scale
    amax = 2.0
    scale = np.float32(np.float32(amax) / np.float32(127))
    x[5, 3] = scale * np.float32(127.49)  # rounds to 127: held
    x[6, 3] = scale * np.float32(127.51)  # rounds to 128: clamped
    x[7, 3] = -scale * np.float32(128.49)  # -128: held (the negative rail is one step further)
    x[8, 3] = -scale * np.float32(128.6)  # -129: clamped
    sat = Saturation()
    sat.add("blk.0.ffn_down.weight", x, amax)
    sat.add("blk.0.ffn_down.weight", x[:10], amax)
    q = np.rint(x.astype(np.float64) / float(scale))
    ref = ((q > 127) | (q < -128)).any(axis=1)
    assert not ref[5] and ref[6] and not ref[7] and ref[8]
    assert sat.tokens["blk.0.ffn_down.weight"] == 50
    assert sat.clipped["blk.0.ffn_down.weight"] == int(ref.sum() + ref[:10].sum())
    assert sat.overshoot["blk.0.ffn_down.weight"] == pytest.approx(float(np.abs(x).max()) / amax, rel=1e-6)
    # nothing beyond the scale: no token clipped; a scale of 0 clips every token that is not all zero
    sat.add("blk.0.attn_q.weight", x, float(np.abs(x).max()))
    zero = np.zeros((3, 4), np.float32)
    zero[1, 2] = 0.5
    sat.add("blk.0.attn_k.weight", zero, 0.0)
    assert sat.clipped["blk.0.attn_q.weight"] == 0 and sat.clipped["blk.0.attn_k.weight"] == 1
    got = sat.summary(worst=2)
    assert got["linears"] == 3 and got["linears_clipping"] == 2 and got["max_overshoot"] == float("inf")
    assert got["clipped_share"] == pytest.approx((sat.clipped["blk.0.ffn_down.weight"] + 1) / (50 + 40 + 3))
    assert [w["linear"] for w in got["worst"]] == ["blk.0.attn_k.weight", "blk.0.ffn_down.weight"]  # by overshoot


def test_saturation_through_the_model(tmp_path):
    """Every block linear's input is tallied once per chunk; scales at the text's own maxima clip
    nothing, halved ones clip, and the clipped tokens are those with a value beyond the scale."""
    from quantcli.calibrate.absmax import AbsMaxObserver
    from quantcli.calibrate.runner import RunOptions, run_calibration
    from quantcli.engine.tokenizer import Tokenizer

    path = write_model(tmp_path / "m.gguf", "llama", n_layer=2)
    with open_model(path) as r:
        tokens = Tokenizer.from_model(r).encode(TEXT, add_special=True, parse_special=False)
        stats = run_calibration(Model(r), tokens, RunOptions(ctx=64, chunks=2), [AbsMaxObserver()]).observers[0].result()
        amax = {k: float(v.max()) for k, v in stats.inputs.items()}
        full, half = Saturation(), Saturation()
        evaluate(r, TEXT, PerplexityOptions(ctx=64, chunks=2, simulate=W8A8("tensor", act_max=amax, saturation=full)))
        evaluate(r, TEXT, PerplexityOptions(ctx=64, chunks=2, simulate=W8A8(
            "tensor", act_max={k: v / 2 for k, v in amax.items()}, saturation=half)))
    assert sorted(full.tokens) == sorted(amax) and len(amax) == 2 * len(LINEARS)
    assert set(full.tokens.values()) == {2 * 64}
    # layer 0's q/k/v read what the float calibration run saw (later inputs follow int8 layers)
    first = [f"blk.0.{k}.weight" for k in ("attn_q", "attn_k", "attn_v")]
    assert all(full.clipped[k] == 0 and full.overshoot[k] == pytest.approx(1.0, rel=1e-6) for k in first)
    assert all(half.clipped[k] > 0 and half.overshoot[k] == pytest.approx(2.0, rel=1e-6) for k in first)
    assert sum(half.clipped.values()) > sum(full.clipped.values())
