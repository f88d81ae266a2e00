"""`dequantize`: exact F32 against llama.cpp's own conversion; atomic, non-clobbering output."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from quantcli.errors import OutputError
from quantcli.formats import open_model
from quantcli.pipelines import dequantize as dq
from tests.conftest import DATA


def test_real_model_f32_matches_llama_cpp(real_f32):
    """Every tensor of the F32 base equals llama-quantize's F32 conversion (sha256 per tensor)."""
    ref = json.loads((DATA / "reference" / "gemma3-270m" / "F32.json").read_text())["tensors"]
    with open_model(real_f32) as m:
        assert len(m.tensors) == len(ref) == 236
        for name, info in m.tensors.items():
            assert info.dtype == ref[name]["type"] and list(info.gguf_shape) == ref[name]["shape"], name
            assert hashlib.sha256(m.raw(name)).hexdigest() == ref[name]["sha256"], name
        assert m.meta("general.file_type") == 0
        assert m.meta("quantcli.source.file") == "gemma-3-270m-q4_k_m.gguf"
        assert m.meta("tokenizer.ggml.model") == "llama"


@pytest.mark.parametrize("out_type", ["F16", "BF16"])
def test_half_types_keep_1d_in_f32(tiny_gguf, tmp_path, out_type):
    out = tmp_path / "o.gguf"
    dq.run(dq.DequantizeOptions(tiny_gguf, out, out_type))
    with open_model(tiny_gguf) as src, open_model(out) as m:
        assert m.tensors["blk.0.attn_norm.weight"].dtype == "F32"
        assert m.tensors["blk.0.attn_q.weight"].dtype == out_type
        x = src.load_f32("blk.0.attn_q.weight")
        y = m.load_f32("blk.0.attn_q.weight")
        assert np.abs(x - y).max() <= np.abs(x).max() * (2**-8 if out_type == "BF16" else 2**-11)


def test_safetensors_output_round_trips(tiny_gguf, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "o.safetensors"
    dq.run(dq.DequantizeOptions(tiny_gguf, out))
    loaded = load_file(out)  # the safetensors library itself reads it
    with open_model(tiny_gguf) as src:
        for name in src.tensors:
            assert np.array_equal(loaded[name], src.load_f32(name))


def test_refuses_to_clobber_and_to_overwrite_input(tiny_gguf, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        dq.run(dq.DequantizeOptions(tiny_gguf, out))
    assert out.read_bytes() == b"keep me"
    dq.run(dq.DequantizeOptions(tiny_gguf, out, force=True))
    assert out.read_bytes()[:4] == b"GGUF"
    link = tmp_path / "hard.gguf"
    os.link(tiny_gguf, link)
    before = tiny_gguf.read_bytes()
    with pytest.raises(OutputError, match="is the input"):
        dq.run(dq.DequantizeOptions(tiny_gguf, link, force=True))
    assert tiny_gguf.read_bytes() == before


def test_error_mid_write_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    out = tmp_path / "o.gguf"
    calls = {"n": 0}
    real = dq.convert

    def failing(reader, info, qtype):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(reader, info, qtype)

    monkeypatch.setattr(dq, "convert", failing)
    with pytest.raises(KeyboardInterrupt):
        dq.run(dq.DequantizeOptions(tiny_gguf, out))
    assert not out.exists() and os.listdir(tmp_path) == ["tiny.gguf"]


def test_sigint_leaves_nothing(real_model, tmp_path):
    """Ctrl-C in the middle of a real run: exit 130, no file under the final name, no temp file."""
    out = tmp_path / "o.gguf"
    # SIGINT back to its default in the child: a test run started in the background of a
    # non-interactive shell (`cmd &`) inherits SIGINT ignored, and Python then installs no handler
    proc = subprocess.Popen([sys.executable, "-m", "quantcli", "dequantize", str(real_model), str(out)],
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".o.gguf.tmp-*")):
        time.sleep(0.01)
    # at once: the temporary file exists, so the run is writing
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.glob(".o.gguf.tmp-*"))


def test_disk_full_is_a_clean_output_error(tiny_gguf, tmp_path, monkeypatch):
    import errno

    from quantcli.formats import writer

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "pwrite_all", full)
    out = tmp_path / "o.gguf"
    with pytest.raises(OutputError, match="disk full"):
        dq.run(dq.DequantizeOptions(tiny_gguf, out))
    assert not out.exists() and os.listdir(tmp_path) == ["tiny.gguf"]


def test_output_permissions_follow_umask(tiny_gguf, tmp_path):
    out = tmp_path / "o.gguf"
    dq.run(dq.DequantizeOptions(tiny_gguf, out))
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
