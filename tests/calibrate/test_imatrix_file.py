"""imatrix files: llama.cpp's GGUF and legacy formats read, written and turned into importance."""

from __future__ import annotations

import numpy as np
import pytest

from quantcli.calibrate import imatrix_file as imf
from quantcli.errors import InputError
from tests.conftest import DATA

REF = DATA / "reference" / "gemma3-270m" / "imatrix-genesis.gguf"


def test_reads_llama_imatrix_output():
    m = imf.load(REF)
    assert len(m.entries) == 126 and m.chunk_count == 64 and m.chunk_size == 512
    assert m.datasets == ["text/genesis.txt"]
    # the golden codec vectors took their importance from this file the way llama-quantize does
    with np.load(DATA / "golden" / "real_attn_q_640.npz") as z:
        assert np.array_equal(m.importance("blk.0.attn_q.weight"), z["importance"])


@pytest.mark.parametrize("fmt", ["gguf", "legacy"])
def test_round_trip(tmp_path, fmt):
    rng = np.random.default_rng(0)
    src = imf.Imatrix(
        entries={"blk.0.ffn_up.weight": imf.ImatrixEntry(rng.random((1, 64), dtype=np.float32) * 100,
                                                         np.array([512.0], np.float32)),
                 "blk.0.exps.weight": imf.ImatrixEntry(rng.random((4, 32), dtype=np.float32),
                                                       np.array([10, 0, 3, 7], np.float32))},
        datasets=["text.txt"], chunk_count=1, chunk_size=512)
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "m.dat")
    (imf.save_gguf if fmt == "gguf" else imf.save_legacy)(src, out)
    back = imf.load(out)
    assert back.is_legacy == (fmt == "legacy") and back.datasets == ["text.txt"]
    assert back.chunk_count == 1
    for name in src.entries:
        want = src.importance(name)
        got = back.importance(name)
        if fmt == "gguf":
            assert np.array_equal(got, want)
        else:  # legacy stores sum/count*ncall in float32, then divides by ncall
            zero = np.repeat(src.entries[name].counts == 0, src.entries[name].sums.shape[1])
            assert np.allclose(got[~zero], want[~zero], rtol=1e-6)


def test_filters_like_llama_quantize():
    m = imf.load(REF)
    only = m.filtered(include=["attn_v"], exclude=[])
    assert only.entries and all("attn_v" in n for n in only.entries)
    without = m.filtered(include=[], exclude=["ffn_"])
    assert without.entries and not any("ffn_" in n for n in without.entries)


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="no such imatrix"):
        imf.load(tmp_path / "none.dat")
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"\x05\x00\x00\x00\x10\x00")
    with pytest.raises(InputError, match="too small"):
        imf.load(bad)
    bad.write_bytes(b"\x01\x00\x00\x00" + b"\x64\x00\x00\x00" + b"abc" + b"\x00" * 12)
    with pytest.raises(InputError, match="truncated legacy"):
        imf.load(bad)
