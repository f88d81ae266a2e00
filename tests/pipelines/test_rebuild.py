"""`verify --rebuild-from`: a file is remade from its source with the recipe it records, byte for
byte; a missing or changed input is named."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.formats import open_model
from tests.conftest import DATA
from tests.models import write_model

runner = CliRunner()
REPO = DATA.parents[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rebuild")
    base = write_model(tmp / "base.gguf", "gemma3", n_layer=2, n_embd=256, n_head_kv=4, n_ff=512, seed=3)
    text = (DATA / "engine" / "genesis.txt").read_text()
    for name, part in (("a", text[:4000]), ("b", text[4000:8000])):
        (tmp / f"{name}.txt").write_text(part)
        res = runner.invoke(app, ["imatrix", str(base), "--text", str(tmp / f"{name}.txt"), "-o",
                                  str(tmp / f"im-{name}.gguf"), "--ctx", "64", "--chunks", "2"])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["quantize", str(base), str(tmp / "q4.gguf"), "--type", "Q4_K_M", "--imatrix",
                              str(tmp / "im-a.gguf"), "--tensor-type", "ffn_down=Q6_K", "--override-kv",
                              "general.name=str:rebuilt", "-q"])
    assert res.exit_code == 0, res.output
    shutil.copy(REPO / "profiles" / "attention-high-precision.yaml", tmp / "attention-high-precision.yaml")
    res = runner.invoke(app, ["quantize", str(base), str(tmp / "prof.gguf"), "--profile",
                              str(tmp / "attention-high-precision.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    return tmp, base


def _rebuild(file, *args):
    res = runner.invoke(app, ["verify", str(file), *args, "--json"])
    check = {c["name"]: c for c in json.loads(res.output)["checks"]}["rebuild"]
    return res.exit_code, check["detail"]


def test_a_preset_file_with_flags_and_an_imatrix_rebuilds_identically(made):
    tmp, base = made
    with open_model(tmp / "q4.gguf") as r:
        recipe = json.loads(r.meta("quantcli.recipe"))
    assert recipe["preset"] == "Q4_K_M" and recipe["tensor_types"] == [["ffn_down", "Q6_K"]]
    assert recipe["imatrix_statistics_sha256"] and recipe["override_kv"] == ["general.name=str:rebuilt"]
    code, detail = _rebuild(tmp / "q4.gguf", "--rebuild-from", str(base))
    assert code == 0 and "identical bytes" in detail


def test_a_profile_file_rebuilds_with_its_profile_beside_it_or_given(made, tmp_path):
    tmp, base = made
    code, detail = _rebuild(tmp / "prof.gguf", "--rebuild-from", str(base))
    assert code == 0 and "identical bytes" in detail
    edited = tmp_path / "p.yaml"
    edited.write_text((tmp / "attention-high-precision.yaml").read_text() + "\n# edited\n")
    code, detail = _rebuild(tmp / "prof.gguf", "--rebuild-from", str(base), "--profile", str(edited))
    assert code == 6 and "the profile differs" in detail


def test_a_changed_or_missing_imatrix_and_another_source_are_named(made):
    tmp, base = made
    code, detail = _rebuild(tmp / "q4.gguf", "--rebuild-from", str(base), "--imatrix", str(tmp / "im-b.gguf"))
    assert code == 6 and detail.startswith("the imatrix differs: ") and "im-b.gguf" in detail
    code, detail = _rebuild(tmp / "q4.gguf", "--rebuild-from", str(tmp / "prof.gguf"))
    assert code == 6 and detail.startswith("the source differs: prof.gguf") and "base.gguf" in detail
    (tmp / "im-a.gguf").rename(tmp / "im-a.moved")
    try:
        code, detail = _rebuild(tmp / "q4.gguf", "--rebuild-from", str(base))
        assert code == 6 and "needs the imatrix it was made with" in detail and "--imatrix FILE" in detail
        code, detail = _rebuild(tmp / "q4.gguf", "--rebuild-from", str(base), "--imatrix", str(tmp / "im-a.moved"))
        assert code == 0
    finally:
        (tmp / "im-a.moved").rename(tmp / "im-a.gguf")


def test_a_file_without_a_recipe(made):
    tmp, base = made
    code, detail = _rebuild(base, "--rebuild-from", str(base))
    assert code == 6 and "records no recipe" in detail
    res = runner.invoke(app, ["verify", str(base), "--imatrix", str(tmp / "im-a.gguf")])
    assert res.exit_code == 2 and "pass --rebuild-from SOURCE" in " ".join(res.output.split())
