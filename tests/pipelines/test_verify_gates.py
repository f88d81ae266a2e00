"""`verify --base`: quality gates with figures, the base evaluated once and cached, gate files,
JUnit output, and the errors; on the real model, Q4_K_M and Q8_0 pass the default gates and IQ1_S
fails them."""

from __future__ import annotations

import json
from xml.etree import ElementTree as ET

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.engine.perplexity import PerplexityOptions, evaluate
from quantcli.pipelines import verify as pipeline
from tests.conftest import DATA
from tests.models import write_model

runner = CliRunner()
TEXT = DATA / "engine" / "genesis.txt"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gates")
    base = write_model(tmp / "base.gguf", "llama", n_layer=2, n_embd=256, n_ff=512, seed=3)
    for preset in ("Q8_0", "Q2_K"):
        res = runner.invoke(app, ["quantize", str(base), str(tmp / f"{preset}.gguf"), "--type", preset, "-q",
                                  "--no-check"])
        assert res.exit_code == 0, res.output
    return tmp, base


def _verify(tmp, name, *args):
    return runner.invoke(app, ["verify", str(tmp / name), "--base", str(tmp / "base.gguf"), "--eval-text", str(TEXT),
                               "--ctx", "64", "--chunks", "8", "--base-cache", str(tmp / "cache"), *args])


def test_gates_pass_and_fail_with_their_figures(files):
    tmp, _ = files
    res = _verify(tmp, "Q8_0.gguf", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    gate = {c["name"]: c for c in doc["checks"]}["ppl_delta"]  # the default gate: +0.5 at most
    assert gate["ok"] and "vs base" in gate["detail"] and "(max 0.5)" in gate["detail"]
    assert doc["quality"]["gates"] == {"max_ppl_delta": 0.5} and doc["quality"]["preset"] == "Q8_0"
    res = _verify(tmp, "Q2_K.gguf", "--max-kld", "0.01", "--min-top1", "0.9")
    assert res.exit_code == 6
    text = " ".join(res.output.split())
    assert "FAIL kld mean KL divergence" in text and "(max 0.01)" in text and "FAIL top1" in text
    assert "verification failed: kld, top1" in text


def test_the_cached_base_gives_the_exact_evaluations_figures(files):
    tmp, base = files
    for name in ("Q8_0.gguf", "Q2_K.gguf"):
        q = json.loads(_verify(tmp, name, "--json").output)["quality"]
        exact = evaluate(tmp / name, TEXT.read_text(), PerplexityOptions(ctx=64, chunks=8), base=base)
        assert q["perplexity"] == pytest.approx(exact.perplexity, rel=1e-9)
        assert q["base_perplexity"] == pytest.approx(exact.base_perplexity, rel=1e-9)
        assert q["top1_agreement"] == exact.top1_agreement
        # the base's log-probabilities are kept in float16: the KL moves by ~1e-4 of itself
        assert q["kld_mean"] == pytest.approx(exact.kld_mean, rel=1e-3, abs=1e-5)
        assert q["kld_p99"] == pytest.approx(exact.kld_p99, rel=1e-3, abs=1e-5)


def test_ten_verifications_evaluate_the_base_once(files, tmp_path):
    tmp, _ = files
    cache = tmp_path / "cache"
    seen = []
    for i in range(10):
        res = runner.invoke(app, ["verify", str(tmp / ("Q8_0.gguf" if i % 2 else "Q2_K.gguf")), "--base",
                                  str(tmp / "base.gguf"), "--eval-text", str(TEXT), "--ctx", "64", "--chunks", "8",
                                  "--base-cache", str(cache), "--json", "--max-ppl-delta", "1000"])
        assert res.exit_code == 0, res.output
        seen.append(json.loads(res.output)["quality"]["base_cached"])
    assert seen == [False] + [True] * 9
    assert len(list(cache.iterdir())) == 1
    # another text slice is another base evaluation
    res = runner.invoke(app, ["verify", str(tmp / "Q8_0.gguf"), "--base", str(tmp / "base.gguf"), "--eval-text",
                              str(TEXT), "--ctx", "64", "--chunks", "4", "--base-cache", str(cache), "--json"])
    assert json.loads(res.output)["quality"]["base_cached"] is False and len(list(cache.iterdir())) == 2


def test_a_gate_file_with_per_preset_gates_and_flags_over_it(files, tmp_path):
    tmp, _ = files
    gates = tmp_path / "gates.yaml"
    gates.write_text("max_ppl_delta: 1000\nchunks: 8\nctx: 64\npresets:\n  Q8_0: {max_kld: 0.000001}\n"
                     "  q2_k:\n    max_kld: 100\n")
    common = ["--base", str(tmp / "base.gguf"), "--eval-text", str(TEXT), "--gates", str(gates),
              "--base-cache", str(tmp / "cache"), "--json"]
    res = runner.invoke(app, ["verify", str(tmp / "Q8_0.gguf"), *common])
    assert res.exit_code == 6  # stricter for Q8_0
    q = json.loads(res.output)["quality"]
    assert q["gates"] == {"max_ppl_delta": 1000, "max_kld": 0.000001} and q["chunks"] == 8 and q["ctx"] == 64
    assert runner.invoke(app, ["verify", str(tmp / "Q2_K.gguf"), *common]).exit_code == 0
    res = runner.invoke(app, ["verify", str(tmp / "Q8_0.gguf"), *common, "--max-kld", "1"])
    assert res.exit_code == 0  # a flag wins over the gate file, its per-preset gates too
    assert json.loads(res.output)["quality"]["gates"] == {"max_ppl_delta": 1000, "max_kld": 1}


@pytest.mark.parametrize("content, message", [
    ("max_kld: 0.1\nmax_klx: 2\n", ":2: unknown key 'max_klx'"),
    ("max_kld: lots\n", ":1: max_kld must be a number >= 0, got 'lots'"),
    ("min_top1: 1.5\n", ":1: min_top1 must be a number >= 0 and <= 1"),
    ("chunks: 0\n", ":1: chunks must be a positive integer"),
    ("presets:\n  Q9_9: {max_kld: 1}\n", ":2: unknown preset 'Q9_9'"),
    ("presets:\n  Q8_0: {ctx: 64}\n", ":2: unknown key 'ctx'"),
    ("a: &x 1\nb: *x\n", ":1: YAML anchors and aliases are not allowed in gate files"),
    ("max_kld: [1\n", "invalid YAML"),
    ("", ":1: empty gate file"),
    ("- 1\n", ":1: a gate file is a mapping"),
])
def test_gate_file_mistakes_name_the_line(files, tmp_path, content, message):
    tmp, _ = files
    gates = tmp_path / "g.yaml"
    gates.write_text(content)
    res = runner.invoke(app, ["verify", str(tmp / "Q8_0.gguf"), "--base", str(tmp / "base.gguf"), "--eval-text",
                              str(TEXT), "--gates", str(gates)])
    assert res.exit_code == 2, res.output
    assert f"{gates}{message}" in " ".join(res.output.split()) or message in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_junit_has_one_testcase_per_check_and_the_failures(files, tmp_path):
    tmp, _ = files
    xml = tmp_path / "out" / "verify.xml"
    xml.parent.mkdir()
    res = _verify(tmp, "Q2_K.gguf", "--max-kld", "0.01", "--junit", str(xml), "--json")
    assert res.exit_code == 6
    checks = json.loads(res.output)["checks"]
    root = ET.parse(xml).getroot()
    assert root.tag == "testsuites" and root.get("tests") == str(len(checks)) and root.get("failures") == "1"
    (suite,) = root.findall("testsuite")
    for attr in ("name", "tests", "failures", "errors", "skipped", "time"):
        assert suite.get(attr) is not None
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [c["name"] for c in checks]
    assert all(c.get("classname") and float(c.get("time")) >= 0 for c in cases)
    (failed,) = [c for c in cases if c.find("failure") is not None]
    assert failed.get("name") == "kld" and "(max 0.01)" in failed.find("failure").get("message")


def test_a_base_of_another_model_and_bad_flags_are_one_line_errors(files, tmp_path):
    tmp, _ = files
    other = write_model(tmp_path / "other.gguf", "qwen2", n_layer=2, seed=1)
    res = runner.invoke(app, ["verify", str(tmp / "Q8_0.gguf"), "--base", str(other), "--eval-text", str(TEXT)])
    assert res.exit_code == 3 and "not its base" in " ".join(res.output.split())
    for args, code, message in ((["--max-kld", "0.1"], 2, "pass --base BASE"),
                                (["--base", str(tmp / "base.gguf"), "--min-top1", "2"], 2, "must be >= 0 and <= 1"),
                                (["--base", str(tmp / "base.gguf")], 2, "no quality gate"),
                                (["--base", str(tmp / "base.gguf"), "--max-kld", "1"], 2, "need --eval-text TEXT")):
        res = runner.invoke(app, ["verify", str(tmp / "Q8_0.gguf"), *args])
        assert res.exit_code == code and message in " ".join(res.output.split()), res.output


def test_the_coherence_gate(files):
    tmp, _ = files
    res = runner.invoke(app, ["verify", str(tmp / "Q8_0.gguf"), "--base", str(tmp / "base.gguf"),
                              "--min-coherence", "0.5", "--max-ppl-delta", "1000", "--eval-text", str(TEXT),
                              "--ctx", "64", "--chunks", "2", "--base-cache", str(tmp / "cache"), "--json"])
    doc = json.loads(res.output)
    gate = {c["name"]: c for c in doc["checks"]}["coherence"]
    assert 0 <= gate["figure"] <= 1 and res.exit_code == (0 if gate["figure"] >= 0.5 else 6)
    assert doc["quality"]["coherence"] == pytest.approx(gate["figure"], abs=1e-4)


def test_on_the_real_model_q4_k_m_and_q8_0_pass_and_iq1_s_fails(real_f32, tmp_path):
    imatrix = DATA / "reference" / "gemma3-270m" / "imatrix-genesis.gguf"
    exodus = DATA / "engine" / "exodus.txt"
    codes = {}
    for preset in ("Q4_K_M", "Q8_0", "IQ1_S"):
        out = tmp_path / f"{preset}.gguf"
        res = runner.invoke(app, ["quantize", str(real_f32), str(out), "--type", preset, "--imatrix", str(imatrix),
                                  "-q", "--no-check"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["verify", str(out), "--base", str(real_f32), "--eval-text", str(exodus),
                                  "--chunks", "2", "--base-cache", str(tmp_path / "cache"), "--json"])
        codes[preset] = (res.exit_code, json.loads(res.output)["quality"])
        out.unlink()
    assert codes["Q4_K_M"][0] == 0 and codes["Q8_0"][0] == 0
    assert codes["IQ1_S"][0] == 6 and codes["IQ1_S"][1]["perplexity"] > codes["IQ1_S"][1]["base_perplexity"] + 0.5
    assert [q["base_cached"] for _, q in codes.values()] == [False, True, True]


def test_contracts_list_the_ten_ids(files, monkeypatch):
    """verify --contracts runs FALSIFY-QO-001..005 and FALSIFY-QUANT-001..005 against quantcli and
    reports each by its ID; breaking what one of them checks fails the step with that ID."""
    from quantcli.convert import lora
    from quantcli.pipelines import contracts

    tmp, _ = files
    res = runner.invoke(app, ["verify", str(tmp / "Q8_0.gguf"), "--contracts", "--json"])
    assert res.exit_code == 0, res.output
    checks = {c["name"]: c for c in json.loads(res.output)["checks"]}
    ids = [f"FALSIFY-QO-00{i}" for i in range(1, 6)] + [f"FALSIFY-QUANT-00{i}" for i in range(1, 6)]
    assert [n for n in checks if n.startswith("FALSIFY")] == ids
    assert all(checks[i]["ok"] for i in ids)
    sizes = {t: b / 1e9 for t, b in checks["FALSIFY-QO-003"]["figure"].items()}
    assert "8.96B-parameter" in checks["FALSIFY-QO-003"]["detail"]
    assert sizes["Q4_K"] < sizes["Q6_K"] < sizes["Q8_0"] < sizes["F16"]
    assert all(abs(sizes[t] - gb) <= 0.2 * gb for t, gb in contracts.CONCRETE_GB.items())
    assert checks["FALSIFY-QO-002"]["figure"] == pytest.approx({"std": 0.25, "r8": 2.0, "rs": 2.0}, rel=1e-6)
    assert checks["FALSIFY-QUANT-005"]["figure"] == pytest.approx(32 / 4.5)
    text = runner.invoke(app, ["verify", str(tmp / "Q8_0.gguf"), "--contracts"]).output
    assert all(f"pass  {i}" in text for i in ids)
    # a size far from the expectation fails the step (as a wrong block constant would)
    monkeypatch.setitem(contracts.CONCRETE_GB, "Q4_K", 3.0)
    res = runner.invoke(app, ["verify", str(tmp / "Q8_0.gguf"), "--contracts"])
    assert res.exit_code == 6 and "FAIL  FALSIFY-QO-003" in res.output
    monkeypatch.undo()
    # a merge that adds the update twice fails the scaling (QO-002) and the expected output (QO-004)
    add_to = lora.Delta.add_to

    def twice(self, w, start):
        add_to(self, w, start)
        add_to(self, w, start)

    monkeypatch.setattr(lora.Delta, "add_to", twice)
    res = runner.invoke(app, ["verify", str(tmp / "Q8_0.gguf"), "--contracts", "--json"])
    failed = [c["name"] for c in json.loads(res.output)["checks"] if not c["ok"]]
    assert res.exit_code == 6 and failed == ["FALSIFY-QO-002", "FALSIFY-QO-004"]
