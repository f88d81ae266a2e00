"""Optional: all-MiniLM-L6-v2 converted to F16 gives, in llama.cpp, the embeddings of the F32
original (cosine >= 0.999). Needs `llama_cpp` (llama-cpp-python) and the `all_minilm_l6_v2` package."""

from __future__ import annotations

import zipfile
from importlib.resources import files

import numpy as np
import pytest

from quantcli.pipelines import dequantize as dq

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("all_minilm_l6_v2")

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "In the beginning God created the heaven and the earth.",
             "Quantization shrinks models so they run on small machines."]


def _embed(path, text: str) -> np.ndarray:
    model = llama_cpp.Llama(model_path=str(path), embedding=True, verbose=False, n_ctx=256,
                            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    try:
        return np.asarray(model.embed(text), dtype=np.float64)
    finally:
        model.close()


def test_f16_embeddings_match_f32_in_llama_cpp(tmp_path):
    with zipfile.ZipFile(str(files("all_minilm_l6_v2").joinpath("model.zip"))) as z:
        z.extractall(tmp_path / "minilm")
    f32, f16 = tmp_path / "f32.gguf", tmp_path / "f16.gguf"
    dq.run(dq.DequantizeOptions(tmp_path / "minilm", f32, "F32"))
    dq.run(dq.DequantizeOptions(tmp_path / "minilm", f16, "F16"))
    for text in SENTENCES:
        a, b = _embed(f32, text), _embed(f16, text)
        cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        assert cos >= 0.999, (text, cos)
