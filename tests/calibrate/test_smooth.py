"""SmoothQuant on the calibration runner: the transform is exact for every architecture and mapping
set, the scales follow the formula (GQA-shared for attn_v -> attn_output), alpha is validated, auto
picks its grid's minimum, and a resumed run gives the same scales."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantcli.calibrate.runner import RunOptions, make_observer, run_calibration
from quantcli.calibrate.smooth import (CHANNEL_FLOOR, CLIP_RATIOS, MAPPINGS, SEARCH_CHUNKS_W8A8, LayerSmoothing,
                                       SmoothedReader, SmoothObserver, SmoothResult, expand, mappings_for, smooth_model,
                                       smooth_scales, smoothed_tensors)
from quantcli.engine.model import Model, forward
from quantcli.engine.w8a8 import W8A8, fake_quant_activations, fake_quant_weight
from quantcli.errors import InputError, UsageError
from quantcli.formats import open_model
from quantcli.progress import Progress
from tests.models import ARCHS, write_model

CTX = 32


def tokens(n: int = 200, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 275, n)


def _inputs(model: Model, il: int, toks: np.ndarray, n_chunks: int) -> dict[str, np.ndarray]:
    """Every matmul input of layer il over the runner's chunks, concatenated [n_tokens, n_in]."""
    chunks = toks[: n_chunks * CTX].reshape(n_chunks, CTX).copy()
    chunks[:, 0] = 2  # BOS, as the runner's chunks
    seen: dict[str, list[np.ndarray]] = {}
    for chunk in chunks:
        x = model.embed(chunk)
        for j in range(il + 1):
            hook = (lambda n, a: seen.setdefault(n.split(".")[2], []).append(a.copy())) if j == il else None
            x = model.layer(j, model.layer_weights(j), x, hook)
    return {k: np.concatenate(v) for k, v in seen.items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mappings", ["norm", "all"])
def test_smoothed_model_computes_the_same_logits(tmp_path, arch, mappings):
    path = write_model(tmp_path / "m.gguf", arch, n_layer=2)  # n_head 4, n_head_kv 2: GQA
    chunks = tokens(64, seed=5).reshape(2, CTX)
    with open_model(path) as r:
        exact = Model(r, kv_f16=False, act_quant=False)
        res = smooth_model(exact, tokens(), RunOptions(ctx=CTX), alpha=0.5, mappings=mappings)
        smoothed = SmoothedReader(r, res)
        z0, z1 = forward(exact, chunks), forward(Model(smoothed, kv_f16=False, act_quant=False), chunks)
        # gemma's GELU reads an fp16 table: an input that float32 noise moves across an fp16
        # rounding boundary changes by one fp16 step, so its noise is larger
        tol = (1e-4 if arch == "gemma3" else 3e-6) * np.abs(z0).max()
        assert np.abs(z1 - z0).max() < tol
        # with llama.cpp's fp16 KV cache and activation rounding on, still close
        z2 = forward(Model(r), chunks)
        z3 = forward(Model(smoothed), chunks)
        assert np.abs(z3 - z2).max() < 2e-3 * np.abs(z2).max()
        # and the weights did change: every mapping's source and consumers
        for m in res.mappings:
            for short in (m.source, *m.consumers):
                name = f"blk.1.{short}.weight"
                assert not np.allclose(smoothed.load_f32(name), r.load_f32(name)), name
        assert np.array_equal(smoothed.load_f32("blk.1.attn_output.weight"), r.load_f32("blk.1.attn_output.weight")) \
            == (mappings == "norm")
    assert len(res.mappings) == (2 if mappings == "norm" else 4) and sorted(res.layers) == [0, 1]


def test_mappings_table():
    assert set(MAPPINGS) == set(ARCHS)
    for arch in ARCHS:
        norm = {(m.source, m.consumers) for m in mappings_for(arch, "norm")}
        assert norm == {("attn_norm", ("attn_q", "attn_k", "attn_v")), ("ffn_norm", ("ffn_gate", "ffn_up"))}
        extra = {(m.source, m.consumers) for m in mappings_for(arch, "all")} - norm
        assert extra == {("attn_v", ("attn_output",)), ("ffn_up", ("ffn_down",))}
    with pytest.raises(InputError, match="no norm -> linear mappings for architecture 'phi3'; known: gemma3, llama"):
        mappings_for("phi3")
    with pytest.raises(UsageError, match="unknown mappings 'some'; known: norm, all"):
        SmoothObserver(mappings="some")


def test_scales_formula_on_a_hand_example():
    act, w = np.array([4.0, 1.0, 0.0, 9.0, 1e-12]), np.array([1.0, 4.0, 2.0, 0.0, 1.0])
    # s = sqrt(x / w); a zero activation or weight maximum keeps 1; tiny values clamp at 1e-5
    assert smooth_scales(act, w, 0.5).tolist() == pytest.approx([2.0, 0.5, 1.0, 1.0, 1e-5])
    assert smooth_scales(act, w, 1.0).tolist() == pytest.approx([4.0, 1.0, 1.0, 1.0, 1e-5])
    assert smooth_scales(act, w, 0.0).tolist() == pytest.approx([1.0, 0.25, 1.0, 1.0, 1.0])
    assert smooth_scales(np.array([np.inf]), np.array([1.0]), 0.5).tolist() == [1.0]
    assert smooth_scales(act, w, 0.5).dtype == np.float32


def test_channel_floor_on_a_hand_example():
    """With a floor q, max|X_j| is first raised to the q-quantile of the positive, finite channel
    maxima: a channel seen quiet is scaled as that quantile's, the others as before."""
    act, w = np.array([4.0, 1.0, 0.0, 9.0, 16.0]), np.ones(5)
    q = float(np.quantile([4.0, 1.0, 9.0, 16.0], 0.5))  # 6.5; the zero channel is not counted
    assert smooth_scales(act, w, 0.5, 0.5).tolist() == pytest.approx([q ** 0.5, q ** 0.5, 1.0, 3.0, 4.0])
    assert smooth_scales(act, w, 1.0, 1.0).tolist() == pytest.approx([16.0, 16.0, 1.0, 16.0, 16.0])
    assert smooth_scales(act, w, 0.5, 0.0).tolist() == smooth_scales(act, w, 0.5).tolist()
    assert smooth_scales(np.zeros(3), w[:3], 0.5, 0.75).tolist() == [1.0, 1.0, 1.0]


def test_channel_floor_is_the_per_token_searchs_default():
    """`--alpha auto`'s per-token W8A8 search floors the channel maxima at CHANNEL_FLOOR unless told;
    static and hybrid activations, a given alpha and the search for llama.cpp's kernels (Q8_0's
    blocks of 32 each have their own scale) keep SmoothQuant's formula as it is; a floor outside
    [0, 1] is a usage error."""
    assert SmoothObserver(alpha="auto", activations="token").channel_floor == CHANNEL_FLOOR == 0.75
    for mode in ("tensor", "hybrid"):
        assert SmoothObserver(alpha="auto", activations=mode).channel_floor == 0.0
        assert SmoothObserver(alpha="auto", activations=mode, channel_floor=0.75).channel_floor == 0.75
    assert SmoothObserver(alpha="auto", activations="token", channel_floor=0.0).channel_floor == 0.0
    assert SmoothObserver(alpha=0.8).channel_floor == 0.0
    assert SmoothObserver(alpha="auto", activations="token",
                          weight_types={"blk.0.attn_q.weight": "Q8_0"}).channel_floor == 0.0
    assert SmoothObserver(alpha=0.5, channel_floor=0.5).channel_floor == 0.5
    for bad in (-0.1, 1.5):
        with pytest.raises(UsageError, match=r"the channel floor is a quantile in \[0, 1\]"):
            SmoothObserver(alpha="auto", channel_floor=bad)


def test_hybrid_static_scales_default_to_the_maxima():
    """Static activations get MSE-clipped scales unless told, hybrid the calibration maxima (its
    long-tailed input, ffn_down's, is per token); either can be asked for."""
    assert SmoothObserver(alpha="auto", activations="tensor").static_scales == "mse"
    assert SmoothObserver(alpha="auto", activations="hybrid").static_scales == "max"
    assert SmoothObserver(alpha="auto", activations="hybrid", static_scales="mse").static_scales == "mse"
    assert SmoothObserver(alpha=0.5, activations="tensor", static_scales="max").static_scales == "max"
    with pytest.raises(UsageError, match="unknown static scales 'p99'; known: mse, max"):
        SmoothObserver(activations="hybrid", static_scales="p99")


@pytest.mark.parametrize("alpha", [1.5, -0.1, "high", True, None])
def test_alpha_outside_the_unit_interval_is_a_usage_error(alpha):
    with pytest.raises(UsageError, match=r"alpha .* is outside \[0, 1\]; use a migration strength in \[0, 1\] or 'auto'"):
        SmoothObserver(alpha=alpha)
    with pytest.raises(UsageError, match="outside"):
        make_observer("smooth", alpha=alpha)


def test_scales_use_the_weight_max_over_linears_sharing_the_input_and_gqa_groups(tmp_path):
    """s of attn_norm -> q/k/v from max|X_j| and the max over q, k, v of max|W_.j|; s of attn_v ->
    attn_output one per v channel, from the maxima over its q-head group, shared by the group."""
    path = write_model(tmp_path / "m.gguf", "llama", n_layer=2, n_head=4, n_head_kv=2)
    with open_model(path) as r:
        m = Model(r)
        res = smooth_model(m, tokens(), RunOptions(ctx=CTX), alpha=0.7, mappings="all")
        x = _inputs(m, 0, tokens(), 6)
        w = m.layer_weights(0)
    cfg = res.config
    layer = res.layers[0]
    wmax = np.max([np.abs(w[c]).max(axis=0) for c in ("attn_q", "attn_k", "attn_v")], axis=0)
    assert np.allclose(layer.scales["attn_norm->qkv"], smooth_scales(np.abs(x["attn_q"]).max(axis=0), wmax, 0.7), rtol=1e-6)
    wmax = np.max([np.abs(w[c]).max(axis=0) for c in ("ffn_gate", "ffn_up")], axis=0)
    assert np.allclose(layer.scales["ffn_norm->gate_up"], smooth_scales(np.abs(x["ffn_gate"]).max(axis=0), wmax, 0.7),
                       rtol=1e-6)
    # attn_output's input channel (q head h, d) reads v channel (h // 2, d)
    a = np.abs(x["attn_output"]).max(axis=0).reshape(4, 16)
    wo = np.abs(w["attn_output"]).max(axis=0).reshape(4, 16)
    want = [smooth_scales(np.maximum(a[2 * g], a[2 * g + 1]), np.maximum(wo[2 * g], wo[2 * g + 1]), 0.7) for g in range(2)]
    s = layer.scales["attn_v->attn_output"]
    assert s.shape == (2 * 16,) and np.allclose(s, np.concatenate(want), rtol=1e-6)
    e = expand(res.mappings[2], s, cfg).reshape(4, 16)
    assert np.array_equal(e[0], e[1]) and np.array_equal(e[2], e[3]) and np.array_equal(e[0], s[:16])
    sd = layer.scales["ffn_up->ffn_down"]
    assert np.allclose(sd, smooth_scales(np.abs(x["ffn_down"]).max(axis=0), np.abs(w["ffn_down"]).max(axis=0), 0.7),
                       rtol=1e-6)
    assert layer.alpha == 0.7 and res.alpha == 0.7


def _with_outliers(r, channels=(3, 10), factor=30.0) -> SmoothedReader:
    """The model with a few of attn_norm's output channels `factor` times larger (their q/k/v
    columns as much smaller): the same function, activations with outliers."""
    cfg = Model(r).config
    s = np.ones(cfg.n_embd, np.float32)
    s[list(channels)] = 1.0 / factor
    res = SmoothResult(cfg.arch, mappings_for(cfg.arch), cfg, 0.0)
    for il in range(cfg.n_layer):
        res.layers[il] = LayerSmoothing(0.0, {"attn_norm->qkv": s}, {}, {}, {})
    return SmoothedReader(r, res)


def test_smoothing_flattens_outliers_and_lowers_the_simulated_error(tmp_path):
    path = write_model(tmp_path / "m.gguf", "qwen3", n_layer=2)
    with open_model(path) as r:
        out = _with_outliers(r)
        res = smooth_model(Model(out), tokens(), RunOptions(ctx=CTX), alpha=0.5)
        stats = run_calibration(Model(SmoothedReader(out, res)), tokens(), RunOptions(ctx=CTX), [make_observer("absmax")])
    qkv = res.mappings[0]
    for il, layer in res.layers.items():
        assert layer.outlier_ratio(qkv, res.config) > 10 > layer.outlier_ratio(qkv, res.config, after=True)
        assert sum(layer.error_after.values()) < 0.5 * sum(layer.error_before.values())
    # what it records as the smoothed model's input maxima is what that model's inputs reach
    measured = stats.observers[0].result().inputs
    maxima = res.act_max()
    assert sorted(maxima) == sorted(measured)
    for name, v in measured.items():
        assert maxima[name] == pytest.approx(float(v.max()), rel=1e-5), name


def test_auto_alpha_per_token_curve_is_the_blocks_w8a8_error(tmp_path):
    """Per token, the block curve at an alpha is, from scratch, the layer smoothed at that alpha
    (its scales the fixed-alpha run's at the same channel floor), run as the W8A8 engine runs it
    (int8 weights per output channel, int8 activations per token) on the first SEARCH_CHUNKS_W8A8
    chunks (the default), against the float layer: the mean over their tokens of ||dh||^2 / ||h||^2."""
    path = write_model(tmp_path / "m.gguf", "llama", n_layer=2)
    opts = dict(mappings="all", activations="token", channel_floor=CHANNEL_FLOOR)
    with open_model(path) as r:
        out = _with_outliers(r)
        m = Model(out)
        auto = smooth_model(m, tokens(), RunOptions(ctx=CTX), alpha="auto", **opts)
        chunks = tokens()[:SEARCH_CHUNKS_W8A8 * CTX].reshape(SEARCH_CHUNKS_W8A8, CTX).copy()
        chunks[:, 0] = 2  # BOS, as the runner's chunks
        assert len(tokens()) // CTX > SEARCH_CHUNKS_W8A8 > 1  # the run has more chunks than the search
        xs = [m.embed(c) for c in chunks]
        refs = [m.layer(0, m.layer_weights(0), x) for x in xs]
        for a in (0.0, 0.5, 0.85):
            fixed = smooth_model(m, tokens(), RunOptions(ctx=CTX), alpha=a, **opts)
            sim = Model(SmoothedReader(out, fixed), simulate=W8A8("token"))
            w = sim.layer_weights(0)
            d = [sim.layer(0, w, x) - ref for x, ref in zip(xs, refs)]
            want = np.mean(np.concatenate([(e.astype(np.float64) ** 2).sum(1) / (ref.astype(np.float64) ** 2).sum(1)
                                           for e, ref in zip(d, refs)]))
            assert auto.layers[0].alpha_errors["block"][int(round(a / 0.05))] == pytest.approx(want, rel=1e-4), a
            assert fixed.layers[0].error_before == pytest.approx(auto.layers[0].error_before, rel=1e-6)


@pytest.mark.parametrize("activations", ["tensor", "token", "hybrid"])
def test_auto_alpha_picks_the_blocks_minimum(tmp_path, activations):
    """The W8A8 search (static, per token, or hybrid): one alpha for the layer at the block curve's
    minimum, then each mapping's own alpha, in table order, at the minimum of its curve with the
    others held; an alpha moves only where that lowers the block error, and the scales are
    SmoothQuant's at each one, with the channel floor. The grid's last candidate, NaN, leaves a
    mapping as it is (scales 1)."""
    path = write_model(tmp_path / "m.gguf", "gemma3", n_layer=2)
    with open_model(path) as r:
        out = _with_outliers(r)
        m = Model(out)
        auto = smooth_model(m, tokens(), RunOptions(ctx=CTX), alpha="auto", mappings="all", activations=activations,
                            search_chunks=2, channel_floor=CHANNEL_FLOOR)
        fixed = smooth_model(m, tokens(), RunOptions(ctx=CTX), alpha=0.5, mappings="all", activations=activations)
    grid = np.append(np.round(np.arange(0, 1.0001, 0.05), 6), np.nan)
    names = [mp.name for mp in auto.mappings]
    moved = 0
    for layer in auto.layers.values():
        curve = layer.alpha_errors["block"]
        assert sorted(layer.alpha_errors) == sorted(["block"] + [f"block:{n}" for n in names])
        assert curve.shape == (22,) and curve.max() > curve.min()
        start = int(np.argmin(curve))
        best = curve.min()
        for n in names:  # at the time of its turn, mapping n's alpha is still the layer's (start)
            c = layer.alpha_errors[f"block:{n}"]
            assert c.shape == (22,) and c[start] == pytest.approx(best, rel=1e-5)
            a = layer.alphas[n]
            k = 21 if np.isnan(a) else int(round(a / 0.05))
            assert (np.isnan(grid[k]) if np.isnan(a) else grid[k] == a) and c[k] == c.min()
            if k != start:
                moved += 1
                assert c[k] < c[start]
            best = c.min()
        assert best <= curve.min()
        finite = [layer.alphas[n] for n in names if not np.isnan(layer.alphas[n])]
        assert layer.alpha == pytest.approx(float(np.mean(finite))) if finite else np.isnan(layer.alpha)
        for mp in auto.mappings:  # each mapping's scales are SmoothQuant's at its own alpha, or ones
            a = layer.alphas[mp.name]
            want = (np.ones_like(layer.scales[mp.name]) if np.isnan(a)
                    else smooth_scales(layer.channel_max(mp, auto.config), layer.weight_max[mp.name], a,
                                       CHANNEL_FLOOR))
            assert np.array_equal(layer.scales[mp.name], want), mp.name
    assert moved > 0  # on these outliers some mapping does better at an alpha of its own
    assert all(not lay.alpha_errors and set(lay.alphas.values()) == {0.5} for lay in fixed.layers.values())
    assert (auto.channel_floor, fixed.channel_floor) == (CHANNEL_FLOOR, 0.0)


def test_simulated_error_and_static_scales_from_scratch(tmp_path):
    """ffn_down's error at alpha 0.5 with static per-tensor activations, recomputed by hand, with
    the plain maximum and with the MSE clip (the candidate of least squared error)."""
    path = write_model(tmp_path / "m.gguf", "llama", n_layer=2)
    with open_model(path) as r:
        out = _with_outliers(r)
        m = Model(out)
        res = {k: smooth_model(m, tokens(), RunOptions(ctx=CTX), alpha=0.5, mappings="all", max_rows=10_000,
                               static_scales=k) for k in ("max", "mse")}
        x = _inputs(m, 0, tokens(), 6)  # every row: max_rows covers all 192
        w = m.layer_weights(0)
    s = res["max"].layers[0].scales["ffn_up->ffn_down"]
    xs = x["ffn_down"] / s
    ref = x["ffn_down"] @ w["ffn_down"].T
    for kind, amax in (("max", float(np.abs(xs).max())), ("mse", None)):
        if amax is None:
            errs = [float(((fake_quant_activations(xs, "tensor", float(np.float32(np.abs(xs).max()) * r)) - xs)
                           .astype(np.float64) ** 2).sum()) for r in CLIP_RATIOS]
            amax = float(np.float32(np.abs(xs).max()) * CLIP_RATIOS[int(np.argmin(errs))])
            assert amax < float(np.abs(xs).max())  # the outliers are clipped
        layer = res[kind].layers[0]
        assert layer.static_max["ffn_down"] == pytest.approx(amax, rel=1e-6)
        assert res[kind].static_max()["blk.0.ffn_down.weight"] == layer.static_max["ffn_down"]
        y = fake_quant_activations(xs, "tensor", amax) @ fake_quant_weight(w["ffn_down"] * s).T
        want = float(((y - ref).astype(np.float64) ** 2).sum() / (ref.astype(np.float64) ** 2).sum())
        assert layer.error_after["ffn_down"] == pytest.approx(want, rel=1e-4)


def test_hybrid_errors_are_per_token_for_ffn_down_and_static_for_the_rest(tmp_path):
    """activations="hybrid": ffn_down's simulated error quantizes its input per token, the other
    linears' with their static scales; every input still gets a static scale recorded."""
    path = write_model(tmp_path / "m.gguf", "llama", n_layer=2)
    with open_model(path) as r:
        out = _with_outliers(r)
        m = Model(out)
        res = smooth_model(m, tokens(), RunOptions(ctx=CTX), alpha=0.5, mappings="all", max_rows=10_000,
                           activations="hybrid")
        x = _inputs(m, 0, tokens(), 6)
        w = m.layer_weights(0)
    layer = res.layers[0]
    assert sorted(layer.static_max) == ["attn_output", "attn_q", "ffn_down", "ffn_gate"]
    for short, inp, mp, mode in (("ffn_down", "ffn_down", "ffn_up->ffn_down", "token"),
                                 ("attn_q", "attn_q", "attn_norm->qkv", "tensor")):
        s = layer.scales[mp]
        xs = x[inp] / s
        ref = x[inp] @ w[short].T
        y = fake_quant_activations(xs, mode, layer.static_max[inp]) @ fake_quant_weight(w[short] * s).T
        want = float(((y - ref).astype(np.float64) ** 2).sum() / (ref.astype(np.float64) ** 2).sum())
        assert layer.error_after[short] == pytest.approx(want, rel=1e-4), short


def test_rows_are_subsampled_to_max_rows(tmp_path):
    path = write_model(tmp_path / "m.gguf", "llama", n_layer=1)
    seen = []

    class Spy(SmoothObserver, name="test-smooth-spy"):
        def _errors(self, weights, act_max, sample, refs, scales):
            seen.append({k: v.shape[0] for k, v in sample.items()})
            return super()._errors(weights, act_max, sample, refs, scales)

    with open_model(path) as r:
        run_calibration(Model(r), tokens(), RunOptions(ctx=CTX), [Spy(alpha=0.5, max_rows=50)])
    assert seen and all(v == 50 for d in seen for v in d.values())


class Boom(Exception):
    pass


def test_resume_after_an_interruption_gives_identical_scales(tmp_path):
    path = write_model(tmp_path / "m.gguf", "gemma3", n_layer=4)
    ck = tmp_path / "ck"
    opts = dict(alpha="auto", mappings="all")
    with open_model(path) as r:
        m = Model(r)
        clean = run_calibration(m, tokens(), RunOptions(ctx=CTX), [SmoothObserver(**opts)]).observers[0].result()

        def fail_after_layer_1(ev: Progress) -> None:
            if ev.stage == "layer" and ev.done == 2:
                raise Boom

        with pytest.raises(Boom):
            run_calibration(m, tokens(), RunOptions(ctx=CTX, checkpoint_dir=ck), [SmoothObserver(**opts)],
                            fail_after_layer_1)
        logs: list[str] = []
        run = run_calibration(m, tokens(), RunOptions(ctx=CTX, checkpoint_dir=ck), [SmoothObserver(**opts)],
                              log=logs.append)
        resumed = run.observers[0].result()
        assert run.resumed_layers == 2 and any("resuming after layer 1" in s for s in logs)
        for il in range(4):
            a, b = clean.layers[il], resumed.layers[il]
            assert a.alpha == b.alpha and a.error_before == b.error_before and a.error_after == b.error_after
            assert a.alphas == b.alphas and a.static_max == b.static_max
            assert sorted(a.alpha_errors) == sorted(b.alpha_errors)
            for key in a.alpha_errors:
                assert np.array_equal(a.alpha_errors[key], b.alpha_errors[key])
            for key in a.scales:
                assert np.array_equal(a.scales[key], b.scales[key]), (il, key)
            for key in a.act_max:
                assert np.array_equal(a.act_max[key], b.act_max[key]), (il, key)
        for (n1, t1), (n2, t2) in zip(smoothed_tensors(r, clean), smoothed_tensors(r, resumed)):
            assert n1 == n2 and np.array_equal(t1, t2), n1


def test_smoothed_tensors_cover_the_model_in_order(tmp_path):
    path = write_model(tmp_path / "m.gguf", "qwen2", n_layer=2, dtype="Q8_0", n_embd=64, n_ff=96)
    with open_model(path) as r:
        res = smooth_model(Model(r), tokens(), RunOptions(ctx=CTX), alpha=0.8, mappings="all")
        out = dict(smoothed_tensors(r, res))
        view = SmoothedReader(r, res)
        assert list(out) == list(r.tensors)
        for name, arr in out.items():
            assert arr.dtype == np.float32 and arr.shape == r.tensors[name].shape
            assert np.array_equal(view.load_f32(name), arr)
            if not res.touched(name):
                assert np.array_equal(arr, r.load_f32(name)) and view.tensors[name] == r.tensors[name]
            else:
                assert view.tensors[name].dtype == "F32"
        assert res.touched("blk.0.attn_v.bias") and not np.array_equal(out["blk.0.attn_v.bias"],
                                                                       r.load_f32("blk.0.attn_v.bias"))


def test_real_model_perplexity_is_unchanged_by_smoothing(real_f32):
    """Gemma 3 270M F32, Exodus, all four mappings: the smoothed model's perplexity equals the plain
    one's within 0.01 % (float32 KV; within 0.05 % with the fp16 KV cache)."""
    from quantcli.engine.perplexity import PerplexityOptions, evaluate
    from quantcli.engine.tokenizer import Tokenizer

    text = (Path(__file__).resolve().parents[1] / "data" / "engine" / "exodus.txt").read_text()
    with open_model(real_f32) as r:
        toks = Tokenizer.from_model(r).encode(text, add_special=True, parse_special=False)
        res = smooth_model(Model(r), toks, RunOptions(ctx=512, chunks=2), alpha=0.8, mappings="all")
        exact = PerplexityOptions(ctx=512, chunks=2, kv_f16=False)
        plain = evaluate(r, text, exact)
        smoothed = evaluate(SmoothedReader(r, res), text, exact)
        assert smoothed.perplexity == pytest.approx(plain.perplexity, rel=1e-4)
        # the fp16 KV cache rounds the (rescaled) v: close, not float32-exact
        plain = evaluate(r, text, PerplexityOptions(ctx=512, chunks=2))
        smoothed = evaluate(SmoothedReader(r, res), text, PerplexityOptions(ctx=512, chunks=2))
        assert smoothed.perplexity == pytest.approx(plain.perplexity, rel=5e-4)


def test_static_scales_of_an_unsmoothed_model(tmp_path):
    """The static-scales observer: with "max" the absmax maxima of every block linear's input, with
    "mse" a clip at or below them (what report --simulate w8a8:tensor uses for a plain model)."""
    path = write_model(tmp_path / "m.gguf", "qwen2", n_layer=2)
    with open_model(path) as r:
        out = _with_outliers(r)
        got = run_calibration(Model(out), tokens(), RunOptions(ctx=CTX),
                              [make_observer("static-scales", static_scales=k) for k in ("max",)]
                              + [make_observer("absmax")])
        mse = run_calibration(Model(out), tokens(), RunOptions(ctx=CTX), [make_observer("static-scales")])
    maxima, absmax = got.observers[0].result(), got.observers[1].result().inputs
    assert sorted(maxima) == sorted(absmax) and len(maxima) == 14
    for name, v in absmax.items():
        assert maxima[name] == pytest.approx(float(v.max()), rel=1e-6)
    clipped = mse.observers[0].result()
    assert all(clipped[n] <= maxima[n] * (1 + 1e-6) for n in maxima)
    assert any(clipped[n] < 0.99 * maxima[n] for n in maxima)  # the planted outliers get clipped
