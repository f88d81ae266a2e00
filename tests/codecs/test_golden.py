"""Every golden case, every type, with and without importance: ggml's bytes, block for block.

The vectors in tests/data/golden were made with ggml's `ggml_quantize_chunk` (see its README).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quantcli import codecs

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
CASES = [(case, key) for case, spec in sorted(MANIFEST.items()) for key in spec["types"]]


@pytest.fixture(scope="module")
def golden():
    cache: dict[str, dict[str, np.ndarray]] = {}

    def load(case: str) -> dict[str, np.ndarray]:
        if case not in cache:
            with np.load(GOLDEN / f"{case}.npz") as z:
                cache[case] = {k: z[k] for k in z.files}
        return cache[case]

    return load


@pytest.mark.parametrize(("case", "key"), CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_quantize_matches_ggml(golden, case, key):
    data = golden(case)
    qtype, _, weighted = key.partition("__")
    importance = data["importance"] if weighted else None
    out = codecs.quantize(data["x"], qtype, importance)
    expect = data[key]
    assert out.shape == expect.shape
    codec = codecs.get_codec(qtype)
    blocks_out = out.reshape(-1, codec.type_size)
    blocks_ref = expect.reshape(-1, codec.type_size)
    same = (blocks_out == blocks_ref).all(axis=1)
    assert same.all(), f"{same.size - same.sum()} of {same.size} blocks differ (first {np.argmin(same)})"


@pytest.mark.parametrize(("case", "key"), [c for c in CASES if "__" not in c[1]])
def test_dequantize_inverts(golden, case, key):
    data = golden(case)
    x = data["x"]
    back = codecs.dequantize(data[key], key, x.shape)
    assert back.shape == x.shape and back.dtype == np.float32
    assert np.isfinite(back).all()
