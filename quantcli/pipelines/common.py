"""Pieces every pipeline shares: source fingerprints, provenance metadata, progress events."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import gguf

import quantcli
from quantcli.digests import file_sha256  # noqa: F401  (re-exported)
from quantcli.formats import ModelReader, open_model
from quantcli.progress import Progress, ProgressFn, progress_or_noop  # noqa: F401  (re-exported)


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


def run_date() -> str:
    """Now, or SOURCE_DATE_EPOCH when set (reproducible builds), as recorded in `quantcli.date`."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def kept_date(store: Any, date: str | None = None) -> str:
    """The `quantcli.date` a checkpoint store keeps for its run: the first run's, else `date` (or
    now), recorded so that a resumed run writes the bytes the first would have."""
    kept = store.extra.get("date") or date or run_date()
    if store.extra.get("date") != kept:
        store.set_extra(date=kept)
    return kept


def provenance(reader: ModelReader, source_hash: str, date: str | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """`quantcli.*` keys recorded in every file quantcli writes; `extra` adds `quantcli.<key>`."""
    meta: dict[str, Any] = {
        "quantcli.version": quantcli.__version__,
        "quantcli.gguf_version": gguf_version(),
        "quantcli.source.file": reader.path.name,
        "quantcli.source.sha256": source_hash,
        "quantcli.date": date or run_date(),
    }
    meta.update({f"quantcli.{k}": v for k, v in (extra or {}).items() if v is not None})
    return meta


def read_text(path: Path) -> str:
    """A calibration or evaluation text as llama.cpp reads it: the file's bytes as UTF-8, with no
    newline translation."""
    from quantcli.errors import InputError

    try:
        return Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such text file") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None


def gguf_version() -> str:
    from importlib.metadata import version

    return getattr(gguf, "__version__", None) or version("gguf")


def open_source(path: Path, warn: Callable[[str], None]) -> ModelReader:
    """The input as a GGUF-shaped model: Hugging Face directories through the converter view."""
    reader = open_model(path)
    if reader.format != "safetensors":
        return reader
    if getattr(reader, "config", None):
        from quantcli.convert import hf_to_gguf_view

        return hf_to_gguf_view(reader)
    warn(f"{path}: no config.json: tensors keep their own names and llama.cpp will not be able to "
         "run the output")
    return reader


def merge_adapters(reader: ModelReader, adapters: tuple, allow_requantize: bool,
                   warn: Callable[[str], None]) -> tuple[ModelReader, dict[str, Any]]:
    """`reader` with LoRA `adapters` (convert.lora.AdapterSpec) merged, and the provenance to
    record (`quantcli.lora`: each adapter's file, sha256, scale, alpha and rank); unchanged without."""
    if not adapters:
        return reader, {}
    import json

    from quantcli.convert import lora

    view = lora.merged(reader, list(adapters), allow_requantize, warn)
    return view, {"lora": json.dumps(view.provenance(), sort_keys=True)}

