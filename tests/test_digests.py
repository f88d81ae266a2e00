"""Remembered sha256 digests: reused only for the very same, settled file."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from quantcli import digests


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("QUANTCLI_CACHE_DIR", str(folder))
    monkeypatch.delenv("QUANTCLI_HASH_CACHE", raising=False)
    monkeypatch.setattr(digests, "REMEMBER_FROM", 1)
    monkeypatch.setattr(digests, "SETTLED_S", 0.0)
    return folder / "sha256"


def settled_file(path, data: bytes):
    path.write_bytes(data)
    old = time.time() - 60
    os.utime(path, (old, old))
    return path


def test_digest_is_remembered_and_reused(cache, tmp_path, monkeypatch):
    f = settled_file(tmp_path / "m.bin", b"weights" * 1000)
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert digests.file_sha256(f) == want
    assert len(list(cache.glob("*.json"))) == 1
    monkeypatch.setattr(digests, "_hash", lambda p: pytest.fail("hashed again"))
    assert digests.file_sha256(f) == want


def test_changed_content_is_hashed_again_even_with_same_size_and_mtime(cache, tmp_path):
    f = settled_file(tmp_path / "m.bin", b"a" * 4096)
    st = f.stat()
    assert digests.file_sha256(f) == hashlib.sha256(b"a" * 4096).hexdigest()
    f.write_bytes(b"b" * 4096)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size
    assert digests.file_sha256(f) == hashlib.sha256(b"b" * 4096).hexdigest()


def test_a_file_changed_just_now_is_not_remembered(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "SETTLED_S", 3600.0)
    f = tmp_path / "m.bin"
    f.write_bytes(b"fresh" * 100)
    assert digests.file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert not cache.exists() or not list(cache.glob("*.json"))


def test_turned_off_and_small_files_leave_no_entry(cache, tmp_path, monkeypatch):
    f = settled_file(tmp_path / "m.bin", b"x" * 100)
    monkeypatch.setenv("QUANTCLI_HASH_CACHE", "0")
    assert digests.file_sha256(f) == hashlib.sha256(b"x" * 100).hexdigest()
    monkeypatch.delenv("QUANTCLI_HASH_CACHE")
    monkeypatch.setattr(digests, "REMEMBER_FROM", 1 << 20)
    digests.file_sha256(f)
    assert not cache.exists()


@pytest.mark.parametrize("content", [b"", b"not json", b'{"identity": [], "sha256": "00"}', b"[1, 2]",
                                     b'{"identity": null, "sha256": "zz"}'])
def test_a_damaged_entry_is_ignored_and_replaced(cache, tmp_path, content):
    f = settled_file(tmp_path / "m.bin", b"y" * 999)
    want = hashlib.sha256(b"y" * 999).hexdigest()
    digests.file_sha256(f)
    (entry,) = cache.glob("*.json")
    entry.write_bytes(content)
    assert digests.file_sha256(f) == want
    assert digests._read_entry(entry, digests._identity(f, f.stat())) == want


def test_a_forged_entry_for_other_identity_is_not_used(cache, tmp_path):
    f = settled_file(tmp_path / "m.bin", b"z" * 999)
    digests.file_sha256(f)
    (entry,) = cache.glob("*.json")
    text = entry.read_text()
    g = settled_file(tmp_path / "other.bin", b"w" * 999)
    digests.file_sha256(g)
    entries = sorted(cache.glob("*.json"))
    assert len(entries) == 2
    other = next(e for e in entries if e != entry)
    other.write_text(text)  # f's identity and digest under g's name
    assert digests.file_sha256(g) == hashlib.sha256(b"w" * 999).hexdigest()


def test_an_unwritable_cache_costs_nothing_but_time(cache, tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("QUANTCLI_CACHE_DIR", str(blocker))
    f = settled_file(tmp_path / "m.bin", b"q" * 999)
    assert digests.file_sha256(f) == hashlib.sha256(b"q" * 999).hexdigest()


def test_the_cache_stays_small(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "MAX_ENTRIES", 4)
    for i in range(9):
        digests.file_sha256(settled_file(tmp_path / f"m{i}.bin", bytes([i]) * 100))
    assert len(list(cache.glob("*.json"))) <= 4
