"""YAML layer profiles: rules by name/regex and layer range, errors with file:line and a remedy."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantcli import profiles
from quantcli.errors import UsageError
from quantcli.pipelines import quantize as qp

REPO = Path(__file__).resolve().parents[1]


def _profile(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


def _plan(model: Path, profile: Path):
    res = qp.run(qp.QuantizeOptions(model, model.with_name("never.gguf"), profile=profile, dry_run=True))
    return {p.info.name: p for p in res.plan}


@pytest.fixture
def model(plain_llama) -> Path:
    return plain_llama("m.gguf", n_layer=8)


def test_rules_layers_keep(model, tmp_path):
    prof = _profile(tmp_path, """\
base: Q4_K_M
rules:
  - regex: "attn_v"
    layers: "first 1/4"
    type: Q8_0
  - name: "blk.*.ffn_up.weight"
    layers: [7, "3-4"]
    type: Q6_K
  - name: "blk.*.ffn_up.weight"
    type: Q3_K
keep:
  - "output.weight"
""")
    plan = _plan(model, prof)
    assert [plan[f"blk.{i}.attn_v.weight"].type for i in range(2)] == ["Q8_0", "Q8_0"]
    assert "profile" not in plan["blk.2.attn_v.weight"].reason  # layer 2 is outside "first 1/4" of 8
    assert "p.yaml:3: rule 1" in plan["blk.0.attn_v.weight"].reason
    assert [plan[f"blk.{i}.ffn_up.weight"].type for i in (3, 4, 7)] == ["Q6_K"] * 3
    assert [plan[f"blk.{i}.ffn_up.weight"].type for i in (0, 5)] == ["Q3_K"] * 2
    assert plan["output.weight"].type == "F32" and "keep" in plan["output.weight"].reason
    assert plan["blk.0.attn_norm.weight"].type == "F32"


@pytest.mark.parametrize("name", ["attention-high-precision.yaml", "mlp-low-precision.yaml"])
def test_shipped_profiles_load_and_plan(model, name):
    plan = _plan(model, REPO / "profiles" / name)
    assert any("profile" in p.reason for p in plan.values())


@pytest.mark.parametrize(("text", "needle"), [
    ("base: Q4_K_M\nrules:\n  - regex: attn\n    type: Q9_K\n", r"p.yaml:4: unknown type 'Q9_K'"),
    ("base: Q4_K_M\nrules:\n  - regex: '(unclosed'\n    type: Q8_0\n", r"p.yaml:3: bad regex"),
    ("base: Q4_K_M\nbogus: 1\n", r"p.yaml:2: unknown key 'bogus'"),
    ("base: Q4_K_M\nrules:\n  - regex: x\n    type: Q8_0\n    colour: red\n", r"p.yaml:5: unknown rule key"),
    ("rules: []\n", r"missing 'base'"),
    ("base: Q4_K_M\nrules:\n  - type: Q8_0\n", r"p.yaml:3: rule 1 needs exactly one of"),
    ("base: Q4_K_M\nrules:\n  - regex: x\n    layers: 'middle'\n    type: Q8_0\n", r"p.yaml:4: cannot read layers"),
    ("base: NOPE\n", r"p.yaml:1: unknown"),
    ("base: Q4_K_M\nrules: [\n", r"p.yaml:\d+: invalid YAML"),
    ("a: &a [1, 2]\nb: *a\n", r"p.yaml:1: YAML anchors and aliases are not allowed"),
])
def test_profile_errors_name_file_and_line(tmp_path, text, needle):
    with pytest.raises(UsageError, match=needle):
        profiles.load(_profile(tmp_path, text))


def test_billion_laughs_is_refused_fast(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i-1}'] * 9)}]" for i in range(1, 9)]
    with pytest.raises(UsageError, match="anchors and aliases"):
        profiles.load(_profile(tmp_path, "\n".join(lines) + "\n"))


def test_block_mismatch_is_an_error_unless_fallback(plain_llama, tmp_path):
    model = plain_llama("m.gguf", n_layer=2, n_embd=96, n_ff=192, n_vocab=64)
    strict = _profile(tmp_path, "base: Q8_0\nrules:\n  - regex: attn_q\n    type: Q4_K\n")
    with pytest.raises(UsageError, match=r"p.yaml:3: type 'Q4_K' needs rows divisible by 256, tensor blk.0.attn_q.weight has 96"):
        _plan(model, strict)
    lenient = _profile(tmp_path, "base: Q8_0\nrules:\n  - regex: attn_q\n    type: Q4_K\n    fallback: true\n")
    plan = _plan(model, lenient)
    assert plan["blk.0.attn_q.weight"].type == "Q5_0" and plan["blk.0.attn_q.weight"].fallback


def test_layer_out_of_range(model, tmp_path):
    prof = _profile(tmp_path, "base: Q4_K_M\nrules:\n  - regex: attn\n    layers: 12\n    type: Q8_0\n")
    with pytest.raises(UsageError, match="layer 12 does not exist"):
        _plan(model, prof)
