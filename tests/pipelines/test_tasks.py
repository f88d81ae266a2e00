"""Multiple-choice task accuracy (`verify --task`): the file format and its errors, the harness's
split of context and continuation, scores equal to scoring each choice alone, the gate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.engine.generate import Generator
from quantcli.engine.model import Model
from quantcli.engine.tokenizer import Tokenizer
from quantcli.errors import InputError
from quantcli.formats import open_model
from quantcli.pipelines import tasks
from tests.conftest import DATA
from tests.models import write_model

runner = CliRunner()


def test_the_shipped_task():
    items = tasks.load(tasks.SHIPPED)
    assert len(items) == 42 and all(len(i.choices) == 4 for i in items)
    assert {i.answer for i in items} == {0, 1, 2, 3}  # the right answer is not always in one place


@pytest.mark.parametrize("line, message", [
    ("not json", ":2: not JSON"),
    ('{"context": "a", "choices": [" b", " c"]}', ":2: missing answer"),
    ('{"context": "a", "choices": [" b", " c"], "answer": 2}', ":2: answer 2 is not an index of its 2 choices"),
    ('{"context": "a", "choices": [" b", " c"], "answer": true}', ":2: answer True is not an index"),
    ('{"context": "a", "choices": [" b"], "answer": 0}', ":2: choices must be a list of two or more"),
    ('{"context": "", "choices": [" b", " c"], "answer": 0}', ":2: context must be a non-empty string"),
    ('[1, 2]', ":2: an item is an object"),
])
def test_task_file_mistakes_name_the_line(tmp_path, line, message):
    f = tmp_path / "t.jsonl"
    f.write_text('{"context": "x", "choices": [" y", " z"], "answer": 1}\n' + line + "\n")
    with pytest.raises(InputError, match=f"{f}{message}"):
        tasks.load(f)


def test_empty_binary_and_missing_task_files(tmp_path):
    f = tmp_path / "t.jsonl"
    for content, message in ((b"# only a comment\n\n", "no items"), (b"\xff\xfe", "not UTF-8")):
        f.write_bytes(content)
        with pytest.raises(InputError, match=message):
            tasks.load(f)
    with pytest.raises(InputError, match="no such task file"):
        tasks.load(tmp_path / "none.jsonl")


def _base(tmp_path):
    return write_model(tmp_path / "base.gguf", "gemma3", n_layer=2, seed=5, scale=0.3, sliding_window=8)


def test_scores_equal_scoring_each_choice_alone(tmp_path):
    items = tasks.load(tasks.SHIPPED)[:10]
    with open_model(_base(tmp_path)) as r:
        got = tasks.score(r, items)
        tok, gen = Tokenizer.from_model(r), Generator(Model(r))
        right = right_norm = 0
        for item in items:
            lls = []
            for choice in item.choices:
                head, cont = tasks.split(tok, item.context, choice)
                assert tok.encode(item.context + choice) == head + cont  # the continuation is what it adds
                z = gen.feed(gen.new_caches(), head + cont, all_logits=True).astype(np.float64)[len(head) - 1:-1]
                lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
                lls.append(float(np.sum(z[np.arange(len(cont)), cont] - lse)))
            right += int(np.argmax(lls)) == item.answer
            right_norm += int(np.argmax(np.array(lls) / [len(c) for c in item.choices])) == item.answer
    assert (got.acc, got.acc_norm) == (right / 10, right_norm / 10)


def test_the_task_gate(tmp_path):
    base = _base(tmp_path)
    q8 = tmp_path / "q8.gguf"
    assert runner.invoke(app, ["quantize", str(base), str(q8), "--type", "Q8_0", "-q"]).exit_code == 0
    common = ["verify", str(q8), "--base", str(base), "--task", str(tasks.SHIPPED), "--base-cache", str(tmp_path / "c"),
              "--json"]
    seen = []
    for _ in range(2):
        res = runner.invoke(app, common)
        doc = json.loads(res.output)
        gate = {c["name"]: c for c in doc["checks"]}["task_ratio"]
        assert doc["quality"]["gates"] == {"min_task_ratio": 0.95}  # without --eval-text no perplexity gate
        assert res.exit_code == (0 if all(c["ok"] for c in doc["checks"]) else 6)
        assert gate["figure"] == pytest.approx(doc["quality"]["task_acc_norm"] / doc["quality"]["task_base_acc_norm"],
                                               abs=1e-6)
        seen.append(doc["quality"]["task_base_cached"])
    assert seen == [False, True]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": [" b", " c"], "answer": 5}\n')
    res = runner.invoke(app, ["verify", str(q8), "--base", str(base), "--task", str(bad), "--min-task-ratio", "0.9",
                              "--gates", str(_gates(tmp_path))])
    assert res.exit_code == 3 and "answer 5 is not an index" in " ".join(res.output.split())
    res = runner.invoke(app, ["verify", str(q8), "--base", str(base), "--min-task-ratio", "0.9"])
    assert res.exit_code == 2 and "needs --task FILE" in " ".join(res.output.split())


def _gates(tmp_path):
    g = tmp_path / "g.yaml"
    g.write_text("min_task_ratio: 0.9\n")
    return g


def test_the_example_model_scores(real_f32):
    with open_model(real_f32) as r:
        s = tasks.score(r, tasks.load(tasks.SHIPPED))
    assert s.acc_norm == pytest.approx(40 / 42) and s.acc == pytest.approx(40 / 42)
