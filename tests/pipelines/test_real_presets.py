"""The real model through every llama.cpp preset: each tensor's type and sha256 equal what
llama-quantize wrote (tests/data/reference/gemma3-270m, made from the same F32 base), with and
without the reference imatrix."""

from __future__ import annotations

import hashlib
import json

import pytest

from quantcli.formats import open_model
from quantcli.pipelines import quantize as qp
from tests.conftest import DATA

REF = DATA / "reference" / "gemma3-270m"
CASES = sorted(p.stem for p in REF.glob("*.json") if p.stem not in ("F32",))


@pytest.mark.parametrize("case", CASES)
def test_matches_llama_quantize(real_f32, tmp_path, case):
    ref = json.loads((REF / f"{case}.json").read_text())
    preset = case.removesuffix("_imatrix")
    out = tmp_path / f"{case}.gguf"
    opts = qp.QuantizeOptions(real_f32, out, preset,
                              imatrix=REF / "imatrix-genesis.gguf" if case.endswith("_imatrix") else None)
    qp.run(opts)
    with open_model(out) as m:
        assert m.meta("general.file_type") == ref["file_type"]
        assert len(m.tensors) == len(ref["tensors"])
        wrong = []
        for name, want in ref["tensors"].items():
            info = m.tensors[name]
            if info.dtype != want["type"] or hashlib.sha256(m.raw(name)).hexdigest() != want["sha256"]:
                wrong.append(f"{name} ({info.dtype} vs {want['type']})")
        assert not wrong, f"{len(wrong)} tensors differ: {wrong[:5]}"
