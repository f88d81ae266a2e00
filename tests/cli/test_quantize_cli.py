"""`quantcli quantize` as a user runs it, through typer's CliRunner: the --dry-run table, the --json
schema (quantcli.quantize/1) of a dry and a real run, and the exit codes of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from quantcli.cli.app import app
from quantcli.formats import open_model
from tests.models import PLAIN_LLAMA, write_model

runner = CliRunner()
WIDE = {"COLUMNS": "200"}  # rich sizes the table to its content up to the terminal's width: no wrapping


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """One layer of a plain llama with n_ff 320: ffn_down's rows of 320 make Q6_K fall back."""
    d = tmp_path_factory.mktemp("cli-quantize")
    return write_model(d / "m.gguf", n_layer=1, **{**PLAIN_LLAMA, "n_ff": 320})


def quantize(*args: str) -> Result:
    return runner.invoke(app, ["quantize", *args], env=WIDE)


def test_dry_run_table(model, tmp_path):
    out = tmp_path / "q.gguf"
    res = quantize(str(model), str(out), "--type", "Q4_K_M", "--dry-run")
    assert res.exit_code == 0, res.output
    assert not out.exists() and not (tmp_path / "q.gguf.checkpoints").exists()
    lines = res.stdout.splitlines()
    pad = 104  # the widest reason (ffn_down's) sets the last column
    assert lines[0] == "plan"
    assert lines[2] == "┃tensor                   ┃ from ┃ type ┃   MB ┃ " + "reason".ljust(pad) + "┃"
    rows = [line for line in lines if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == [
        "token_embd.weight", "output_norm.weight", "output.weight",
        *(f"blk.0.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                        "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"))]
    for row in (
        "│token_embd.weight        │ F32  │ Q4_K │ 0.07 │ " + "Q4_K_M: default Q4_K".ljust(pad) + "│",
        "│output_norm.weight       │ F32  │ F32  │ 0.00 │ " + "1-D: kept".ljust(pad) + "│",
        "│output.weight            │ F32  │ Q6_K │ 0.11 │ " + "Q4_K_M: output -> Q6_K".ljust(pad) + "│",
        "│blk.0.attn_v.weight      │ F32  │ Q6_K │ 0.05 │ "
        + "Q4_K_M: attn_v -> Q6_K (use_more_bits #0 of 1)".ljust(pad) + "│",
        "│blk.0.ffn_down.weight    │ F32  │ Q8_0 │ 0.09 │ Q4_K_M: ffn_down -> Q6_K (use_more_bits layer 0 of 1);"
        " fallback: 320 not divisible by 256 (Q6_K) -> Q8_0│",
    ):
        assert row in rows
    assert lines[-2] == "total: 12 tensors, 770,816 params, 0.53 MB, 5.479 bpw, file type 15, 1 fallback(s)"
    assert lines[-1] == "2.92x smaller than F16"  # Q4_K_M's default Q4_K alone would be 3.6x: within 80 %
    assert res.stderr == ("warning: 1 of 12 tensor(s) required fallback quantization "
                          "(rows not divisible by the type's block size)\n")


def _check_schema(doc: dict) -> None:
    """Every key of quantcli.quantize/1 and its type (bool is not an int here)."""
    types = {"schema": str, "output": (str, type(None)), "dry_run": bool, "tensors": list, "params": int,
             "bytes": int, "bpw": float, "file_bytes": int, "file_type": int, "fallbacks": int,
             "resumed_units": int, "seconds": float, "allocation": type(None), "protected": type(None),
             "size": dict, "warnings": list, "coherence": type(None)}
    assert list(doc) == list(types)
    for key, want in types.items():
        assert type(doc[key]) in (want if isinstance(want, tuple) else (want,)), (key, doc[key])
    assert doc["schema"] == "quantcli.quantize/1"
    tensor_types = {"name": str, "shape": list, "from": str, "type": str, "bytes": int, "reason": str}
    for t in doc["tensors"]:
        assert list(t) == list(tensor_types)
        assert all(type(t[k]) is v for k, v in tensor_types.items()), t
        assert t["shape"] and all(type(n) is int and n > 0 for n in t["shape"]), t
    assert all(type(w) is str for w in doc["warnings"])


def test_json_dry_run(model, tmp_path):
    out = tmp_path / "q.gguf"
    res = quantize(str(model), str(out), "--type", "Q4_K_M", "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and not out.exists()
    doc = json.loads(res.stdout)
    _check_schema(doc)
    assert doc["output"] is None and doc["dry_run"] is True
    assert len(doc["tensors"]) == 12 and doc["tensors"][-1] == {
        "name": "blk.0.ffn_down.weight", "shape": [256, 320], "from": "F32", "type": "Q8_0", "bytes": 87040,
        "reason": "Q4_K_M: ffn_down -> Q6_K (use_more_bits layer 0 of 1); fallback: 320 not divisible by 256 (Q6_K) -> Q8_0"}
    assert (doc["params"], doc["bytes"], doc["bpw"], doc["file_type"], doc["fallbacks"]) == (770816, 527872, 5.4786, 15, 1)
    assert doc["bytes"] == sum(t["bytes"] for t in doc["tensors"])
    assert doc["resumed_units"] == 0
    assert doc["warnings"] == ["1 of 12 tensor(s) required fallback quantization "
                               "(rows not divisible by the type's block size)"]


def test_json_real_run_writes_the_planned_file(model, tmp_path):
    out = tmp_path / "q.gguf"
    dry = json.loads(quantize(str(model), str(out), "--type", "Q4_K_M", "--dry-run", "--json").stdout)
    res = quantize(str(model), str(out), "--type", "Q4_K_M", "--json", "-j", "2")
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    doc = json.loads(res.stdout)
    _check_schema(doc)
    assert doc["output"] == str(out) and doc["dry_run"] is False and doc["seconds"] >= 0
    assert doc["tensors"] == dry["tensors"]  # the run does what the dry run promised
    assert {k: doc[k] for k in ("params", "bytes", "bpw", "file_type", "fallbacks")} == \
        {k: dry[k] for k in ("params", "bytes", "bpw", "file_type", "fallbacks")}
    assert out.stat().st_size > doc["bytes"] and not (tmp_path / "q.gguf.checkpoints").exists()
    assert out.stat().st_size == doc["file_bytes"] == dry["file_bytes"]
    with open_model(out) as m:
        assert [(n, i.dtype, i.nbytes) for n, i in m.tensors.items()] == \
            [(t["name"], t["type"], t["bytes"]) for t in doc["tensors"]]
        assert m.meta("general.file_type") == 15
        for name in m.tensors:
            assert len(m.raw(name)) == m.tensors[name].nbytes


def _one_error(res: Result, code: int) -> list[str]:
    """Exit `code`, nothing on stdout, an `error:` line (and at most a hint) on stderr, no traceback."""
    assert res.exit_code == code, res.output
    assert type(res.exception) is SystemExit  # the boundary turned it into an exit code
    assert res.stdout == "" and "Traceback" not in res.output
    lines = res.stderr.splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2
    assert all(line.startswith("hint: ") for line in lines[1:])
    return lines


def test_tensor_type_without_equals_is_usage_error(model, tmp_path):
    out = tmp_path / "q.gguf"
    res = quantize(str(model), str(out), "--type", "Q4_K_M", "--tensor-type", "attn_v")
    assert _one_error(res, 2) == ["error: --tensor-type 'attn_v' is not REGEX=TYPE",
                                  "hint: e.g. --tensor-type attn_v=Q8_0"]
    assert not out.exists()


@pytest.mark.parametrize("dry_run", [False, True])
def test_tensor_type_unknown_type_is_usage_error(model, tmp_path, dry_run):
    out = tmp_path / "q.gguf"
    res = quantize(str(model), str(out), "--type", "Q4_K_M", "--tensor-type", "attn_v=Q9_Z",
                   *(["--dry-run"] if dry_run else []))
    error, hint = _one_error(res, 2)
    assert error.startswith("error: unknown --tensor-type type 'Q9_Z'; known: F32, F16, Q4_0, ")
    assert ", Q8_0, " in error and ", Q4_K, " in error
    assert hint == "hint: use a GGML type name such as Q8_0 or Q4_K"
    assert not out.exists() and not (tmp_path / "q.gguf.checkpoints").exists()


def test_missing_input_exit_code(tmp_path):
    missing = tmp_path / "missing.gguf"
    res = quantize(str(missing), str(tmp_path / "q.gguf"), "--type", "Q8_0")
    assert _one_error(res, 3) == [f"error: {missing}: no such file"]
    assert not (tmp_path / "q.gguf").exists()


def test_existing_output_needs_force(model, tmp_path):
    out = tmp_path / "q.gguf"
    out.write_bytes(b"keep me")
    res = quantize(str(model), str(out), "--type", "Q8_0")
    assert _one_error(res, 4) == [f"error: {out}: already exists", "hint: pass --force to overwrite it"]
    assert out.read_bytes() == b"keep me"
    forced = quantize(str(model), str(out), "--type", "Q8_0", "--force", "-q")
    assert forced.exit_code == 0 and forced.output == ""
    assert out.read_bytes()[:4] == b"GGUF"


def test_the_summary_says_what_keeps_the_size(tmp_path):
    """A preset whose file falls short of its default type's ratio to F16 names the tensors that keep
    it (here the untied output, which Q2_K gives more bits)."""
    model = write_model(tmp_path / "m.gguf", "llama", n_layer=1, **{**PLAIN_LLAMA, "n_vocab": 4096})
    res = runner.invoke(app, ["quantize", str(model), str(tmp_path / "o.gguf"), "--type", "Q2_K", "--dry-run",
                              "--json"])
    assert res.exit_code == 0, res.output
    size = json.loads(res.output)["size"]
    assert size["default_type"] == "Q2_K" and round(size["default_ratio_vs_f16"], 2) == 6.1
    assert size["ratio_vs_f16"] < 0.8 * size["default_ratio_vs_f16"]
    kept = size["kept_by"][0]
    assert kept["tensor"] in ("output.weight", "token_embd.weight") and kept["bytes_share"] > kept["weights_share"]
    res = runner.invoke(app, ["quantize", str(model), str(tmp_path / "o.gguf"), "--type", "Q2_K", "--dry-run"])
    assert f"kept by {kept['tensor']}" in " ".join(res.output.split())


def test_ternary_presets_say_when_the_model_is_not_ternary(tmp_path):
    import numpy as np

    from quantcli.pipelines.quantize import ternary_share

    def ternarize(name, a):
        if a.ndim != 2:
            return a
        s = np.float32(np.abs(a).mean())
        return (np.sign(a) * (np.abs(a) > 0.5 * s) * s).astype(np.float32)  # BitNet b1.58: {-s, 0, +s}

    ternary = write_model(tmp_path / "t.gguf", "llama", n_layer=1, edit=ternarize, **PLAIN_LLAMA)
    plain = write_model(tmp_path / "p.gguf", "llama", n_layer=1, **PLAIN_LLAMA)
    for model, warned in ((ternary, False), (plain, True)):
        res = runner.invoke(app, ["quantize", str(model), str(tmp_path / "o.gguf"), "--type", "TQ1_0", "--dry-run"])
        assert res.exit_code == 0, res.output
        text = " ".join(res.output.split())
        assert ("the weights are not ternary (only 0% of the sampled blocks" in text) == warned, text
        assert ("trained ternary (BitNet b1.58)" in text) == warned
    x = np.array([[0.5, -0.5, 0.0, 0.5] * 64, [0.5, 0.25, 0.0, 0.5] * 64], np.float32)
    assert ternary_share(x) == 0.5
