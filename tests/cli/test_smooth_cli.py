"""`quantcli smooth` through the CLI a user runs: the GGUF it writes computes what the source does,
records its recipe and calibration maxima, keeps problem layers when asked, resumes from its
checkpoints, and refuses bad input with one line and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.digests import file_sha256
from quantcli.engine.model import Model, forward
from quantcli.formats import open_model
from tests.models import write_model

runner = CliRunner()
TEXT = "In the beginning God created the heaven and the earth. And the earth was without form. " * 40
CTX = ["--ctx", "64", "--chunks", "4"]


@pytest.fixture
def setup(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    return tmp_path, text


def smooth(*args: str) -> object:
    return runner.invoke(app, ["smooth", *args])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_f32_output_computes_the_same_logits_and_records_its_recipe(setup, arch):
    tmp, text = setup
    src = write_model(tmp / "m.gguf", arch, n_layer=2)
    out = tmp / "s.gguf"
    res = smooth(str(src), "-o", str(out), "--calib", str(text), *CTX, "--alpha", "0.5", "--mappings", "all",
                 "--type", "F32", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["schema"] == "quantcli.smooth/1" and summary["alphas"] == [0.5, 0.5]
    chunks = np.random.default_rng(1).integers(4, 275, (2, 32))
    chunks[:, 0] = 2
    with open_model(src) as a, open_model(out) as b:
        z0 = forward(Model(a, kv_f16=False, act_quant=False), chunks)
        z1 = forward(Model(b, kv_f16=False, act_quant=False), chunks)
        tol = (1e-4 if arch == "gemma3" else 3e-6) * np.abs(z0).max()  # gemma's GELU: an fp16 table
        assert np.abs(z1 - z0).max() < tol
        assert not np.array_equal(a.load_f32("blk.0.attn_norm.weight"), b.load_f32("blk.0.attn_norm.weight"))
        np.testing.assert_array_equal(a.load_f32("token_embd.weight"), b.load_f32("token_embd.weight"))
        kv = b.kv
        assert kv["quantcli.smooth.alpha"].value == "0.5"
        assert list(kv["quantcli.smooth.alphas"].value) == [0.5, 0.5]
        assert [str(s) for s in kv["quantcli.smooth.mappings"].value] == [
            "attn_norm->qkv", "ffn_norm->gate_up", "attn_v->attn_output", "ffn_up->ffn_down"]
        assert kv["quantcli.smooth.calibration.sha256"].value == file_sha256(text)
        assert kv["quantcli.smooth.calibration.chunks"].value == 4
        names = [str(s) for s in kv["quantcli.smooth.input_max.names"].value]
        assert len(names) == 14 and "blk.1.ffn_down.weight" in names
        assert kv["quantcli.source.sha256"].value == file_sha256(src)


def test_q8_0_output_scales_json_and_recorded_static_scales(setup):
    tmp, text = setup
    src = write_model(tmp / "m.gguf", "qwen3", n_layer=2)
    out, scales = tmp / "s.gguf", tmp / "scales.json"
    res = smooth(str(src), "-o", str(out), "--calib", str(text), *CTX, "--alpha", "auto",
                 "--activations", "static", "--scales-out", str(scales))
    assert res.exit_code == 0, res.output
    with open_model(out) as r:
        assert r.tensors["blk.0.attn_q.weight"].dtype == "Q8_0"
        assert r.kv["quantcli.smooth.activations"].value == "static"
    doc = json.loads(scales.read_text())
    assert doc["schema"] == "quantcli.smooth-scales/1" and doc["alpha"] == "auto"
    assert doc["channel_floor"] == 0.0  # static: SmoothQuant's formula (the floor is per token's)
    assert doc["static_scales"] == "mse"  # static's default: MSE-clipped maxima
    assert doc["calibration"]["sha256"] == file_sha256(text)
    for layer in doc["layers"]:
        # static activations: the whole block's simulated error, for one alpha per layer, then
        # for each mapping's own (the grid's 21 alphas, then "left as it is", null); the layer's
        # alpha is the mean of those that smooth
        curves = layer["alpha_grid_errors"]
        assert list(curves) == ["block"] + [f"block:{m}" for m in doc["mappings"]]
        assert all(len(c) == 22 for c in curves.values())
        alphas = [m["alpha"] for m in layer["mappings"].values() if m["alpha"] is not None]
        assert all(0.0 <= a <= 1.0 for a in alphas)
        assert layer["alpha"] == (pytest.approx(np.mean(alphas), abs=1e-6) if alphas else None)
        assert set(layer["static_max"]) == {f"blk.{layer['layer']}.{k}.weight"
                                            for k in ("attn_q", "attn_output", "ffn_gate", "ffn_down")}
        m = layer["mappings"]["attn_norm->qkv"]
        assert len(m["scales"]) == 64 and m["consumers"][0].endswith("attn_q.weight")
        np.testing.assert_allclose(np.array(m["act_max_after"]),
                                   np.array(m["act_max_before"]) / np.array(m["scales"]), rtol=1e-5)
        np.testing.assert_allclose(np.array(m["weight_max_after"]),
                                   np.array(m["weight_max_before"]) * np.array(m["scales"]), rtol=1e-5)
        assert m["outlier_ratio"]["after"] <= m["outlier_ratio"]["before"] + 1e-6
    with open_model(out) as r:  # the static scales recorded are the clipped ones of the JSON
        assert r.kv["quantcli.smooth.static_scales"].value == "mse"
        names = [str(n) for n in r.kv["quantcli.smooth.static_max.names"].value]
        values = dict(zip(names, r.kv["quantcli.smooth.static_max.values"].value))
        # the JSON keeps 6 significant digits: equal to within half a unit of the 6th
        assert values["blk.1.attn_k.weight"] == pytest.approx(doc["layers"][1]["static_max"]["blk.1.attn_q.weight"],
                                                              rel=5e-6)
    ev = runner.invoke(app, ["report", str(out), "--json", "--eval-text", str(text), "--ctx", "64",
                             "--chunks", "2", "--simulate", "w8a8:tensor"])
    assert ev.exit_code == 0, ev.output
    got = json.loads(ev.stdout)["evaluation"]
    assert got["static_scales_from"] == "recorded"
    # the recorded scales' clipping on this text is tallied for every simulated linear
    assert got["static_clipping"]["linears"] == 2 * 7 and 0 <= got["static_clipping"]["clipped_share"] < 1


def test_auto_for_a_quantized_gguf_searches_llama_cpp_kernels(setup):
    """A Q8_0 GGUF with dynamic activations: one alpha per layer from the whole block's error as
    llama.cpp's kernels compute it, at each alpha of the grid and, last, with the layer left as
    it is (null)."""
    tmp, text = setup
    src = write_model(tmp / "m.gguf", "qwen3", n_layer=2)
    scales = tmp / "scales.json"
    res = smooth(str(src), "-o", str(tmp / "s.gguf"), "--calib", str(text), *CTX, "--alpha", "auto",
                 "--mappings", "all", "--scales-out", str(scales))
    assert res.exit_code == 0, res.output
    assert json.loads(scales.read_text())["channel_floor"] == 0.0  # SmoothQuant's formula for these kernels
    for layer in json.loads(scales.read_text())["layers"]:
        curve = layer["alpha_grid_errors"]["block"]
        assert list(layer["alpha_grid_errors"]) == ["block"] and len(curve) == 22
        best = int(np.argmin(curve))
        assert layer["alpha"] == (None if best == 21 else pytest.approx(0.05 * best))
        assert {m["alpha"] for m in layer["mappings"].values()} == {layer["alpha"]}


def test_auto_for_a_quantized_gguf_can_leave_a_layer_as_it_is(setup, monkeypatch):
    """Where no alpha lowers the block's error under llama.cpp's kernels, the layer is left as it
    is: alpha null, and its tensors quantize to plain Q8_0's bytes. A float GGUF keeps the W8A8
    objective (per token: the block's curve, then each mapping's)."""
    from quantcli.calibrate.smooth import SmoothObserver

    tmp, text = setup
    src = write_model(tmp / "m.gguf", "llama", n_layer=2)
    monkeypatch.setattr(SmoothObserver, "_ggml_block_error",
                        lambda self, il, w, inputs, refs, s: float(any((v != 1).any() for v in s.values())))
    out, plain = tmp / "s.gguf", tmp / "plain.gguf"
    res = smooth(str(src), "-o", str(out), "--calib", str(text), *CTX, "--alpha", "auto", "--mappings", "all",
                 "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["alphas"] == [None, None] and all(r["alpha"] is None for r in summary["layers"])
    assert runner.invoke(app, ["quantize", str(src), str(plain), "--type", "Q8_0", "-q"]).exit_code == 0
    with open_model(out) as a, open_model(plain) as b:
        for name in a.tensors:
            assert a.raw(name).tobytes() == b.raw(name).tobytes(), name
    shown = smooth(str(src), "-o", str(tmp / "t.gguf"), "--calib", str(text), *CTX, "--alpha", "auto")
    assert shown.exit_code == 0 and "as is" in shown.output
    doc_path = tmp / "f32.json"
    res = smooth(str(src), "-o", str(tmp / "f.gguf"), "--calib", str(text), *CTX, "--alpha", "auto", "--type", "F32",
                 "--scales-out", str(doc_path))
    assert res.exit_code == 0, res.output
    for layer in json.loads(doc_path.read_text())["layers"]:
        assert list(layer["alpha_grid_errors"]) == ["block", "block:attn_norm->qkv", "block:ffn_norm->gate_up"]
        assert all(len(v) == 22 for v in layer["alpha_grid_errors"].values())


def test_problem_layers_are_named_and_kept_at_the_asked_type(setup):
    tmp, text = setup
    src = write_model(tmp / "m.gguf", "llama", n_layer=2)
    out = tmp / "s.gguf"
    res = smooth(str(src), "-o", str(out), "--calib", str(text), *CTX, "--problem-error", "1e-12",
                 "--keep-problem-layers", "F16", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert [p["layer"] for p in summary["problems"]] == [0, 1]
    assert "--keep-problem-layers F16" in summary["problems"][0]["remedy"]
    assert "blk.0.attn_q.weight" in summary["kept"] and "blk.1.ffn_up.weight" in summary["kept"]
    with open_model(out) as r:
        for name in summary["kept"]:
            assert r.tensors[name].dtype == "F16"
        assert r.tensors["blk.0.ffn_down.weight"].dtype == "Q8_0"  # not smoothed with --mappings norm
        assert len(r.kv["quantcli.smooth.kept"].value) == len(summary["kept"])
    # report --simulate runs the kept linears in float, as an int8 engine runs the ones it ignores
    from quantcli.pipelines.report import simulation

    with open_model(out) as r:
        for spec in ("w8a8:token", "w8a8:tensor"):
            sim, _ = simulation(r, spec, TEXT, 64, 2)
            assert sim.keep == frozenset(summary["kept"]) and not sim.int8("blk.0.attn_q.weight")
            assert sim.int8("blk.0.ffn_down.weight")
    # without --keep-problem-layers they are only reported, on the terminal too
    res = smooth(str(src), "-o", str(tmp / "t.gguf"), "--calib", str(text), *CTX, "--problem-error", "1e-12")
    assert res.exit_code == 0 and "problem layer 0" in res.output and "--alpha auto" in res.output


def test_a_rerun_resumes_from_kept_checkpoints_and_writes_the_same_bytes(setup):
    tmp, text = setup
    src = write_model(tmp / "m.gguf", "gemma3", n_layer=3)
    out = tmp / "s.gguf"
    args = [str(src), "-o", str(out), "--calib", str(text), *CTX, "--alpha", "auto", "--keep-checkpoints", "--json"]
    first = smooth(*args)
    assert first.exit_code == 0, first.output
    data = out.read_bytes()
    again = smooth(*args, "--force")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["resumed_layers"] == 3
    assert out.read_bytes() == data
    assert (tmp / "s.gguf.checkpoints").is_dir()
    smooth(*args[:-2], "--force")  # without --keep-checkpoints they are removed at the end
    assert not (tmp / "s.gguf.checkpoints").exists()


@pytest.mark.parametrize("case, code, words", [
    ("alpha", 2, "alpha '1.5' is outside [0, 1]"),
    ("empty", 3, "calib.txt: the calibration text is empty"),
    ("short", 3, "calib.txt: the calibration text gives"),
    ("missing", 3, "nothing.txt: no such text file"),
    ("arch", 3, "SmoothQuant knows no norm -> linear mappings"),
    ("exists", 4, "already exists"),
    ("format", 2, "unknown --format"),
    ("floor", 2, "--channel-floor is a quantile in [0, 1], got 1.5"),
])
def test_bad_input_is_one_line_and_writes_nothing(setup, case, code, words):
    tmp, text = setup
    src = write_model(tmp / "m.gguf", "llama", n_layer=1)
    out = tmp / "s.gguf"
    args = [str(src), "-o", str(out), "--calib", str(text), *CTX]
    if case == "alpha":
        args += ["--alpha", "1.5"]
    elif case == "empty":
        text.write_text(" \n")
    elif case == "short":
        text.write_text("In the beginning")
    elif case == "missing":
        args[4] = str(tmp / "nothing.txt")
    elif case == "arch":
        src = _rename_arch(src, tmp / "other.gguf", "starcoder2")
        args[0] = str(src)
    elif case == "exists":
        out.write_bytes(b"keep")
    elif case == "format":
        args += ["--format", "onnx"]
    elif case == "floor":
        args += ["--channel-floor", "1.5"]
    before = sorted(p.name for p in tmp.iterdir())
    res = smooth(*args)
    assert res.exit_code == code, res.output
    assert words in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in tmp.iterdir()) == before  # nothing written, checkpoints included
    if case == "exists":
        assert out.read_bytes() == b"keep"


def _rename_arch(src: Path, dest: Path, arch: str) -> Path:
    """A copy of a llama GGUF that says it is another architecture (its keys renamed too)."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dest, arch)
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        name = field.name.replace("llama.", f"{arch}.", 1)
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(name, field.contents(), vtype)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest


def test_plot_is_written_or_refused_before_the_run(setup):
    tmp, text = setup
    src = write_model(tmp / "m.gguf", "llama", n_layer=2)
    png = tmp / "maxima.png"
    res = smooth(str(src), "-o", str(tmp / "s.gguf"), "--calib", str(text), *CTX, "--plot", str(png))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert res.exit_code == 2 and "--plot needs matplotlib" in res.output
        assert not (tmp / "s.gguf").exists()
        return
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_terminal_shows_each_mappings_alpha_and_those_left_as_they_are():
    """The table's alpha column: one number, "as is" for a layer left whole, and a/b/c/d in table
    order where the mappings differ, "-" for one the search left as it is (alpha null)."""
    from quantcli.cli.smooth import _alpha

    names = ["attn_norm->qkv", "ffn_norm->gate_up", "attn_v->attn_output", "ffn_up->ffn_down"]
    assert _alpha({"alpha": 0.85, "alphas": dict.fromkeys(names, 0.85)}) == "0.85"
    assert _alpha({"alpha": None, "alphas": dict.fromkeys(names)}) == "as is"
    mixed = dict(zip(names, [0.85, 0.6, None, 0.3]))
    assert _alpha({"alpha": 0.5833, "alphas": mixed}) == "0.85/0.60/-/0.30"


def test_compressed_tensors_keeps_whole_fused_groups_out_of_int8(setup):
    """vLLM runs a layer's q/k/v (and gate/up) as one matmul with one scheme and refuses a
    directory that quantizes some of them: where only some are problem linears,
    `--keep-problem-layers` keeps the whole group in float, listed in `ignore`."""
    from safetensors.numpy import load_file

    tmp, text = setup
    src = write_model(tmp / "m.gguf", "llama", n_layer=2)
    common = [str(src), "--calib", str(text), *CTX, "--format", "compressed-tensors", "--json"]
    probe = smooth(*common, "-o", str(tmp / "probe"))
    assert probe.exit_code == 0, probe.output
    errs = {n: e["after"] for row in json.loads(probe.stdout)["layers"] for n, e in row["error"].items()}
    qkv = [f"blk.0.{k}.weight" for k in ("attn_q", "attn_k", "attn_v")]
    lo, hi = min(errs[n] for n in qkv), max(errs[n] for n in qkv)
    assert lo < hi
    threshold = (lo + hi) / 2  # some of layer 0's q/k/v above it, some below
    res = smooth(*common, "-o", str(tmp / "kept"), "--problem-error", f"{threshold:.9g}",
                 "--keep-problem-layers", "F16")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    named = {n for p in summary["problems"] for n in p["linears"]}
    assert named & set(qkv) and set(qkv) - named  # the problems split the group ...
    kept = set(summary["kept"])
    assert set(qkv) <= kept and named <= kept  # ... what is kept does not
    groups = [("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up")]
    for n in kept:  # every kept linear's group is kept whole
        layer, kind = int(n.split(".")[1]), n.split(".")[2]
        group = next((g for g in groups if kind in g), (kind,))
        assert {f"blk.{layer}.{k}.weight" for k in group} <= kept
    config = json.loads((tmp / "kept" / "config.json").read_text())
    ignore = set(config["quantization_config"]["ignore"])
    tensors = load_file(tmp / "kept" / "model.safetensors")
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{proj}"
        assert name in ignore
        assert tensors[f"{name}.weight"].dtype == np.float32 and f"{name}.weight_scale" not in tensors


def test_hybrid_activations_are_static_but_ffn_downs_per_token(setup):
    """--activations hybrid: the search simulates static scales on every linear but ffn_down,
    whose input is quantized per token; the directory has a static config group for q/k/v/o and
    gate/up (with input_scale) and a dynamic one for down_proj (without); a GGUF records its
    static scales, and `report --simulate w8a8:hybrid` uses them on all but ffn_down. The
    channel floor asked for is what the scales were made with, and the static scales are the
    calibration maxima (hybrid's default: its long-tailed input, ffn_down's, is per token)."""
    from safetensors.numpy import load_file

    from quantcli.calibrate.smooth import smooth_scales

    tmp, text = setup
    src = write_model(tmp / "m.gguf", "llama", n_layer=2)
    scales = tmp / "scales.json"
    common = [str(src), "--calib", str(text), *CTX, "--alpha", "auto", "--mappings", "all",
              "--activations", "hybrid", "--channel-floor", "0.75", "--json"]
    res = smooth(*common, "-o", str(tmp / "ct"), "--format", "compressed-tensors", "--scales-out", str(scales))
    assert res.exit_code == 0, res.output
    groups = json.loads((tmp / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    static = ["re:.*[.](gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj)$"]
    assert [(g["targets"], g["input_activations"]["strategy"], g["input_activations"]["dynamic"])
            for g in groups.values()] == [(static, "tensor", False), (["re:.*[.](down_proj)$"], "token", True)]
    tensors = load_file(tmp / "ct" / "model.safetensors")
    for il in range(2):
        assert tensors[f"model.layers.{il}.mlp.down_proj.weight"].dtype == np.int8
        assert f"model.layers.{il}.mlp.down_proj.input_scale" not in tensors
        for proj in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj"):
            assert tensors[f"model.layers.{il}.{proj}.input_scale"].shape == (1,)
    doc = json.loads(scales.read_text())
    assert doc["activations"] == "hybrid" and doc["channel_floor"] == 0.75 and doc["static_scales"] == "max"
    for layer in doc["layers"]:
        for m in layer["mappings"].values():
            if m["alpha"] is None:
                continue
            want = smooth_scales(np.array(m["act_max_before"]), np.array(m["weight_max_before"]), m["alpha"], 0.75)
            np.testing.assert_allclose(np.array(m["scales"]), want, rtol=5e-5)
    out = tmp / "s.gguf"
    res = smooth(*common, "-o", str(out), "--type", "F32")
    assert res.exit_code == 0, res.output
    with open_model(out) as r:
        assert r.kv["quantcli.smooth.activations"].value == "hybrid"
        assert float(r.kv["quantcli.smooth.channel_floor"].value) == 0.75
        assert r.kv["quantcli.smooth.static_scales"].value == "max"
        kv = {k: [str(n) for n in r.kv[f"quantcli.smooth.{k}.names"].value] for k in ("input_max", "static_max")}
        static = dict(zip(kv["static_max"], r.kv["quantcli.smooth.static_max.values"].value))
        maxima = dict(zip(kv["input_max"], r.kv["quantcli.smooth.input_max.values"].value))
        assert static and all(static[n] == pytest.approx(maxima[n], rel=1e-6) for n in static)
    ev = runner.invoke(app, ["report", str(out), "--json", "--eval-text", str(text), "--ctx", "64",
                             "--chunks", "2", "--simulate", "w8a8:hybrid"])
    assert ev.exit_code == 0, ev.output
    got = json.loads(ev.stdout)["evaluation"]
    assert got["static_scales_from"] == "recorded" and got["static_clipping"]["linears"] == 2 * 6


def test_the_per_token_search_floors_quiet_channels_unless_told(setup):
    """Per token, `--alpha auto` floors each channel's maximum at the 0.75 quantile of its input's
    (recorded in the metadata and the scales JSON, and the scales are SmoothQuant's on the floored
    maxima); `--channel-floor 0` is SmoothQuant's formula as it is, with other scales."""
    from quantcli.calibrate.smooth import smooth_scales

    tmp, text = setup
    src = write_model(tmp / "m.gguf", "qwen2", n_layer=2)
    docs = {}
    for floor in (None, "0"):
        out, scales = tmp / f"s{floor}.gguf", tmp / f"s{floor}.json"
        extra = [] if floor is None else ["--channel-floor", floor]
        res = smooth(str(src), "-o", str(out), "--calib", str(text), *CTX, "--alpha", "auto", "--type", "F32",
                     "--scales-out", str(scales), *extra)
        assert res.exit_code == 0, res.output
        with open_model(out) as r:
            assert float(r.kv["quantcli.smooth.channel_floor"].value) == (0.75 if floor is None else 0.0)
        docs[floor] = json.loads(scales.read_text())
    for floor, doc in docs.items():
        q = doc["channel_floor"]
        assert q == (0.75 if floor is None else 0.0)
        for layer in doc["layers"]:
            for m in layer["mappings"].values():
                if m["alpha"] is not None:
                    want = smooth_scales(np.array(m["act_max_before"]), np.array(m["weight_max_before"]),
                                         m["alpha"], q)
                    np.testing.assert_allclose(np.array(m["scales"]), want, rtol=5e-5)
    assert docs[None]["layers"][0]["mappings"]["attn_norm->qkv"]["scales"] != \
        docs["0"]["layers"][0]["mappings"]["attn_norm->qkv"]["scales"]
