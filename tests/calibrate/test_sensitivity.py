"""The sensitivity observer: each split-off stream's KL divergence is the engine's KLD of the model
with that one tensor quantized (the file `quantize --tensor-type` writes), its error tables are the
codecs' errors, and an interrupted run resumes to the same measurement."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from quantcli.calibrate.runner import RunOptions, run_calibration
from quantcli.calibrate.sensitivity import SensitivityObserver, candidates_for, weighted_error
from quantcli.cli.app import app
from quantcli.engine.model import Model
from quantcli.engine.perplexity import PerplexityOptions, perplexity
from quantcli.formats import open_model
from tests.models import write_model

CTX, CHUNKS = 32, 2
CANDIDATES = ("Q4_0", "Q5_0", "Q8_0", "F16")


def _tokens(n=CTX * CHUNKS):
    t = np.random.default_rng(3).integers(4, 275, n)
    t[0] = 2
    return t


def _measure(path, **kw):
    with open_model(path) as r:
        obs = SensitivityObserver(candidates=CANDIDATES, references=("Q4_0",), **kw)
        run = run_calibration(Model(r, act_quant=False), _tokens(), RunOptions(ctx=CTX, chunks=CHUNKS), [obs])
        return run, obs.result()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("sens") / "m.gguf", "llama", n_layer=3)


@pytest.fixture(scope="module")
def measured(model):
    return _measure(model)[1]


@pytest.mark.parametrize("tensor", ["blk.0.attn_v.weight", "blk.1.ffn_down.weight", "blk.2.attn_q.weight",
                                    "token_embd.weight"])
def test_stream_kld_is_the_engines_kld_of_that_tensor_quantized(model, measured, tensor, tmp_path):
    out, profile = tmp_path / "one.gguf", tmp_path / "one.yaml"
    profile.write_text(f"base: F32\nrules:\n  - name: {tensor}\n    type: Q4_0\n")
    res = CliRunner().invoke(app, ["quantize", str(model), str(out), "--profile", str(profile), "-q"])
    assert res.exit_code == 0, res.output
    with open_model(model) as a, open_model(out) as b:
        assert b.tensors[tensor].dtype == "Q4_0"
        opts = PerplexityOptions(ctx=CTX, chunks=CHUNKS, act_quant=False)
        want = perplexity(Model(b, act_quant=False), _tokens(), opts, base=Model(a, act_quant=False)).kld_mean
    got = measured[tensor].kld["Q4_0"]
    assert want > 0
    assert got == pytest.approx(want, rel=1e-3)


def test_error_tables_are_the_codecs_errors(model, measured):
    with open_model(model) as r:
        w = r.load_f32("blk.1.ffn_up.weight")
    t = measured["blk.1.ffn_up.weight"]
    assert set(t.errors) == set(candidates_for(t.name, t.shape, CANDIDATES, False))
    for q in CANDIDATES:
        assert t.errors[q] == pytest.approx(weighted_error(w, q, None, None), rel=1e-12)
    assert t.errors["Q4_0"] > t.errors["Q5_0"] > t.errors["Q8_0"] > t.errors["F16"] > 0
    assert t.act_errors["Q8_0"] > t.act_errors["F16"] > 0  # Q4_0/Q5_0/Q8_0 round inputs to Q8_0


def test_every_linear_and_the_embedding_is_measured(measured):
    names = {f"blk.{il}.{s}.weight" for il in range(3)
             for s in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(measured) == names | {"token_embd.weight"}
    assert all(t.kld["Q4_0"] > 0 for t in measured.values())


def test_an_interrupted_measurement_resumes_to_the_same_result(model, measured, tmp_path):
    ck = tmp_path / "ck"

    class Stop(Exception):
        pass

    def stop_after_two(ev):
        if ev.stage == "layer" and ev.done == 2:
            raise Stop

    with open_model(model) as r:
        opts = RunOptions(ctx=CTX, chunks=CHUNKS, checkpoint_dir=ck)
        with pytest.raises(Stop):
            run_calibration(Model(r, act_quant=False), _tokens(), opts,
                            [SensitivityObserver(candidates=CANDIDATES, references=("Q4_0",))], stop_after_two)
        obs = SensitivityObserver(candidates=CANDIDATES, references=("Q4_0",))
        run = run_calibration(Model(r, act_quant=False), _tokens(), opts, [obs])
    assert run.resumed_layers == 2
    got = obs.result()
    assert set(got) == set(measured)
    for name, t in measured.items():
        assert got[name].errors == t.errors and got[name].act_errors == t.act_errors, name
        assert got[name].kld == t.kld, name
    assert not ck.exists()


@pytest.mark.parametrize("tensor", ["output.weight", "token_embd.weight", "blk.1.attn_output.weight"])
def test_untied_output_and_embedding_are_measured_on_their_own(tmp_path, tensor):
    model = write_model(tmp_path / "u.gguf", "llama", n_layer=2, tied=False)
    _, measured = _measure(model)
    out, profile = tmp_path / "one.gguf", tmp_path / "one.yaml"
    profile.write_text(f"base: F32\nrules:\n  - name: {tensor}\n    type: Q4_0\n")
    res = CliRunner().invoke(app, ["quantize", str(model), str(out), "--profile", str(profile), "-q"])
    assert res.exit_code == 0, res.output
    with open_model(model) as a, open_model(out) as b:
        opts = PerplexityOptions(ctx=CTX, chunks=CHUNKS, act_quant=False)
        want = perplexity(Model(b, act_quant=False), _tokens(), opts, base=Model(a, act_quant=False)).kld_mean
    assert measured[tensor].kld["Q4_0"] == pytest.approx(want, rel=1e-3)


def test_the_activation_stream_is_the_engines_kld_of_rounded_inputs(model):
    run, _ = _measure(model)
    obs = run.observers[0]
    assert set(obs.act_kld_) == {"Q8_0"}  # the candidates' only integer activation type
    with open_model(model) as r:
        rounded = Model(r, act_quant=True)
        rounded.act_types = {n: "Q8_0" for n, i in r.tensors.items() if len(i.shape) == 2}
        opts = PerplexityOptions(ctx=CTX, chunks=CHUNKS, act_quant=False)
        want = perplexity(rounded, _tokens(), opts, base=Model(r, act_quant=False)).kld_mean
    assert want > 0 and obs.act_kld_["Q8_0"] == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("act", ["Q8_K", "Q8_0"])
def test_a_tensor_with_a_choice_of_roundings_has_each_measured_alone(tmp_path, act):
    model = write_model(tmp_path / "k.gguf", "llama", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512)
    with open_model(model) as r:
        obs = SensitivityObserver(candidates=("Q4_K", "Q4_0", "Q8_0"), references=("Q4_0",))
        run_calibration(Model(r, act_quant=False), _tokens(), RunOptions(ctx=CTX, chunks=CHUNKS), [obs])
        got = obs.result()["blk.1.ffn_up.weight"].act_kld
        assert set(got) == {"Q8_K", "Q8_0"}
        rounded = Model(r, act_quant=True)
        rounded.act_types = {n: "F32" for n, i in r.tensors.items() if len(i.shape) == 2}
        rounded.act_types["blk.1.ffn_up.weight"] = act
        opts = PerplexityOptions(ctx=CTX, chunks=CHUNKS, act_quant=False)
        want = perplexity(rounded, _tokens(), opts, base=Model(r, act_quant=False)).kld_mean
    assert want > 0 and got[act] == pytest.approx(want, rel=1e-3)
    assert not obs.result()["token_embd.weight"].act_kld  # the head is in the all-rounded stream
