"""atomic_write: the temp file in the output's directory, write-behind, rename or nothing."""

from __future__ import annotations

import os

import pytest

from quantcli.errors import OutputError
from quantcli.formats import atomic


def test_write_behind_hands_each_step_to_the_kernel_and_keeps_the_bytes(tmp_path, monkeypatch):
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(atomic, "start_writeback", lambda fd, off, n: calls.append((off, n)))
    monkeypatch.setattr(atomic._WriteBehind, "STEP", 1000)
    pieces = [os.urandom(n) for n in (10, 999, 1, 2500, 7, 300)]
    out = tmp_path / "o.bin"
    with atomic.atomic_write(out) as fh:
        for p in pieces:
            fh.write(p)
        assert fh.tell() == sum(map(len, pieces))  # everything else is the file's own
    assert out.read_bytes() == b"".join(pieces)
    assert calls == [(0, 1009), (1009, 2501)]  # contiguous ranges, each at least STEP
    assert [p.name for p in tmp_path.iterdir()] == ["o.bin"]


def test_error_leaves_nothing(tmp_path):
    out = tmp_path / "o.bin"
    with pytest.raises(RuntimeError):
        with atomic.atomic_write(out) as fh:
            fh.write(b"x" * 5000)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_start_writeback_is_harmless(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"y" * 10000)
    fd = os.open(path, os.O_RDWR)
    try:
        atomic.start_writeback(fd, 0, 10000)
        atomic.start_writeback(fd, 5000, 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"y" * 10000


def test_missing_directory_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="cannot create a file"):
        with atomic.atomic_write(tmp_path / "nope" / "o.bin"):
            pass
