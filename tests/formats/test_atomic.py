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


def test_ctrl_c_while_a_temp_file_is_made_removes_it(tmp_path, monkeypatch):
    """A SIGINT between mkstemp's open and the caller's cleanup is held, the file removed, and
    KeyboardInterrupt raised once the file is known."""
    import signal
    import tempfile

    real = tempfile.mkstemp

    def interrupted(*args, **kwargs):
        made = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # arrives before mkstemp's caller has the name
        return made

    monkeypatch.setattr(tempfile, "mkstemp", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_write(tmp_path / "out.bin") as fh:
            fh.write(b"never")
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_stray_temps_are_removed_and_published_ones_forgotten(tmp_path):
    fd, stray = atomic.create_temp(tmp_path / "a.bin")
    os.close(fd)
    fd, done = atomic.create_temp(tmp_path / "b.bin")
    os.close(fd)
    atomic.publish(tmp_path / os.path.basename(done), tmp_path / "b.bin", durable=False)
    atomic.remove_stray_temps()  # what the CLI does on Ctrl-C
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin"]
    assert stray not in atomic._LIVE and done not in atomic._LIVE
