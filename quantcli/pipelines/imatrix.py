"""`quantcli imatrix`: llama-imatrix's statistic through the numpy engine, layer-sequential and
checkpointed, written in llama.cpp's GGUF imatrix format or the legacy `.dat`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from quantcli import checkpoint
from quantcli.calibrate import imatrix_file
from quantcli.errors import UsageError
from quantcli.formats.atomic import check_output
from quantcli.pipelines import cluster
from quantcli.pipelines.common import ProgressFn, read_text

if TYPE_CHECKING:
    from quantcli.calibrate import imatrix as calib

DEFAULT_CHUNKS = 512
CHUNK_RANGE = (128, 1024)  # the documented calibration range (spec FR-013)


@dataclass(frozen=True)
class ImatrixRunOptions:
    model: Path
    text: Path | None
    output: Path
    chunks: int = DEFAULT_CHUNKS  # calibration chunks of `ctx` tokens
    ctx: int = 512
    output_format: str = "gguf"  # gguf | dat
    in_files: tuple[Path, ...] = ()
    process_output: bool = False
    checkpoint_dir: Path | None = None  # default: OUTPUT.checkpoints
    keep_checkpoints: bool = False
    force: bool = False
    super_weights: bool = False  # find super weights and massive activations; recorded in the GGUF
    ray: str | None = None  # blocks of chunks as Ray tasks: "default", "auto" or "ray://host:port" (cluster.py)


def run(opts: ImatrixRunOptions, progress: ProgressFn | None = None,
        warn: Callable[[str], None] | None = None) -> calib.ImatrixResult:
    from quantcli.calibrate import imatrix as calib  # the forward pass: loaded by the command that uses it

    warn = warn or (lambda _msg: None)
    fmt = opts.output_format.lower()
    if fmt not in ("gguf", "dat"):
        raise UsageError(f"unknown imatrix format '{opts.output_format}'; use gguf or dat")
    if opts.super_weights and fmt != "gguf":
        raise UsageError("--super-weights records what it finds in the GGUF imatrix format; the legacy .dat "
                         "has no room for it", hint="drop --output-format dat")
    if opts.super_weights and opts.text is None:
        raise UsageError("--super-weights needs --text: super weights are found from activations")
    if opts.chunks < 1 or opts.ctx < 1:
        raise UsageError("--chunks and --ctx must be positive")
    if not CHUNK_RANGE[0] <= opts.chunks <= CHUNK_RANGE[1]:
        warn(f"{opts.chunks} chunks is outside the recommended {CHUNK_RANGE[0]}-{CHUNK_RANGE[1]}")
    cluster.require_ray(opts.ray)
    check_output(opts.output, [opts.model] + ([opts.text] if opts.text else []), opts.force)
    text = read_text(opts.text) if opts.text is not None else None
    ckpt = opts.checkpoint_dir or checkpoint.default_dir(opts.output)
    options = calib.ImatrixOptions(ctx=opts.ctx, chunks=opts.chunks, process_output=opts.process_output,
                                   dataset=str(opts.text) if opts.text else "", in_files=tuple(opts.in_files),
                                   checkpoint_dir=ckpt, keep_checkpoints=opts.keep_checkpoints,
                                   super_weights=opts.super_weights)
    if opts.ray is not None and text is not None:
        result = cluster.imatrix(opts.model, text, options, opts.ray, progress, warn)
    else:
        result = calib.compute(opts.model, text, options, progress, warn)
    if text is not None and result.chunks < opts.chunks:
        warn(f"the text holds only {result.chunks} chunk(s) of {opts.ctx} tokens; used {result.chunks} "
             f"instead of {opts.chunks}")
    if fmt == "dat" and result.imatrix.outliers is not None:
        warn("the legacy .dat format cannot hold the super-weight records of the --in-file imatrix files; "
             "they are not in the output")
    save = imatrix_file.save_gguf if fmt == "gguf" else imatrix_file.save_legacy
    save(result.imatrix, opts.output)
    return result
