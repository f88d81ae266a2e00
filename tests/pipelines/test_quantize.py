"""`quantize` end to end on small synthetic models: plan, bytes, metadata, threads, checkpoints, resume."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from quantcli import codecs
from quantcli.errors import InputError, OutputError, UsageError
from quantcli.formats import TensorInfo, open_model
from quantcli.pipelines import quantize as qp
from quantcli.pipelines import slices
from tests.models import PLAIN_LLAMA, write_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_model(tmp_path / "tiny-f32.gguf", n_layer=4, **PLAIN_LLAMA)


def test_dry_run_plan_writes_nothing(tiny, tmp_path):
    out = tmp_path / "q.gguf"
    res = qp.run(qp.QuantizeOptions(tiny, out, "Q4_K_M", dry_run=True))
    assert res.output is None and not out.exists()
    types = {p.info.name: p.type for p in res.plan}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert all(p.reason for p in res.plan)
    assert res.bytes == sum(p.nbytes for p in res.plan)
    assert res.file_type == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M


def test_quantize_bytes_equal_codec_bytes(tiny, tmp_path):
    out = tmp_path / "q.gguf"
    res = qp.run(qp.QuantizeOptions(tiny, out, "Q4_K_M", threads=1))
    assert res.output == out and not (tmp_path / "q.gguf.checkpoints").exists()
    with open_model(tiny) as src, open_model(out) as m:
        assert list(m.tensors) == list(src.tensors)
        for p in res.plan:
            raw = np.asarray(m.raw(p.info.name))
            if p.type == p.info.dtype:
                assert np.array_equal(raw, src.raw(p.info.name))
            else:
                x = src.load_f32(p.info.name)
                assert np.array_equal(raw, codecs.quantize(x, p.type).reshape(-1)), p.info.name
        assert m.meta("general.file_type") == 15 and m.meta("general.quantization_version") == 2
        assert m.meta("quantcli.preset") == "Q4_K_M"
        assert m.meta("llama.block_count") == 4


def test_threads_do_not_change_bytes(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    qp.run(qp.QuantizeOptions(tiny, a, "Q6_K", threads=1))
    qp.run(qp.QuantizeOptions(tiny, b, "Q6_K", threads=3))
    assert a.read_bytes() == b.read_bytes()


def test_small_slices_and_threads_do_not_change_bytes(tiny, tmp_path, monkeypatch):
    """Tensors cut into many slices (more than are in flight at once, so input buffers are reused)
    and quantized on several threads give the bytes of one slice per tensor on one thread."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    qp.run(qp.QuantizeOptions(tiny, a, "Q4_K_M", threads=1))
    monkeypatch.setattr(slices, "CHUNK_BYTES", 4096)  # 4 rows of 256 floats per slice
    qp.run(qp.QuantizeOptions(tiny, b, "Q4_K_M", threads=3))
    assert a.read_bytes() == b.read_bytes()


def test_slices_of_an_expert_tensor_stay_within_each_matrix():
    info = TensorInfo(name="blk.0.ffn_up_exps.weight", shape=(2, 8, 32), dtype="F32",
                      ggml_type=Q.F32, nbytes=2 * 8 * 32 * 4, offset=0)
    p = qp.PlannedTensor(info, "Q8_0", "test", 2 * 8 * 34)
    imp = np.arange(64, dtype=np.float32)
    slices = qp.slices_of(p, imp, chunk=3 * 32 * 4)
    assert [(s.start, s.stop) for s in slices] == [(0, 3), (3, 6), (6, 8), (8, 11), (11, 14), (14, 16)]
    assert all(np.array_equal(s.importance, imp[:32] if s.start < 8 else imp[32:]) for s in slices)
    assert [s.nbytes for s in slices] == [(s.stop - s.start) * 34 for s in slices]
    assert sum(s.nbytes for s in slices) == p.nbytes
    with pytest.raises(InputError, match="has 32 values, expected 64"):
        qp.slices_of(p, imp[:32])


def test_requantize_needs_flag(tiny, tmp_path):
    q = tmp_path / "q.gguf"
    qp.run(qp.QuantizeOptions(tiny, q, "Q8_0"))
    with pytest.raises(UsageError, match="requantizing from type Q8_0 is disabled"):
        qp.run(qp.QuantizeOptions(q, tmp_path / "r.gguf", "Q4_0"))
    qp.run(qp.QuantizeOptions(q, tmp_path / "r.gguf", "Q4_0", allow_requantize=True))


def test_override_kv_and_tensor_type(tiny, tmp_path):
    out = tmp_path / "q.gguf"
    qp.run(qp.QuantizeOptions(tiny, out, "Q4_K_M", tensor_types=(("attn_v", "Q8_0"),),
                              override_kv=("general.name=str:renamed", "llama.context_length=int:512")))
    with open_model(out) as m:
        assert m.tensors["blk.0.attn_v.weight"].dtype == "Q8_0"
        assert m.meta("general.name") == "renamed" and m.meta("llama.context_length") == 512
    with pytest.raises(UsageError, match="KEY=TYPE:VALUE"):
        qp.run(qp.QuantizeOptions(tiny, tmp_path / "x.gguf", "Q4_K_M", override_kv=("nonsense",)))


def test_nan_weights_are_refused_without_output(plain_llama, tmp_path):
    src = plain_llama("nan.gguf", n_layer=1)
    data = bytearray(src.read_bytes())
    with open_model(src) as m:
        off = m.tensors["blk.0.attn_q.weight"].offset
    data[off:off + 4] = np.array([np.nan], np.float32).tobytes()
    src.write_bytes(bytes(data))
    out = tmp_path / "q.gguf"
    with pytest.raises(Exception, match="blk.0.attn_q.weight.*non-finite"):
        qp.run(qp.QuantizeOptions(src, out, "Q4_K_M"))
    assert not out.exists()


def test_output_exists_and_same_as_input(tiny, tmp_path):
    with pytest.raises(OutputError, match="is the input"):
        qp.run(qp.QuantizeOptions(tiny, tiny, "Q8_0", force=True))
    with pytest.raises(InputError):
        qp.run(qp.QuantizeOptions(tmp_path / "missing.gguf", tmp_path / "o.gguf", "Q8_0"))


def test_resume_reuses_checkpoints(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    ref = tmp_path / "ref.gguf"
    qp.run(qp.QuantizeOptions(tiny, ref, "Q4_K_M"))
    out = tmp_path / "o.gguf"
    calls = {"n": 0}
    real = qp.slices_of

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(qp, "slices_of", dying)
    with pytest.raises(KeyboardInterrupt):
        qp.run(qp.QuantizeOptions(tiny, out, "Q4_K_M"))
    assert not out.exists() and (tmp_path / "o.gguf.checkpoints" / "manifest.json").exists()
    monkeypatch.setattr(qp, "slices_of", real)
    res = qp.run(qp.QuantizeOptions(tiny, out, "Q4_K_M"))
    assert res.resumed_units >= 1
    assert out.read_bytes() == ref.read_bytes()


def test_disk_full_is_an_output_error_and_the_rerun_resumes(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    ref = tmp_path / "ref.gguf"
    qp.run(qp.QuantizeOptions(tiny, ref, "Q4_K_M"))
    real, calls = os.pwrite, {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    out = tmp_path / "o.gguf"
    monkeypatch.setattr(qp.os, "pwrite", pwrite)
    with pytest.raises(OutputError, match="write failed: disk full") as info:
        qp.run(qp.QuantizeOptions(tiny, out, "Q4_K_M", threads=2))
    assert "finished layers are kept" in info.value.hint and not out.exists()
    monkeypatch.setattr(qp.os, "pwrite", real)
    res = qp.run(qp.QuantizeOptions(tiny, out, "Q4_K_M"))
    assert res.resumed_units >= 1 and out.read_bytes() == ref.read_bytes()


def _eio(*args, **kwargs):
    raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize("where, match", [
    ("tensor read", "tiny-f32.gguf: reading tensor '.*' failed: Input/output error"),
    ("input hash", "tiny-f32.gguf: cannot read it to hash it: Input/output error"),
])
def test_input_read_errors_are_input_errors(tiny, tmp_path, monkeypatch, where, match):
    if where == "tensor read":
        monkeypatch.setattr(os, "preadv", _eio)
    else:
        monkeypatch.setattr(qp, "file_sha256", _eio)
    out = tmp_path / "o.gguf"
    with pytest.raises(InputError, match=match):
        qp.run(qp.QuantizeOptions(tiny, out, "Q8_0"))
    assert not out.exists()


def test_checkpoint_from_other_plan_is_not_used(tiny, tmp_path):
    out = tmp_path / "o.gguf"
    ck = tmp_path / "ck"
    qp.run(qp.QuantizeOptions(tiny, out, "Q4_K_M", checkpoint_dir=ck, keep_checkpoints=True))
    warnings: list[str] = []
    res = qp.run(qp.QuantizeOptions(tiny, out, "Q6_K", checkpoint_dir=ck, force=True), warn=warnings.append)
    assert res.resumed_units == 0 and any("different" in w for w in warnings)


def _cli(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "quantcli", "quantize", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO)


def test_sigkill_at_random_moments_then_resume_is_byte_identical(plain_llama, tmp_path):
    """SIGKILL a real run at 20 random moments; after each the output is absent or complete, and
    the final, resumed file equals an uninterrupted run byte for byte."""
    src = plain_llama("src.gguf", n_layer=8, n_ff=768)
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    ref = tmp_path / "ref.gguf"
    t0 = time.perf_counter()
    p = _cli(str(src), str(ref), "--type", "Q4_K_M", "-q", env=env)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    full = time.perf_counter() - t0
    expected = ref.read_bytes()
    out = tmp_path / "out.gguf"
    rng = random.Random(1234)
    for _ in range(20):
        p = _cli(str(src), str(out), "--type", "Q4_K_M", "-q", "--force", env=env)
        time.sleep(rng.uniform(0.0, full))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        assert not out.exists() or out.read_bytes() == expected
        if out.exists():
            out.unlink()
    p = _cli(str(src), str(out), "--type", "Q4_K_M", "-q", env=env)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    assert out.read_bytes() == expected
    assert not (tmp_path / "out.gguf.checkpoints").exists()
