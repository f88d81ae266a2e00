"""Checkpoint store: used only when key and hash agree; damaged or foreign checkpoints are recomputed."""

from __future__ import annotations

import json

from quantcli.checkpoint import CheckpointStore


def _store(tmp_path, key=None, log=None):
    return CheckpointStore(tmp_path / "ck", key or {"input": "a", "plan": "p"}, (log if log is not None else []).append)


def test_put_get_round_trip(tmp_path):
    s = _store(tmp_path)
    with s.put("0000-blk0") as fh:
        fh.write(b"hello")
        fh.write(memoryview(b" world"))
    again = _store(tmp_path)
    path = again.get("0000-blk0")
    assert path is not None and path.read_bytes() == b"hello world"
    assert again.get("0001-blk1") is None


def test_foreign_key_is_not_used(tmp_path):
    s = _store(tmp_path)
    with s.put("u") as fh:
        fh.write(b"x")
    log: list[str] = []
    other = _store(tmp_path, {"input": "b", "plan": "p"}, log)
    assert other.get("u") is None
    assert log and "different input" in log[0]


def test_damaged_unit_is_recomputed(tmp_path):
    s = _store(tmp_path)
    with s.put("u") as fh:
        fh.write(b"abcdef")
    s.path("u").write_bytes(b"abcdeX")
    log: list[str] = []
    again = _store(tmp_path, log=log)
    assert again.get("u") is None and "sha256" in log[0]
    assert "u" not in json.loads((tmp_path / "ck" / "manifest.json").read_text())["units"]


def test_corrupt_manifest_is_ignored(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "manifest.json").write_text("{not json")
    log: list[str] = []
    s = _store(tmp_path, log=log)
    assert s.units == {} and "unreadable" in log[0]


def test_extra_survives_and_remove_cleans(tmp_path):
    s = _store(tmp_path)
    s.set_extra(date="2026-01-01T00:00:00Z")
    with s.put("u") as fh:
        fh.write(b"x")
    assert _store(tmp_path).extra == {"date": "2026-01-01T00:00:00Z"}
    s.remove()
    assert not (tmp_path / "ck").exists()
