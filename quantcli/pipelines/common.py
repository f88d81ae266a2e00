"""Pieces every pipeline shares: source fingerprints, provenance metadata, progress events."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gguf

import quantcli
from quantcli.formats import ModelReader
from quantcli.progress import Progress, ProgressFn, progress_or_noop  # noqa: F401  (re-exported)


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_sha256(reader: ModelReader) -> str:
    """sha256 of the source file; for a model directory, of its weight files' hashes in name order."""
    path = reader.path
    if path.is_file():
        return file_sha256(path)
    files = sorted({f.path for f in getattr(reader, "_files", {}).values()})
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def quick_fingerprint(reader: ModelReader) -> dict[str, Any]:
    """Identity of the source without reading all of it (for checkpoint keys): each file's name,
    size, mtime and inode, and a hash of the tensor index (names, types, shapes, offsets)."""
    path = reader.path
    files = [path] if path.is_file() else sorted({f.path for f in getattr(reader, "_files", {}).values()})
    stats = []
    for f in files:
        st = f.stat()
        stats.append([f.name, st.st_size, st.st_mtime_ns, st.st_ino])
    index = hashlib.sha256(repr([(t.name, t.dtype, t.shape, t.offset, t.nbytes)
                                 for t in reader.tensors.values()]).encode()).hexdigest()
    return {"files": stats, "index_sha256": index}


def provenance(reader: ModelReader, source_hash: str, **extra: Any) -> dict[str, Any]:
    """`quantcli.*` keys recorded in every file quantcli writes."""
    meta: dict[str, Any] = {
        "quantcli.version": quantcli.__version__,
        "quantcli.gguf_version": getattr(gguf, "__version__", None) or _gguf_version(),
        "quantcli.source.file": reader.path.name,
        "quantcli.source.sha256": source_hash,
        "quantcli.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    meta.update({f"quantcli.{k}": v for k, v in extra.items() if v is not None})
    return meta


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")
