"""`quantcli dequantize`: any readable model -> F32 / F16 / BF16 as GGUF or safetensors.

Tensors stream one at a time. For GGUF output the input's metadata is copied (with `general.file_type`
set as llama.cpp's converter sets it) and provenance keys are added. As llama-quantize does for F16 and
BF16, one-dimensional tensors (norms, biases) stay F32; integer tensors are copied as they are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from quantcli import codecs
from quantcli.errors import UsageError
from quantcli.formats import ModelReader, TensorInfo, TensorSpec, create_writer, open_model
from quantcli.formats.atomic import check_output
from quantcli.pipelines.common import (Progress, ProgressFn, merge_adapters, open_source, progress_or_noop,
                                       provenance, source_sha256)

OUT_TYPES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}
FILE_TYPES = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16,
              "BF16": LlamaFileType.MOSTLY_BF16}
INTEGERS = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL"}


@dataclass(frozen=True)
class DequantizeOptions:
    input: Path
    output: Path
    out_type: str = "F32"  # F32 | F16 | BF16
    out_format: str | None = None  # gguf | safetensors; None: from the output's suffix
    force: bool = False  # overwrite an existing output
    lora: tuple = ()  # convert.lora.AdapterSpec: merged into the weights (in float32) before writing


@dataclass(frozen=True)
class DequantizeResult:
    output: Path
    out_format: str
    tensors: int
    bytes_written: int
    seconds: float


def output_format(out: Path, requested: str | None) -> str:
    if requested:
        fmt = requested.lower()
        if fmt not in ("gguf", "safetensors"):
            raise UsageError(f"unknown output format '{requested}'; use gguf or safetensors")
        return fmt
    return "safetensors" if out.suffix == ".safetensors" else "gguf"


def target_type(info: TensorInfo, out: Q, from_hf: bool = False) -> Q | None:
    """The type a tensor is written as; None: copied unchanged (integer tensors). 1-D tensors stay
    F32 in F16/BF16 output, as llama-quantize does; from a Hugging Face directory, whatever
    llama.cpp's converter keeps in F32 (norms, position and token-type embeddings, ...) stays F32."""
    if info.dtype in INTEGERS:
        return None
    if out != Q.F32:
        if len(info.shape) <= 1:
            return Q.F32
        if from_hf:
            from quantcli.convert import converter_keeps_f32

            if converter_keeps_f32(info.name, len(info.shape)):
                return Q.F32
    return out


def convert(reader: ModelReader, info: TensorInfo, qtype: Q | None) -> np.ndarray:
    """One tensor's output bytes."""
    if qtype is None:
        return np.asarray(reader.raw(info.name))
    if info.ggml_type == qtype:
        return np.asarray(reader.raw(info.name))
    x = reader.load_f32(info.name)
    return codecs.quantize(x.reshape(-1, x.shape[-1] if x.ndim else 1), qtype)


def run(opts: DequantizeOptions, progress: ProgressFn | None = None,
        warn: Callable[[str], None] | None = None) -> DequantizeResult:
    step = progress_or_noop(progress)
    out_type = opts.out_type.upper()
    if out_type not in OUT_TYPES:
        raise UsageError(f"unknown output type '{opts.out_type}'; use F32, F16 or BF16")
    fmt = output_format(opts.output, opts.out_format)
    start = time.perf_counter()
    warn = warn or (lambda _msg: None)
    with _open(opts.input, fmt, warn) as reader:
        check_output(opts.output, [opts.input] + [Path(a.path) for a in opts.lora], opts.force)
        # decoding a quantized base is what dequantize does: merging into it requantizes nothing
        reader, merged = merge_adapters(reader, opts.lora, True, warn)
        from_hf = reader.format == "hf"
        plan = [(info, target_type(info, OUT_TYPES[out_type], from_hf)) for info in reader.tensors.values()]
        meta = provenance(reader, source_sha256(reader), extra=merged)
        codecs.load_kernels(decode={i.ggml_type for i, q in plan if q is not None and i.ggml_type is not None},
                            encode={q for _, q in plan if q is not None})
        metadata = _metadata(reader, out_type, meta) if fmt == "gguf" else meta
        specs = [TensorSpec(info.name, info.shape, qtype.name if qtype is not None else info.dtype)
                 for info, qtype in plan]
        total = sum(info.nbytes for info, _ in plan)
        done = 0
        with create_writer(fmt, opts.output, metadata, specs,
                           alignment=getattr(reader, "alignment", 32)) as writer:
            for i, (info, qtype) in enumerate(plan):
                writer.write(info.name, convert(reader, info, qtype))
                done += info.nbytes
                step(Progress("tensor", i + 1, len(plan), info.name, done, total))
            writer.finish()
        written = writer.size
    return DequantizeResult(opts.output, fmt, len(plan), written, time.perf_counter() - start)


def _open(path: Path, fmt: str, warn: Callable[[str], None]) -> ModelReader:
    """GGUF output from a Hugging Face directory goes through the converter view (llama.cpp's names,
    layouts and metadata); safetensors output keeps the source's own names."""
    if fmt == "gguf":
        return open_source(path, warn)
    return open_model(path)


def _metadata(reader: ModelReader, out_type: str, provenance_keys: dict[str, Any]) -> dict[str, Any]:
    """GGUF metadata: the input's (GGUF, or the converter view's), the file type, provenance."""
    metadata: dict[str, Any] = {}
    if reader.format != "safetensors":
        metadata.update(reader.kv)
    metadata["general.file_type"] = int(FILE_TYPES[out_type])
    metadata.update(provenance_keys)
    return metadata
