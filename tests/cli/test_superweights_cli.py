"""Super weights through the CLI: `imatrix --super-weights`, `report IMATRIX [--importance]
[--plot]`, `quantize --protect-super-weights`, and llama-quantize reading such an imatrix."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantcli.calibrate import imatrix_file as imf
from quantcli.cli.app import app
from tests.calibrate.test_superweights import COL, ROW, planted
from tests.conftest import DATA
from tests.llama_tools import llama_tool

runner = CliRunner()
TEXT = DATA / "engine" / "genesis.txt"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    """(the planted model, its imatrix with super-weight records), made through the CLI once."""
    d = tmp_path_factory.mktemp("sw")
    model = planted(d / "m.gguf")
    out = d / "im.gguf"
    res = runner.invoke(app, ["imatrix", str(model), "--text", str(TEXT), "-o", str(out), "--ctx", "64",
                              "--chunks", "16", "--super-weights", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    confirmed = [s for s in doc["super_weights"]["super_weights"] if s["confirmed"]]
    assert [(s["tensor"], s["row"], s["col"]) for s in confirmed] == [("blk.0.ffn_down.weight", ROW, COL)]
    return model, out


def test_imatrix_prints_what_it_found(made, tmp_path):
    model, _ = made
    res = runner.invoke(app, ["imatrix", str(model), "--text", str(TEXT), "-o", str(tmp_path / "i.gguf"),
                              "--ctx", "64", "--chunks", "16", "--super-weights"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "1 confirmed, 0 candidate(s)" in text and f"{ROW} │ {COL}" in text


def test_report_lists_super_weights_and_importance(made, tmp_path):
    _, im = made
    res = runner.invoke(app, ["report", str(im)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "super weights" in text and "1 confirmed" in text and f"{ROW} │ {COL}" in text
    res = runner.invoke(app, ["report", str(im), "--importance", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["schema"] == "quantcli.imatrix-report/1" and doc["entries"] == 21
    assert doc["outliers"]["super_weights"][0]["row"] == ROW
    down0 = next(r for r in doc["importance"] if r["name"] == "blk.0.ffn_down.weight")
    assert down0["max_channel"] == COL and down0["max_norm"] == 1.0  # the planted input dominates
    assert all(0 <= r["mean_norm"] <= 1 for r in doc["importance"])
    res = runner.invoke(app, ["report", str(im), "--importance"])
    assert res.exit_code == 0 and "importance per layer" in res.output


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib (the plot extra) is absent")
def test_report_plots_importance(made, tmp_path):
    _, im = made
    png = tmp_path / "imp.png"
    res = runner.invoke(app, ["report", str(im), "--importance", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_an_imatrix_without_records_says_so():
    res = runner.invoke(app, ["report", str(DATA / "reference" / "gemma3-270m" / "imatrix-genesis.gguf")])
    assert res.exit_code == 0, res.output
    assert "126 entries" in res.output and "no super-weight records" in res.output


def test_usage_errors(made, tmp_path):
    model, im = made
    cases = [
        (["imatrix", str(model), "--text", str(TEXT), "-o", str(tmp_path / "x.dat"), "--output-format", "dat",
          "--super-weights"], "legacy .dat has no room"),
        (["report", str(im), "--eval-text", str(TEXT)], "is an importance matrix"),
        (["report", str(model), "--importance"], "is a model"),
        (["quantize", str(model), str(tmp_path / "q.gguf"), "--type", "Q4_0", "--protect-super-weights"],
         "pass --imatrix FILE"),
        (["quantize", str(model), str(tmp_path / "q.gguf"), "--type", "Q4_0", "--super-weight-type", "Q8_0"],
         "pass that too"),
        (["quantize", str(model), str(tmp_path / "q.gguf"), "--type", "Q4_0", "--protect-super-weights",
          "--imatrix", str(DATA / "reference" / "gemma3-270m" / "imatrix-genesis.gguf")],
         "no super-weight records"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in " ".join(res.output.split()), (args, res.output)
    assert not (tmp_path / "x.dat").exists() and not (tmp_path / "q.gguf").exists()


def test_protection_raises_the_tensor_and_says_why(made, tmp_path):
    model, im = made
    res = runner.invoke(app, ["quantize", str(model), str(tmp_path / "q.gguf"), "--type", "Q4_0", "--imatrix",
                              str(im), "--protect-super-weights", "--super-weight-type", "Q8_0", "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    types = {t["name"]: t for t in doc["tensors"]}
    assert types["blk.0.ffn_down.weight"]["type"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"]["reason"].startswith(f"protected: super weight [{ROW}, {COL}]")
    assert types["blk.1.ffn_down.weight"]["type"] == "Q4_0"
    assert doc["protected"] == [{"tensor": "blk.0.ffn_down.weight", "type": "Q8_0", "super_weights": [
        {"row": ROW, "col": COL, "value": 2.0, "effect": doc["protected"][0]["super_weights"][0]["effect"]}]}]
    res = runner.invoke(app, ["quantize", str(model), str(tmp_path / "q.gguf"), "--type", "Q4_0", "--imatrix",
                              str(im), "--protect-super-weights", "--super-weight-type", "Q8_0", "--dry-run"])
    assert res.exit_code == 0 and "protected 1 tensor(s)" in res.output
    # never lowers: a preset that already gives more bits keeps them
    res = runner.invoke(app, ["quantize", str(model), str(tmp_path / "q.gguf"), "--type", "F16", "--imatrix",
                              str(im), "--protect-super-weights", "--super-weight-type", "Q8_0", "--dry-run", "--json"])
    doc = json.loads(res.output)
    assert {t["name"]: t["type"] for t in doc["tensors"]}["blk.0.ffn_down.weight"] == "F16" and doc["protected"] == []
    # the default type's blocks of 256 do not divide these rows of 96: Q8_0, said so
    res = runner.invoke(app, ["quantize", str(model), str(tmp_path / "q.gguf"), "--type", "Q4_0", "--imatrix",
                              str(im), "--protect-super-weights", "--dry-run"])
    assert res.exit_code == 0 and "protected as Q8_0" in res.output


def test_an_automatic_mix_takes_protected_tensors_as_fixed(made, tmp_path):
    model, im = made
    res = runner.invoke(app, ["quantize", str(model), str(tmp_path / "q.gguf"), "--target-bpw", "5", "--calib",
                              str(TEXT), "--calib-chunks", "4", "--ctx", "64", "--candidates", "Q4_0,Q5_0,Q8_0",
                              "--imatrix", str(im), "--protect-super-weights", "--super-weight-type", "Q8_0",
                              "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    down = next(t for t in doc["tensors"] if t["name"] == "blk.0.ffn_down.weight")
    assert down["type"] == "Q8_0" and down["reason"].startswith("protected: super weight")
    assert doc["allocation"]["target"] == "bpw 5" and doc["bpw"] <= 5.0


def test_the_protected_file_is_what_the_rule_makes(made, tmp_path):
    model, im = made
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    res = runner.invoke(app, ["quantize", str(model), str(a), "--type", "Q4_0", "--imatrix", str(im),
                              "--protect-super-weights", "--super-weight-type", "Q8_0", "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["quantize", str(model), str(b), "--type", "Q4_0", "--imatrix", str(im),
                              "--tensor-type", "blk\\.0\\.ffn_down=Q8_0", "-q"])
    assert res.exit_code == 0, res.output
    from quantcli.formats import open_model

    with open_model(a) as fa, open_model(b) as fb:
        assert fa.meta("quantcli.super_weights.protected") == "blk.0.ffn_down.weight"
        assert fa.tensors["blk.0.ffn_down.weight"].dtype == "Q8_0"
        for name in fb.tensors:
            assert fa.raw(name).tobytes() == fb.raw(name).tobytes(), name


def _same_name_copies(tmp_path: Path, im: Path) -> tuple[Path, Path]:
    """The imatrix with and without its records, at the same relative name in two directories (the
    output records the imatrix's path as given)."""
    (tmp_path / "with").mkdir()
    (tmp_path / "without").mkdir()
    shutil.copy(im, tmp_path / "with" / "im.gguf")
    loaded = imf.load(im)
    loaded.outliers = None
    imf.save_gguf(loaded, tmp_path / "without" / "im.gguf")
    return tmp_path / "with", tmp_path / "without"


def test_records_do_not_change_what_quantize_writes(made, tmp_path, monkeypatch):
    model, im = made
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # the recorded date, else the two may differ
    outs = []
    for d in _same_name_copies(tmp_path, im):
        monkeypatch.chdir(d)
        res = runner.invoke(app, ["quantize", str(model), "out.gguf", "--type", "Q4_0", "--imatrix", "im.gguf", "-q"])
        assert res.exit_code == 0, res.output
        outs.append((d / "out.gguf").read_bytes())
    assert outs[0] == outs[1]


def test_llama_quantize_reads_the_imatrix_to_the_same_bytes(made, tmp_path):
    exe = llama_tool("llama-quantize")
    if exe is None:
        pytest.skip("llama-quantize not found (set QUANTCLI_LLAMA_BIN)")
    model, im = made
    outs = []
    for d in _same_name_copies(tmp_path, im):
        proc = subprocess.run([str(exe), "--imatrix", "im.gguf", str(model), "out.gguf", "Q4_0"], cwd=d,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "loaded 21 importance matrix entries" in proc.stdout + proc.stderr
        outs.append((d / "out.gguf").read_bytes())
    assert outs[0] == outs[1]
