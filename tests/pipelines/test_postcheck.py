"""The coherence check after an ultra-low-bit `quantize`: when it runs, what it says, --strict,
--no-check, and the hybrid it suggests (its command is exact; on the real model it passes)."""

from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.pipelines import postcheck
from quantcli.pipelines import quantize as pipeline
from tests.conftest import DATA
from tests.models import write_model

runner = CliRunner()


def _planned(name: str, type_name: str, shape=(640, 2048)):
    return SimpleNamespace(info=SimpleNamespace(name=name, shape=shape), type=type_name)


def test_which_quantizations_are_checked():
    assert postcheck.wanted("IQ1_S", 6.7) and postcheck.wanted("q2_k", 3.4) and postcheck.wanted("TQ1_0", 2.0)
    assert postcheck.wanted(None, 2.9) and postcheck.wanted("Q4_K_M", 2.99)  # a profile or mix under 3 bpw
    assert not postcheck.wanted("Q4_K_M", 4.9) and not postcheck.wanted(None, 3.0)


def test_raises_name_only_the_tensors_below_the_level():
    plan = [_planned("blk.0.ffn_down.weight", "IQ1_S"), _planned("blk.1.ffn_down.weight", "IQ2_XXS"),
            _planned("blk.0.attn_v.weight", "Q6_K"), _planned("blk.1.attn_v.weight", "Q2_K"),
            _planned("blk.0.ffn_gate.weight", "IQ4_NL"), _planned("blk.0.attn_norm.weight", "F32", (640,)),
            _planned("token_embd.weight", "Q2_K")]
    assert postcheck._raises(plan, "Q4_K", postcheck.ROLES) == (
        (r"ffn_down\.weight", "Q4_K"), (r"blk\.(1)\.attn_v\.weight", "Q4_K"))  # layer 0's Q6_K is not lowered
    # every role: IQ4_NL holds as many bits as Q4_K; norms and the embedding are never named
    assert postcheck._raises(plan, "Q5_K", None) == (
        (r"ffn_down\.weight", "Q5_K"), (r"blk\.(1)\.attn_v\.weight", "Q5_K"), (r"ffn_gate\.weight", "Q5_K"))


def test_the_suggested_command_makes_the_planned_file(tmp_path, monkeypatch):
    base = write_model(tmp_path / "base.gguf", "llama", n_layer=2, n_embd=256, n_ff=512, seed=3)
    opts = pipeline.QuantizeOptions(input=base, output=tmp_path / "a.gguf", preset="Q2_K",
                                    tensor_types=((r"ffn_down\.weight", "Q4_K"),), token_embedding_type="Q5_0",
                                    pure=False, override_kv=("general.name=str:x y",))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    pipeline.run(opts)
    line = postcheck.command_of(pipeline.QuantizeOptions(**{**opts.__dict__, "output": tmp_path / "b.gguf"}))
    args = shlex.split(line)
    assert args[:2] == ["quantcli", "quantize"] and "--tensor-type" in args and "general.name=str:x y" in args
    res = runner.invoke(app, args[1:] + ["--no-check", "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def _tiny(tmp_path):
    return write_model(tmp_path / "base.gguf", "llama", n_layer=2, seed=11, scale=0.4)


def test_quantize_checks_ultra_low_presets_and_no_check_skips(tmp_path):
    base = _tiny(tmp_path)
    res = runner.invoke(app, ["quantize", str(base), str(tmp_path / "q.gguf"), "--type", "Q2_K", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)["coherence"]
    assert doc["prompts"] == 46 and 0 <= doc["coherent"] <= 1 and doc["passed"] == (doc["coherent"] >= 0.9)
    res = runner.invoke(app, ["quantize", str(base), str(tmp_path / "q.gguf"), "--type", "Q2_K", "--json",
                              "--no-check", "-f"])
    assert res.exit_code == 0 and json.loads(res.output)["coherence"] is None
    res = runner.invoke(app, ["quantize", str(base), str(tmp_path / "q8.gguf"), "--type", "Q8_0", "--json"])
    assert json.loads(res.output)["coherence"] is None  # not ultra-low
    res = runner.invoke(app, ["quantize", str(base), str(tmp_path / "x.gguf"), "--type", "Q2_K", "--strict",
                              "--no-check"])
    assert res.exit_code == 2 and "give one of them" in res.output


def test_below_the_bar_it_warns_and_strict_exits_6_keeping_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(postcheck, "PASS", 1.01)  # nothing passes: the search tries and says so
    base = _tiny(tmp_path)
    out = tmp_path / "q.gguf"
    res = runner.invoke(app, ["quantize", str(base), str(out), "--type", "Q2_K"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "below 101%: this model may not produce sensible text" in text and "--calib TEXT" in text
    res = runner.invoke(app, ["quantize", str(base), str(out), "--type", "Q2_K", "--strict", "-f", "--json"])
    assert res.exit_code == 6, res.output
    assert "(--strict; the file is kept)" in res.output and out.exists()
    assert not list(tmp_path.glob(".quantcli-hybrid-*"))  # the scratch folder is gone


def test_iq1s_on_the_real_model_warns_and_its_suggestion_passes(real_f32, tmp_path):
    """SC-002: the plain IQ1_S preset is not coherent; the suggested hybrid is no larger and is."""
    imatrix = DATA / "reference" / "gemma3-270m" / "imatrix-genesis.gguf"
    out = tmp_path / "iq1s.gguf"
    res = runner.invoke(app, ["quantize", str(real_f32), str(out), "--type", "IQ1_S", "--imatrix", str(imatrix),
                              "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    check = doc["coherence"]
    assert check["coherent"] < 0.5 and not check["passed"]
    s = check["suggestion"]
    assert s is not None and s["coherent"] >= 0.9, check
    assert s["file_bytes"] <= out.stat().st_size * postcheck.SLACK
    args = shlex.split(s["command"])
    assert args[:4] == ["quantcli", "quantize", str(real_f32), str(tmp_path / "iq1s-hybrid.gguf")]
    res = runner.invoke(app, args[1:] + ["--json", "--strict"])  # its own check runs: IQ1_S preset
    assert res.exit_code == 0, res.output
    hybrid = json.loads(res.output)
    assert hybrid["coherence"]["passed"] and hybrid["file_bytes"] == s["file_bytes"]


def test_a_check_that_does_not_fit_in_memory_is_skipped_and_said(tmp_path, monkeypatch):
    monkeypatch.setattr(postcheck, "memory_available", lambda: 2**20)
    base = _tiny(tmp_path)
    res = runner.invoke(app, ["quantize", str(base), str(tmp_path / "q.gguf"), "--type", "Q2_K", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)["coherence"]
    assert not doc["passed"] and "GiB is available: skipped" in doc["skipped"]
    res = runner.invoke(app, ["quantize", str(base), str(tmp_path / "q.gguf"), "--type", "Q2_K", "--strict", "-f"])
    assert res.exit_code == 6 and "could not run" in " ".join(res.output.split())
