"""A corpus of crafted bad files: each gives one clear line naming the file and the problem, exit
code 3, no traceback, no output file — quickly and in little memory (run as a real process)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from quantcli.errors import InputError
from quantcli.formats import open_model
from tests.conftest import f32_tensor, gguf_bytes, gguf_string, safetensors_bytes

U32, STR, ARR, U64 = 4, 8, 9, 10
GOOD = [f32_tensor("a.weight", 2, 32), f32_tensor("b.weight", 2, 32)]
ARCH = ("general.architecture", STR, gguf_string("llama"))


def _truncated() -> bytes:
    return gguf_bytes([ARCH], GOOD)[:-100]


def _huge_string_kv() -> bytes:
    return gguf_bytes([("k", STR, struct.pack("<Q", 1 << 40) + b"x")])


def _huge_array() -> bytes:
    return gguf_bytes([("k", ARR, struct.pack("<IQ", U32, 1 << 50))])


def _huge_string_array() -> bytes:
    return gguf_bytes([("k", ARR, struct.pack("<IQ", STR, 1 << 40))])


GGUF_CASES = {
    "empty": (lambda: b"", "empty file"),
    "wrong-magic": (lambda: b"GGML" + b"\0" * 60, "bad magic"),
    "version-1": (lambda: gguf_bytes(version=1), "unsupported version 1"),
    "version-99": (lambda: gguf_bytes(version=99), "unsupported version 99"),
    "big-endian": (lambda: gguf_bytes(version=3 << 16), "big-endian"),
    "header-cut": (lambda: gguf_bytes([ARCH])[:30], "truncated or corrupt"),
    "kv-count-huge": (lambda: gguf_bytes([ARCH], n_kv=1 << 62), "metadata count"),
    "tensor-count-huge": (lambda: gguf_bytes([ARCH], n_tensors=1 << 60), "tensor count"),
    "string-past-end": (_huge_string_kv, "remain"),
    "array-past-end": (_huge_array, "claims"),
    "string-array-past-end": (_huge_string_array, "claims"),
    "bad-value-type": (lambda: gguf_bytes([("k", 77, b"\0" * 8)]), "unknown value type 77"),
    "n-dims-5": (lambda: gguf_bytes([], [("t", [32, 1, 1, 1, 1], 0, b"\0" * 128)]), "5 dimensions"),
    "n-dims-0": (lambda: gguf_bytes([], [("t", [], 0, b"")]), "0 dimensions"),
    "unknown-type": (lambda: gguf_bytes([], [("t", [32], 4, b"\0" * 64)]), "unknown type 4"),
    "shape-overflow": (lambda: gguf_bytes([], [("t", [32, 1 << 40, 1 << 40], 0, b"")]), "overflows"),
    "row-not-divisible": (lambda: gguf_bytes([], [("t", [33], 8, b"\0" * 34)]), "not a multiple"),
    "alignment-not-pow2": (lambda: gguf_bytes([("general.alignment", U32, struct.pack("<I", 48))], GOOD),
                           "power of two"),
    "alignment-zero": (lambda: gguf_bytes([("general.alignment", U32, struct.pack("<I", 0))], GOOD),
                       "power of two"),
    "offset-misaligned": (lambda: gguf_bytes([], GOOD, offsets=[0, 260]), "not aligned"),
    "offset-overlap": (lambda: gguf_bytes([], GOOD, offsets=[0, 0]), "not where the previous"),
    "offset-past-end": (lambda: gguf_bytes([], GOOD, offsets=[0, 1 << 40]), "expected"),
    "data-truncated": (_truncated, "past the end of the file"),
    "duplicate-key": (lambda: gguf_bytes([ARCH, ARCH]), "duplicate metadata key"),
    "duplicate-tensor": (lambda: gguf_bytes([], [GOOD[0], GOOD[0]]), "duplicate tensor name"),
}

_T = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
ST_CASES = {
    "st-header-cap": (lambda: struct.pack("<Q", 1 << 40) + b"{}", "exceeds"),
    "st-header-past-end": (lambda: safetensors_bytes(header={}, header_len=5000), "past the end"),
    "st-short": (lambda: b"\x05\0\0", "too short"),
    "st-bad-json": (lambda: struct.pack("<Q", 5) + b"{oops", "not valid JSON"),
    "st-not-object": (lambda: safetensors_bytes(header=[1, 2]), "not a JSON object"),
    "st-unknown-dtype": (lambda: safetensors_bytes(header={"t": {**_T, "dtype": "F12"}}, data=b"\0" * 16),
                         "unknown dtype"),
    "st-span-mismatch": (lambda: safetensors_bytes(header={"t": {**_T, "data_offsets": [0, 12]}},
                                                   data=b"\0" * 12), "needs 16"),
    "st-gap": (lambda: safetensors_bytes(header={"t": {**_T, "data_offsets": [4, 20]}}, data=b"\0" * 20),
               "gap"),
    "st-overlap": (lambda: safetensors_bytes(header={"a": _T, "b": _T}, data=b"\0" * 16), "overlaps"),
    "st-trailing": (lambda: safetensors_bytes(header={"t": _T}, data=b"\0" * 20), "trailing bytes"),
    "st-truncated": (lambda: safetensors_bytes(header={"t": _T}, data=b"\0" * 10), "truncated"),
    "st-bad-shape": (lambda: safetensors_bytes(header={"t": {**_T, "shape": [-1, 2]}}, data=b"\0" * 16),
                     "non-negative"),
    "st-bad-metadata": (lambda: safetensors_bytes(header={"__metadata__": {"a": 1}}), "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_corpus_raises(tmp_path, case):
    make, needle = GGUF_CASES[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(make())
    with pytest.raises(InputError, match=needle) as info:
        open_model(path).close()
    assert str(path) in str(info.value)


@pytest.mark.parametrize("case", sorted(ST_CASES))
def test_safetensors_corpus_raises(tmp_path, case):
    make, needle = ST_CASES[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(make())
    with pytest.raises(InputError, match=needle) as info:
        open_model(path).close()
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_model(tmp_path / "nope.gguf")


def test_directory_without_weights(tmp_path):
    with pytest.raises(InputError, match="neither model.safetensors"):
        open_model(tmp_path)


def test_sharded_index_names_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "x.safetensors"}}))
    with pytest.raises(InputError, match="no such file"):
        open_model(tmp_path)


def test_sharded_index_lists_absent_tensor(tmp_path):
    (tmp_path / "s1.safetensors").write_bytes(safetensors_bytes({"a": np.zeros(4, np.float32)}))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(InputError, match="'b' is listed"):
        open_model(tmp_path)


# Runs the CLI and records the process's own peak memory (VmHWM: its address space's high-water mark;
# ru_maxrss would include the parent's size, inherited across fork+exec on Linux).
_WITH_PEAK = """
import atexit, runpy, sys
out = sys.argv.pop(1)
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(out, "w").write(line.split()[1])
atexit.register(peak)
sys.argv[0] = "quantcli"
runpy.run_module("quantcli", run_name="__main__")
"""


def test_corpus_as_processes(tmp_path):
    """Through the real CLI: one error line naming the file, exit 3, no traceback, no output file,
    each under 2 s, all under 300 MB."""
    cases = {**{f"{k}.gguf": v for k, v in GGUF_CASES.items()},
             **{f"{k}.safetensors": v for k, v in ST_CASES.items()}}
    slow, fat = [], []
    for name, (make, _needle) in sorted(cases.items()):
        bad = tmp_path / name
        bad.write_bytes(make())
        out = tmp_path / f"{name}.out.gguf"
        t0 = time.perf_counter()
        hwm = tmp_path / f"{name}.hwm"
        proc = subprocess.run([sys.executable, "-c", _WITH_PEAK, str(hwm), "dequantize", str(bad), str(out)],
                              capture_output=True, text=True, timeout=60)
        stderr = proc.stderr
        elapsed = time.perf_counter() - t0
        if elapsed > 2.0:
            slow.append((name, round(elapsed, 2)))
        peak_kb = int(hwm.read_text())
        if peak_kb / 1024 > 300:
            fat.append((name, peak_kb // 1024))
        assert proc.returncode == 3, (name, stderr)
        assert "Traceback" not in stderr, name
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], (name, lines)
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}.tmp-*")), name
    assert not slow, f"slower than 2 s: {slow}"
    assert not fat, f"over 300 MB: {fat}"
