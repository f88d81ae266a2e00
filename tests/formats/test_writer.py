"""The Writer protocol: layouts, whole and row-slice writes at offsets, padding, atomic publish,
partial files kept for a resume, and the registry of output formats."""

from __future__ import annotations

import errno
import os
import threading

import gguf
import numpy as np
import pytest
import safetensors.numpy

from quantcli.errors import OutputError, UsageError
from quantcli.formats import TensorSpec, Writer, create_writer, open_model, writer_formats
from quantcli.formats import writer as writer_mod


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((3, 8)).astype(np.float32),
            "b": rng.standard_normal(5).astype(np.float32),  # 20 bytes: padded to 32 in GGUF
            "c": rng.standard_normal((4, 16)).astype(np.float16)}


def _specs(arrays):
    return [TensorSpec(n, a.shape, "F16" if a.dtype == np.float16 else "F32") for n, a in arrays.items()]


def test_formats_are_registered_and_unknown_ones_listed(tmp_path):
    assert writer_formats() == ["gguf", "safetensors"]
    with pytest.raises(UsageError, match="unknown output format 'onnx'; use gguf or safetensors"):
        create_writer("onnx", tmp_path / "x", {}, [])


def test_a_second_registration_of_a_format_is_refused():
    with pytest.raises(TypeError, match="registered twice"):
        class Again(Writer, format="gguf"):
            pass


def test_gguf_written_in_any_order_reads_back_with_gguf_py(tmp_path):
    arrays = _arrays()
    out = tmp_path / "m.gguf"
    with create_writer("gguf", out, {"general.architecture": "llama", "general.name": "w"}, _specs(arrays)) as w:
        for name in reversed(arrays):  # order does not matter: every tensor has its offset
            w.write(name, arrays[name])
        assert not out.exists()  # nothing under the final name before finish
        w.finish()
    r = gguf.GGUFReader(str(out))
    got = {t.name: np.asarray(t.data) for t in r.tensors}
    for name, a in arrays.items():
        assert np.array_equal(got[name].reshape(a.shape), a)
    assert [t.name for t in r.tensors] == list(arrays)
    assert os.path.getsize(out) == w.size and w.size % 32 == 0
    assert not [p for p in tmp_path.iterdir() if p.name != "m.gguf"]


def test_row_slices_land_at_their_offsets_with_the_padding_after_the_last(tmp_path):
    arrays = _arrays(1)
    whole, sliced = tmp_path / "whole.gguf", tmp_path / "sliced.gguf"
    with create_writer("gguf", whole, {}, _specs(arrays)) as w:
        for n, a in arrays.items():
            w.write(n, a)
        w.finish()
    with create_writer("gguf", sliced, {}, _specs(arrays)) as w:
        a = arrays["a"]
        slot = w.slot("a")
        assert (slot.rows, slot.row_bytes, slot.pad) == (3, 32, 0)
        last = w.write_rows("a", 2, a[2:])
        first = w.write_rows("a", 0, a[:2])
        assert [x.size for x in first] == [64] and [x.size for x in last] == [32]
        b = w.write_rows("b", 0, arrays["b"])
        assert [x.size for x in b] == [20, 12]  # the tensor's end brings its padding
        threads = [threading.Thread(target=w.write_rows, args=("c", r, arrays["c"][r:r + 1])) for r in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        w.finish()
    assert whole.read_bytes() == sliced.read_bytes()


def test_rows_outside_the_tensor_are_refused(tmp_path):
    arrays = _arrays()
    with create_writer("gguf", tmp_path / "m.gguf", {}, _specs(arrays)) as w:
        with pytest.raises(OutputError, match="tensor 'a': 64 bytes at row 2 do not fit its 3 rows of 32 bytes"):
            w.write_rows("a", 2, arrays["a"][:2])
        with pytest.raises(OutputError, match="tensor 'zz' is not in the output's layout"):
            w.write("zz", arrays["a"])
        with pytest.raises(OutputError, match="has 16 bytes, its type needs 20"):
            w.write("b", arrays["b"][:4])


def test_finish_with_a_header_of_another_length_is_refused(tmp_path):
    arrays = _arrays()
    out = tmp_path / "m.gguf"
    with pytest.raises(OutputError, match="header's length changed"):
        with create_writer("gguf", out, {"k": "0" * 64}, _specs(arrays)) as w:
            for n, a in arrays.items():
                w.write(n, a)
            w.finish({"k": "0" * 64 + "more"})
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_final_metadata_of_the_same_length_replaces_the_draft(tmp_path):
    arrays = _arrays()
    out = tmp_path / "m.gguf"
    with create_writer("gguf", out, {"quantcli.source.sha256": "0" * 64}, _specs(arrays)) as w:
        for n, a in arrays.items():
            w.write(n, a)
        w.finish({"quantcli.source.sha256": "ab" * 32})
    with open_model(out) as m:
        assert m.meta("quantcli.source.sha256") == "ab" * 32


def test_an_error_removes_the_temporary_file_but_keeps_a_partial_one(tmp_path):
    arrays = _arrays()
    out = tmp_path / "m.gguf"
    with pytest.raises(RuntimeError):
        with create_writer("gguf", out, {}, _specs(arrays)) as w:
            w.write("a", arrays["a"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    partial = tmp_path / "m.partial"
    with pytest.raises(RuntimeError):
        with create_writer("gguf", out, {}, _specs(arrays), partial=partial) as w:
            w.write("a", arrays["a"])
            raise RuntimeError("boom")
    assert not out.exists() and partial.exists()
    with create_writer("gguf", out, {}, _specs(arrays), partial=partial) as w:  # the resume
        assert w.read(w.slot("a").offset, w.slot("a").nbytes) == arrays["a"].tobytes()
        w.write("b", arrays["b"])
        w.write("c", arrays["c"])
        w.finish()
    assert out.exists() and not partial.exists()


def test_disk_full_is_one_output_error_with_the_resume_hint_for_partials(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    arrays = _arrays()
    monkeypatch.setattr(writer_mod, "pwrite_all", full)
    with pytest.raises(OutputError, match="m.gguf: write failed: disk full") as info:
        with create_writer("gguf", tmp_path / "m.gguf", {}, _specs(arrays), partial=tmp_path / "p") as w:
            w.write("a", arrays["a"])
    assert "run the same command again" in info.value.hint
    with pytest.raises(OutputError, match="write failed: disk full") as info:
        with create_writer("gguf", tmp_path / "n.gguf", {}, _specs(arrays)) as w:
            w.write("a", arrays["a"])
    assert info.value.hint is None and sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_safetensors_output_loads_with_the_safetensors_library(tmp_path):
    arrays = _arrays(2)
    arrays["i"] = np.arange(6, dtype=np.int32).reshape(2, 3)
    specs = _specs({k: v for k, v in arrays.items() if k != "i"}) + [TensorSpec("i", (2, 3), "I32")]
    out = tmp_path / "m.safetensors"
    with create_writer("safetensors", out, {"quantcli.version": "x"}, specs) as w:
        for n in ("i", "c", "b", "a"):
            w.write(n, arrays[n])
        w.finish()
    got = safetensors.numpy.load_file(str(out))
    for n, a in arrays.items():
        assert got[n].dtype == a.dtype and np.array_equal(got[n], a)
    with open_model(out) as m:
        assert m.tensors["a"].dtype == "F32"
    n = int.from_bytes(out.read_bytes()[:8], "little")
    assert n % 8 == 0


def test_types_a_format_cannot_hold_are_refused(tmp_path):
    with pytest.raises(OutputError, match="type Q4_K, which safetensors cannot store"):
        create_writer("safetensors", tmp_path / "m.safetensors", {}, [TensorSpec("w", (2, 256), "Q4_K")])
    with pytest.raises(OutputError, match="dtype BOOL, which GGUF cannot store"):
        create_writer("gguf", tmp_path / "m.gguf", {}, [TensorSpec("w", (2, 8), "BOOL")])
    assert list(tmp_path.iterdir()) == []
