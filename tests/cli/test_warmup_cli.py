"""`quantcli warmup`: exact output shape, the error for an unknown type, and the claim it exists
for: after it, the commands compile nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from quantcli.cli.app import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_warmup_one_type_reports_what_it_did():
    res = runner.invoke(app, ["warmup", "--type", "Q8_0"])
    assert res.exit_code == 0, res.output
    # row maxima x2, the error report, Q8_0 decode, Q8_0 encode, Q8_0 encode (imatrix)
    assert re.fullmatch(r"warmed 6 entry points: \d+ kernels compiled, \d+ loaded from the "
                        r"cache, in \d+\.\d s\n(cache: .+\n)+", res.output), res.output


def test_warmup_unknown_type_lists_the_known():
    res = runner.invoke(app, ["warmup", "--type", "Q4K"])
    assert res.exit_code == 2
    assert "unknown type 'Q4K'; known: F32, F16" in res.output


# Run in a fresh interpreter: warm everything, then run the commands on a small gemma3 and list
# every kernel signature they had to add (a signature the warmup did not cover is compiled at the
# first real run, which is what the shipped cache and `quantcli warmup` are for).
SCRIPT = r"""
import json, sys
from pathlib import Path
from quantcli.pipelines import warmup
from quantcli.cli.app import app

warmup.run()
before = {id(d): set(d.overloads) for d in warmup._dispatchers()}
tmp = Path(sys.argv[1])
model, text = str(tmp / "m.gguf"), str(tmp / "text.txt")
for args in (["imatrix", model, "--text", text, "-o", str(tmp / "imat.gguf"), "--ctx", "64", "--chunks", "2"],
             ["quantize", model, str(tmp / "q4.gguf"), "--type", "Q4_K_M", "-q"],
             ["quantize", model, str(tmp / "iq2.gguf"), "--type", "IQ2_XXS", "--imatrix",
              str(tmp / "imat.gguf"), "-q"],
             ["verify", str(tmp / "q4.gguf"), "--type", "Q4_K_M"],
             ["dequantize", str(tmp / "q4.gguf"), str(tmp / "back.gguf"), "-q"]):
    try:
        app(args)
    except SystemExit as exc:
        assert not exc.code, (args, exc.code)
new = [f"{d.py_func.__module__}.{d.py_func.__name__}{sig}" for d in warmup._dispatchers()
       for sig in set(d.overloads) - before[id(d)]]
print(json.dumps(new))
"""


def test_after_warmup_the_commands_compile_nothing(tmp_path):
    from tests.models import write_model

    write_model(tmp_path / "m.gguf", "gemma3", n_layer=2, n_embd=256, n_head_kv=4, n_ff=512,
                seed=3)
    (tmp_path / "text.txt").write_text((REPO / "tests/data/engine/genesis.txt").read_text()[:4000])
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []
