"""`verify`: every check passes on a faithful file and fails, with exit code 6, on a wrong one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.formats import open_model
from quantcli.pipelines import quantize as qp
from quantcli.pipelines import verify as vp
from tests.models import PLAIN_LLAMA, write_model

runner = CliRunner()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    d = tmp_path_factory.mktemp("v")
    src = write_model(d / "src.gguf", n_layer=2, **PLAIN_LLAMA)
    out = d / "q4km.gguf"
    qp.run(qp.QuantizeOptions(src, out, "Q4_K_M"))
    return out


def test_all_checks_pass(quantized):
    res = vp.run(vp.VerifyOptions(quantized, "Q4_K_M"))
    names = [c.name for c in res.checks]
    assert names == ["structure", "plan", "bpw", "file_type", "finite", "size_contract"]
    assert res.ok, [c for c in res.checks if not c.ok]
    contract = next(c for c in res.checks if c.name == "size_contract")
    assert contract.figure == {"Q4_K": 0.5625, "Q6_K": 0.820312, "Q8_0": 1.0625, "F16": 2.0, "F32": 4.0}


def test_cli_json_and_exit_codes(quantized):
    ok = runner.invoke(app, ["verify", str(quantized), "--type", "Q4_K_M", "--json"])
    assert ok.exit_code == 0
    doc = json.loads(ok.output)
    assert doc["schema"] == "quantcli.verify/1" and doc["ok"] is True
    bad = runner.invoke(app, ["verify", str(quantized), "--type", "Q8_0"])
    assert bad.exit_code == 6
    assert "FAIL  plan" in bad.output and "verification failed: plan, bpw, file_type" in bad.output


def test_structure_failure(tmp_path, quantized):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(quantized.read_bytes()[:-5000])
    res = runner.invoke(app, ["verify", str(cut), "--json"])
    assert res.exit_code == 6
    doc = json.loads(res.output)
    assert doc["checks"][0]["name"] == "structure" and not doc["checks"][0]["ok"]
    assert "truncated" in doc["checks"][0]["detail"]


def test_non_finite_weights_fail(plain_llama):
    src = plain_llama("src.gguf", n_layer=1)
    data = bytearray(src.read_bytes())
    with open_model(src) as m:
        off = m.tensors["blk.0.ffn_up.weight"].offset
    data[off:off + 4] = np.array([np.inf], np.float32).tobytes()
    src.write_bytes(bytes(data))
    res = vp.run(vp.VerifyOptions(src))
    finite = next(c for c in res.checks if c.name == "finite")
    assert not finite.ok and "blk.0.ffn_up.weight" in finite.detail
