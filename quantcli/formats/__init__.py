"""The format registry: `open_model(path)` picks a reader by magic bytes and layout;
`create_writer(format, path, metadata, tensors)` gives the writer of an output format."""

from __future__ import annotations

from pathlib import Path

from quantcli.errors import InputError
from quantcli.formats.base import KV, ModelReader, TensorInfo
from quantcli.formats.gguf import GGUFFile, GGUFReader
from quantcli.formats.safetensors import INDEX_NAME, SINGLE_NAME, SafetensorsFile, SafetensorsReader
from quantcli.formats.writer import Slot, TensorSpec, Writer, create_writer, writer_formats

__all__ = ["KV", "ModelReader", "TensorInfo", "GGUFReader", "SafetensorsReader",
           "GGUFFile", "SafetensorsFile", "Writer", "TensorSpec", "Slot", "create_writer",
           "writer_formats", "open_model", "detect_format"]


def detect_format(path: Path) -> str:
    """'gguf' or 'safetensors', from the first bytes of a file or the layout of a directory."""
    path = Path(path)
    if path.is_dir():
        if (path / INDEX_NAME).is_file() or (path / SINGLE_NAME).is_file():
            return "safetensors"
        raise InputError(f"{path}: directory holds neither {SINGLE_NAME} nor {INDEX_NAME}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    if not head:
        raise InputError(f"{path}: empty file")
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) == 9 and head[8:9] == b"{":  # u64 header length, then a JSON object
        return "safetensors"
    if path.suffix == ".safetensors":
        return "safetensors"  # let the reader explain what is wrong with it
    if path.suffix == ".gguf":
        return "gguf"
    raise InputError(f"{path}: not a GGUF or safetensors file (starts with {head[:4]!r})")


def open_model(path: str | Path) -> ModelReader:
    """A reader for a GGUF file, a safetensors file, or a Hugging Face model directory."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "gguf":
        return GGUFReader(path)
    return SafetensorsReader(path)
