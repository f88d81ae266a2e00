"""`imatrix` and `report --eval-text` through the CLI on a tiny random model."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from quantcli.calibrate import imatrix_file as imf
from quantcli.cli.app import app
from tests.models import write_model

runner = CliRunner()
TEXT = "In the beginning God created the heaven and the earth. " * 60


def test_imatrix_cli_writes_both_formats(tmp_path):
    model = write_model(tmp_path / "m.gguf", "llama", n_layer=2)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    for fmt, name in (("gguf", "im.gguf"), ("dat", "im.dat")):
        out = tmp_path / name
        res = runner.invoke(app, ["imatrix", str(model), "--text", str(text), "-o", str(out), "--ctx", "64",
                                  "--chunks", "3", "--output-format", fmt, "--json"])
        assert res.exit_code == 0, res.output
        doc = json.loads(res.output)
        assert doc["chunks"] <= 3 and doc["entries"] == 14
        loaded = imf.load(out)
        assert len(loaded.entries) == 14 and loaded.is_legacy == (fmt == "dat")
        assert not (tmp_path / f"{name}.checkpoints").exists()


def test_imatrix_warns_outside_range_and_on_short_text(tmp_path):
    model = write_model(tmp_path / "m.gguf", "llama", n_layer=1)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    res = runner.invoke(app, ["imatrix", str(model), "-f", str(text), "-o", str(tmp_path / "o.gguf"),
                              "--ctx", "64", "--chunks", "100"])
    assert res.exit_code == 0, res.output
    assert "outside the recommended 128-1024" in res.output
    assert "the text holds only" in res.output


def test_imatrix_missing_text_is_input_error(tmp_path):
    model = write_model(tmp_path / "m.gguf", "llama", n_layer=1)
    res = runner.invoke(app, ["imatrix", str(model), "-f", str(tmp_path / "none.txt"), "-o", str(tmp_path / "o.gguf")])
    assert res.exit_code == 3 and "none.txt: no such text file" in res.output


def test_report_eval_text_json(tmp_path):
    model = write_model(tmp_path / "m.gguf", "llama", n_layer=2)
    base = write_model(tmp_path / "b.gguf", "llama", n_layer=2, seed=1)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    res = runner.invoke(app, ["report", str(model), "--json", "--eval-text", str(text), "--ctx", "64",
                              "--chunks", "2", "--base", str(base)])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.output)["evaluation"]
    assert {"perplexity", "tokens", "kld_mean", "kld_p99", "top1_agreement"} <= set(ev)
    assert ev["tokens"] == 2 * (64 // 2 - 1)  # llama-perplexity scores the second half of each chunk
    assert ev["perplexity"] > 1.0 and 0.0 <= ev["top1_agreement"] < 1.0 and ev["kld_mean"] > 0
    same = runner.invoke(app, ["report", str(model), "--json", "--eval-text", str(text), "--ctx", "64",
                               "--chunks", "2", "--base", str(model)])
    ev = json.loads(same.output)["evaluation"]
    assert ev["kld_mean"] < 1e-6 and ev["top1_agreement"] == 1.0


def test_report_base_needs_eval_text(tmp_path):
    model = write_model(tmp_path / "m.gguf", "llama", n_layer=1)
    res = runner.invoke(app, ["report", str(model), "--base", str(model)])
    assert res.exit_code == 2 and "--base needs --eval-text" in res.output
