"""The coherence check: the prompt suite, the metrics, the verdict, `report --coherence`."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.errors import InputError
from quantcli.pipelines import coherence as co
from tests.models import write_model

runner = CliRunner()


def test_the_shipped_suite_has_the_kinds_the_issue_asks_for():
    prompts = co.load_prompts()
    assert len(prompts) >= 40
    text = "\n".join(prompts)
    for sign in ("def ", "Once upon a time", "Assistant:", "1.", "capital of France", "Instructions"):
        assert sign in text
    assert all(p.strip() and "quantcli" not in p for p in prompts)  # the header comment is not a prompt


def test_prompt_files_parse_and_fail_clearly(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# a comment\n---\nfirst\nline two\n---\n\n---\nsecond\n")
    assert co.load_prompts(f) == ["first\nline two", "second"]
    f.write_text("just one prompt\n")
    assert co.load_prompts(f) == ["just one prompt"]
    for content, message in ((b"", "no prompts"), (b"# only\n---\n---\n", "no prompts"),
                             (b"\xff\xfe bad", "not UTF-8 text")):
        f.write_bytes(content)
        with pytest.raises(InputError, match=f"{f}: {message}"):
            co.load_prompts(f)
    with pytest.raises(InputError, match="no such prompts file"):
        co.load_prompts(tmp_path / "missing.txt")


def test_the_metrics():
    loop = [5, 6, 7, 8] * 4
    assert co.repeat4(loop) == pytest.approx(1 - 4 / 13)
    assert co.repeat4([1, 2, 3]) == 0.0
    assert co.longest_run([1, 2, 2, 2, 3, 3]) == 3 and co.longest_run([]) == 0
    assert co.distinct2([1, 2, 1, 2]) == pytest.approx(2 / 3) and co.distinct2([1]) == 1.0
    assert co.entropy_bits([1, 2, 3, 4]) == pytest.approx(2.0) and co.entropy_bits([7] * 9) == 0.0


def _models(tmp_path):
    base = write_model(tmp_path / "base.gguf", "llama", n_layer=2, seed=11, scale=0.4)
    other = write_model(tmp_path / "other.gguf", "llama", n_layer=2, seed=12, scale=0.4)
    return base, other


def test_a_model_against_itself_is_coherent_and_another_is_not(tmp_path):
    base, other = _models(tmp_path)
    prompts = co.load_prompts()[:12]
    same = co.check(base, base, prompts, continuation=12)
    assert same.coherent == 1.0
    # the base's distributions are kept in float16 while it decodes: KL of a model with itself ~1e-5
    assert all(r.kld < 1e-3 and r.top1 == 1.0 and r.text == r.base_text for r in same.results)
    far = co.check(other, base, prompts, continuation=12)
    assert far.coherent < 0.5
    assert all("kld" in r.failed or "top1" in r.failed for r in far.results if not r.coherent)
    doc = far.to_json()
    assert doc["schema"] == "quantcli.coherence/1" and doc["prompts"] == 12
    assert math.isclose(doc["coherent"], far.coherent, abs_tol=1e-4)


def test_a_prompt_longer_than_the_context_is_refused(tmp_path):
    base, _ = _models(tmp_path)
    with pytest.raises(InputError, match="prompts.txt: prompt 2 has .* tokens"):
        co.check(base, base, ["short", "the cat " * 1500], source="prompts.txt")


def test_report_coherence_cli(tmp_path):
    base, other = _models(tmp_path)
    f = tmp_path / "p.txt"
    f.write_text("the cat sat\n---\nonce upon a time\n---\nthe hat\n")
    res = runner.invoke(app, ["report", str(other), "--coherence", "--base", str(base), "--prompts", str(f), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["prompts"] == 3 and set(doc["results"][0]) >= {"prompt", "text", "base_text", "kld", "top1",
                                                              "failed", "coherent"}
    res = runner.invoke(app, ["report", str(base), "--coherence", "--base", str(base), "--prompts", str(f)])
    assert res.exit_code == 0, res.output
    assert "100.0% of 3 prompts coherent: coherent" in " ".join(res.output.split())
    for args, message in ((["--coherence"], "pass --base BASE"), (["--prompts", str(f)], "pass that too"),
                          (["--coherence", "--base", str(base), "--eval-text", str(f)], "a report of its own")):
        res = runner.invoke(app, ["report", str(other), *args])
        assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
