"""The specification's contracts, checked on the real GGML formats.

spec/001 (4-bit block quantization, FALSIFY-QUANT-001..005) is written for a symmetric 4-bit code;
Q4_0 is ggml's: blocks of 32, one fp16 scale d = max/-8, q in [-8, 7] stored as nibbles.
spec/000 (FALSIFY-QO-001): bytes strictly increase Q4_K < Q6_K < Q8_0 < F16 < F32 for the same count.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from quantcli import codecs
from quantcli.errors import UsageError
from quantcli.formats import open_model
from quantcli.pipelines import verify as vp
from tests.conftest import gguf_bytes


def _q4_0_blocks(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    blocks = data.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32) - 8  # ggml's nibble order
    return d, q


def test_quant_001_round_trip_error_bounded_by_scale():
    x = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    data = codecs.quantize(x, "Q4_0")
    d, q = _q4_0_blocks(data)
    assert q.min() >= -8 and q.max() <= 7
    back = codecs.dequantize(data, "Q4_0", x.shape)
    err = np.abs(back - x).reshape(-1, 32)
    # spec: |x - x_hat| < scale. The value of largest magnitude maps to -8 exactly; the other side can
    # reach +8 steps and is clamped to 7, so one step |d| (plus fp16 rounding of d) is the bound
    assert (err <= np.abs(d)[:, None] * (1 + 2**-9)).all()
    mse = (err ** 2).mean(axis=1)
    assert (mse <= (np.abs(d) ** 2) / 4 + 1e-9).all()  # uniform-quantization bound


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "IQ4_NL", "Q8_0", "Q6_K"])
def test_quant_002_zeros_stay_zero(qtype):
    x = np.zeros((3, 256), np.float32)
    data = codecs.quantize(x, qtype)
    assert not np.any(codecs.dequantize(data, qtype, x.shape))


def test_quant_003_blocks_quantize_independently():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 32 * 7)).astype(np.float32)
    whole = codecs.quantize(x, "Q4_0").reshape(4, 7, 18)
    for b in range(7):
        alone = codecs.quantize(x[:, 32 * b:32 * (b + 1)], "Q4_0").reshape(4, 18)
        assert np.array_equal(whole[:, b], alone)


def test_quant_004_odd_block_counts_pack_nibbles_in_place():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 32 * 3)).astype(np.float32)  # an odd number of blocks
    data = codecs.quantize(x, "Q4_0")
    assert data.shape == (1, 3 * 18)
    d, q = _q4_0_blocks(data)
    assert np.allclose(codecs.dequantize(data, "Q4_0", x.shape).reshape(-1, 32), d[:, None] * q)
    with pytest.raises(UsageError, match="divisible by its block size 32; row length is 33"):
        codecs.quantize(np.ones((1, 33), np.float32), "Q4_0")


def test_quant_005_compression_ratio():
    """FALSIFY-QUANT-005: Q4_0 stores 32 weights in 18 bytes, over 6x smaller than F32, in what
    quantcli's codecs write, not only in ggml's table."""
    x = np.random.default_rng(5).standard_normal((8, 4096)).astype(np.float32)
    q4 = codecs.quantize(x, "Q4_0")
    f32 = codecs.quantize(x, "F32")
    assert f32.nbytes == x.nbytes
    assert q4.shape == (8, codecs.get_codec("Q4_0").row_bytes(4096)) == (8, 4096 // 32 * 18)
    assert f32.nbytes / q4.nbytes == pytest.approx(32 * 4 / 18) and f32.nbytes / q4.nbytes > 6.0


ORDER = ["Q4_K", "Q6_K", "Q8_0", "F16", "F32"]
BYTES_PER_32 = [18.0, 26.25, 34.0, 64.0, 128.0]  # Q6_K is 210/256 bytes, not spec's 26/32


def test_qo_001_size_ordering_strict():
    """FALSIFY-QO-001: for the same weights, quantcli writes strictly fewer bytes for
    Q4_K < Q6_K < Q8_0 < F16 < F32, at ggml's rates."""
    x = np.random.default_rng(6).standard_normal((3, 256 * 4)).astype(np.float32)
    written = [codecs.quantize(x, t).nbytes for t in ORDER]
    assert written == [3 * codecs.get_codec(t).row_bytes(x.shape[1]) for t in ORDER]
    assert all(a < b for a, b in zip(written, written[1:]))
    assert [n * 32 / x.size for n in written] == BYTES_PER_32


def _contract_file(path):
    """A GGUF with one (2, 512) tensor of each ORDER type, quantized by quantcli's codecs."""
    x = np.random.default_rng(7).standard_normal((2, 512)).astype(np.float32)
    tensors = [(f"t.{t.lower()}", [512, 2], int(Q[t]), codecs.quantize(x, t).tobytes()) for t in ORDER]
    path.write_bytes(gguf_bytes(tensors=tensors))
    return path, tensors


def test_qo_001_verify_size_contract(tmp_path):
    """FALSIFY-QO-001 through `verify`: its size_contract check passes on a file of quantcli's
    bytes, reporting each type's bytes per parameter as the codecs wrote them."""
    path, tensors = _contract_file(tmp_path / "sizes.gguf")
    with open_model(path) as reader:
        assert [reader.tensors[name].nbytes for name, *_ in tensors] == [len(t[3]) for t in tensors]
        check = vp._size_contract(reader)
    assert check.ok, check
    assert check.figure == {t: round(len(data) / 1024, 6) for t, (*_, data) in zip(ORDER, tensors)}
    assert check.detail.startswith("bytes/param Q4_K 0.5625 < Q6_K 0.8203 < Q8_0 1.0625 < F16 2.0000")
    res = vp.run(vp.VerifyOptions(path))
    assert [(c.name, c.ok) for c in res.checks] == [("structure", True), ("finite", True),
                                                     ("size_contract", True)]


def test_qo_001_verify_refuses_a_short_tensor(tmp_path):
    """FALSIFY-QO-001: a tensor with fewer bytes than its type needs fails `verify` (at structure:
    the header is not trusted before its sizes are)."""
    path, tensors = _contract_file(tmp_path / "short.gguf")
    name, ne, qtype, data = tensors[-1]
    tensors[-1] = (name, ne, qtype, data[:-64])  # F32 (2, 512) needs 4096 bytes
    path.write_bytes(gguf_bytes(tensors=tensors))
    res = vp.run(vp.VerifyOptions(path))
    assert [(c.name, c.ok) for c in res.checks] == [("structure", False)]
    assert f"tensor '{name}' data ends at byte" in res.checks[0].detail
