"""Seeded Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 checkpoints against llama.cpp's converter.

`tests/data/convert/<name>.json` holds what `convert_hf_to_gguf.py --outtype f32|f16` wrote for each
checkpoint of `checkpoints.py` (see `make_refs.py`): every metadata key and every tensor's sha256.
The view plus the converter's F32 rule must give the same file, key by key and byte for byte.
"""

from __future__ import annotations

import json

import pytest

from quantcli.convert import hf_to_gguf_view
from quantcli.formats import SafetensorsReader
from tests.convert.checkpoints import DATA, SPECS, build, record_gguf, write_converted


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_matches_llama_cpp_converter(name, outtype, checkpoints, tmp_path):
    ref = json.loads((DATA / "convert" / f"{name}.json").read_text())
    d = checkpoints / name
    if not d.exists():
        build(name, checkpoints)
    with hf_to_gguf_view(SafetensorsReader(d)) as view:
        out = write_converted(view, tmp_path / f"{name}.gguf", outtype)
    kv, tensors = record_gguf(out)
    assert sorted(kv) == sorted(ref["kv"])
    for key, want in ref["kv"].items():
        assert kv[key] == want, key
    assert list(tensors) == list(ref["tensors"][outtype])  # the converter's order too
    for tname, want in ref["tensors"][outtype].items():
        assert tensors[tname] == want, tname
