"""Pieces every pipeline shares: source fingerprints, provenance metadata, progress events."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import gguf

import quantcli
from quantcli.formats import ModelReader


@dataclass(frozen=True)
class Progress:
    """One step of a long run: `done` of `total` units (tensors, layers, chunks) and bytes so far."""

    stage: str  # "tensor", "layer", "chunk", ...
    done: int
    total: int
    name: str = ""
    bytes_done: int = 0
    bytes_total: int = 0


ProgressFn = Callable[[Progress], None]


def _noop(_: Progress) -> None:
    pass


def progress_or_noop(progress: ProgressFn | None) -> ProgressFn:
    return progress or _noop


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
