"""sha256 of input files, remembered between runs.

A 1 GB model takes ~0.6 s of a core to hash, which is half of what quantizing it to Q8_0 costs; a
Makefile that turns one F32 base into several presets would pay it every time. So the digest of a
large file is kept in the user's cache directory under the file's identity as `stat` gives it:
path, device, inode, size, modification and change times (nanoseconds). Writing to a file moves
its change time, which no program can set back, so an entry never survives a change of content.
As in git's index, a file changed in the last few seconds is hashed but not remembered (a write in
the same clock tick as the hash could leave every stat field equal).

Cache directory: `$QUANTCLI_CACHE_DIR`, else `$XDG_CACHE_HOME/quantcli`, else `~/.cache/quantcli`;
entries live in its `sha256/` folder. `QUANTCLI_HASH_CACHE=0` turns remembering off. A cache that
cannot be read or written is ignored: it only ever saves time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

REMEMBER_FROM = 64 << 20  # smaller files hash in a few milliseconds: not worth an entry
SETTLED_S = 3.0  # a file must be unchanged this long before its digest is remembered
MAX_ENTRIES = 512


def file_sha256(path: Path, remember: bool = True) -> str:
    """Hex sha256 of the file's bytes; for large files, from the cache when the file is unchanged."""
    path = Path(path)
    folder = _cache_folder() if remember else None
    before = os.stat(path)
    identity = _identity(path, before)
    if folder is None or before.st_size < REMEMBER_FROM:
        return _hash(path)
    entry = folder / (hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:40] + ".json")
    known = _read_entry(entry, identity)
    if known is not None:
        return known
    digest = _hash(path)
    after = os.stat(path)
    settled = time.time() - max(after.st_mtime_ns, after.st_ctime_ns) / 1e9 > SETTLED_S
    if _identity(path, after) == identity and settled:
        _write_entry(folder, entry, identity, digest)
    return digest


def _hash(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)  # one reused buffer: no fresh pages per read
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _identity(path: Path, st: os.stat_result) -> list:
    return [os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def cache_root() -> Path:
    """quantcli's cache folder: `$QUANTCLI_CACHE_DIR`, else `$XDG_CACHE_HOME/quantcli`, else
    `~/.cache/quantcli`."""
    base = os.environ.get("QUANTCLI_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "quantcli"


def _cache_folder() -> Path | None:
    if os.environ.get("QUANTCLI_HASH_CACHE", "1").strip().lower() in ("0", "no", "off", "false"):
        return None
    return cache_root() / "sha256"


def _read_entry(entry: Path, identity: list) -> str | None:
    try:
        data = json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("identity") != identity:
        return None
    digest = data.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        return None
    try:
        int(digest, 16)
    except ValueError:
        return None
    return digest


def _write_entry(folder: Path, entry: Path, identity: list, digest: str) -> None:
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        _prune(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"identity": identity, "sha256": digest}, fh)
            os.replace(tmp, entry)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _prune(folder: Path) -> None:
    """Keep the cache small: past MAX_ENTRIES, drop the older half."""
    entries = list(folder.glob("*.json"))
    if len(entries) < MAX_ENTRIES:
        return
    entries.sort(key=lambda p: p.stat().st_mtime)
    for old in entries[: len(entries) // 2]:
        with contextlib.suppress(OSError):
            old.unlink()
