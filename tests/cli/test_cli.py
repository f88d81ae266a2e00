"""The CLI: exact output shapes and exit codes through typer's CliRunner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import quantcli
from quantcli.cli.app import app

runner = CliRunner()


def test_help_lists_only_working_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("dequantize", "report"):
        assert cmd in res.output


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output == f"quantcli {quantcli.__version__}\n"


def test_report_json_schema(tiny_gguf):
    res = runner.invoke(app, ["report", str(tiny_gguf), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["schema"] == "quantcli.report/1" and doc["format"] == "gguf"
    assert [t["name"] for t in doc["tensors"]][:2] == ["token_embd.weight", "blk.0.attn_norm.weight"]
    q = doc["tensors"][2]
    assert q == {"name": "blk.0.attn_q.weight", "shape": [64, 64], "type": "F32", "params": 4096,
                 "bytes": 16384, "bpw": 32.0, "layer": 0}
    assert [(r["layer"], r["tensors"]) for r in doc["layers"]] == [(0, 2), (1, 1)]
    tot = doc["totals"]
    assert tot["tensors"] == 4 and tot["params"] == 16 * 64 + 64 + 2 * 4096
    assert tot["ratio_vs_f32"] == 1.0 and tot["ratio_vs_f16"] == 0.5
    assert doc["metadata"]["architecture"] == "llama" and doc["metadata"]["layers"] == 2


def test_report_table(tiny_gguf):
    res = runner.invoke(app, ["report", str(tiny_gguf)])
    assert res.exit_code == 0
    assert "blk.0.attn_q.weight" in res.output and "layers" in res.output
    assert "total: 4 tensors" in res.output


def test_report_real_model(real_model):
    res = runner.invoke(app, ["report", str(real_model), "--json"])
    assert res.exit_code == 0
    doc = json.loads(res.output)
    assert len(doc["tensors"]) == 236 and len(doc["layers"]) == 18
    assert doc["metadata"] == {"architecture": "gemma3", "name": "Gemma 3 270m", "layers": 18,
                               "context_length": 32768, "embedding_length": 640,
                               "vocab_size": 262144, "file_type": 15}
    assert doc["totals"]["types"]["Q4_K"]["tensors"] == 27
    table = runner.invoke(app, ["report", str(real_model)])
    assert table.exit_code == 0 and "blk.17.ffn_down.weight" in table.output


def test_missing_input_exit_code(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path / "missing.gguf")])
    assert res.exit_code == 3
    assert res.output.startswith("error: ") and "missing.gguf: no such file" in res.output


def test_existing_output_exit_code(tiny_gguf, tmp_path):
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"x")
    res = runner.invoke(app, ["dequantize", str(tiny_gguf), str(out)])
    assert res.exit_code == 4
    assert "already exists" in res.output and "--force" in res.output


def test_bad_type_is_usage_error(tiny_gguf, tmp_path):
    res = runner.invoke(app, ["dequantize", str(tiny_gguf), str(tmp_path / "o.gguf"), "--type", "Q9"])
    assert res.exit_code == 2 and "unknown output type 'Q9'" in res.output
    assert not (tmp_path / "o.gguf").exists()


def test_dequantize_cli_writes(tiny_gguf, tmp_path):
    out = tmp_path / "o.safetensors"
    res = runner.invoke(app, ["dequantize", str(tiny_gguf), str(out), "-q"])
    assert res.exit_code == 0 and res.output == ""
    assert out.stat().st_size > 0


def test_start_up_does_not_load_numba():
    """Every command pays for what the CLI imports: numba (~0.15 s) loads only when a kernel runs,
    the forward pass and the progress bar only in the commands that use them."""
    import subprocess
    import sys

    lazy = ('numba', 'llvmlite', 'quantcli.engine', 'quantcli.calibrate.imatrix', 'rich.progress')
    code = f"import sys, quantcli.cli.app; print(sorted(m for m in {lazy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
