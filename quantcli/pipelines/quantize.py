"""`quantcli quantize`: a plan (preset rules, profile rules, overrides) executed tensor by tensor,
layer by layer, with a checkpoint after every layer and an atomic output.

Order of work: open the input (GGUF, safetensors, or a Hugging Face directory seen as GGUF) -> load
and filter the imatrix -> plan every tensor's type with a reason -> (dry run: stop) -> quantize each
unit (a layer's run of tensors) in slices of rows straight into the partial output file, recording
the unit's sha256 in the checkpoint manifest -> write the header -> publish atomically -> remove the
checkpoints.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

import quantcli
from quantcli import checkpoint, codecs, presets
from quantcli.calibrate import imatrix_file
from quantcli.errors import InputError, OutputError, QuantcliError, UsageError
from quantcli.formats import ModelReader, TensorInfo
from quantcli.formats.gguf import gguf_layout, type_nbytes
from quantcli.formats.atomic import atomic_write, check_output, describe, start_writeback
from quantcli.formats.base import KV
from quantcli.pipelines.common import (Progress, ProgressFn, file_sha256, gguf_version, open_source,
                                       progress_or_noop, provenance, quick_fingerprint, run_date,
                                       source_sha256)
from quantcli.pipelines.report import layer_of

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION


@dataclass(frozen=True)
class QuantizeOptions:
    input: Path
    output: Path
    preset: str | None = None  # a llama.cpp preset name (Q4_K_M, IQ4_XS, ...) or a type name
    profile: Path | None = None  # a YAML layer profile (its base replaces --type)
    imatrix: Path | None = None
    include_weights: tuple[str, ...] = ()  # imatrix entries to use (substring match)
    exclude_weights: tuple[str, ...] = ()  # imatrix entries to ignore (substring match)
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    tensor_types: tuple[tuple[str, str], ...] = ()  # (regex, type); first match wins
    pure: bool = False  # every quantizable tensor gets the default type
    leave_output_tensor: bool = False
    allow_requantize: bool = False
    override_kv: tuple[str, ...] = ()  # KEY=TYPE:VALUE
    dry_run: bool = False
    checkpoint_dir: Path | None = None  # default: OUTPUT.checkpoints beside the output
    keep_checkpoints: bool = False
    threads: int = 0  # 0: all cores
    force: bool = False


@dataclass(frozen=True)
class PlannedTensor:
    info: TensorInfo
    type: str  # the output type name
    reason: str
    nbytes: int
    fallback: bool = False

    @property
    def copy(self) -> bool:
        return self.type == self.info.dtype


@dataclass(frozen=True)
class QuantizeResult:
    output: Path | None  # None for a dry run
    plan: list[PlannedTensor]
    params: int
    bytes: int  # tensor data bytes
    bpw: float
    file_type: int
    fallbacks: int
    resumed_units: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": "quantcli.quantize/1",
            "output": str(self.output) if self.output else None,
            "dry_run": self.output is None,
            "tensors": [{"name": p.info.name, "shape": list(p.info.shape), "from": p.info.dtype,
                         "type": p.type, "bytes": p.nbytes, "reason": p.reason} for p in self.plan],
            "params": self.params, "bytes": self.bytes, "bpw": round(self.bpw, 4),
            "file_type": self.file_type, "fallbacks": self.fallbacks,
            "resumed_units": self.resumed_units, "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
        }


# -- the plan ------------------------------------------------------------------------------------


def _tensor_bytes(info: TensorInfo, type_name: str) -> int:
    if type_name == info.dtype:
        return info.nbytes
    return type_nbytes(GGMLQuantizationType[type_name], info.gguf_shape)


def make_plan(reader: ModelReader, opts: QuantizeOptions, imatrix: imatrix_file.Imatrix | None,
              warn: Callable[[str], None]) -> tuple[presets.Preset, list[PlannedTensor], str, int]:
    """Every tensor's output type and why; the profile (if any) overrides the preset's choice."""
    profile = None
    preset_name = opts.preset
    if opts.profile is not None:
        from quantcli import profiles

        profile = profiles.load(opts.profile)
        preset_name = preset_name or profile.base
    if not preset_name:
        raise UsageError("no quantization type given", hint="pass --type PRESET (e.g. Q4_K_M) or --profile FILE")
    preset = presets.get_preset(preset_name)
    options = presets.PresetOptions(
        pure=opts.pure, leave_output_tensor=opts.leave_output_tensor,
        output_tensor_type=opts.output_tensor_type, token_embedding_type=opts.token_embedding_type,
        tensor_types=tuple(opts.tensor_types), has_imatrix=bool(imatrix and imatrix.entries),
        imatrix_names=frozenset(imatrix.entries) if imatrix else None, dry_run=opts.dry_run,
    )
    infos = list(reader.tensors.values())
    choices = presets.plan(infos, reader.meta, preset.name, options)
    if profile is not None:
        choices = profile.apply(infos, choices, reader.meta)
    requant = presets.requantized(infos, choices)
    if requant and not opts.allow_requantize:
        first = reader.tensors[requant[0].name]
        raise UsageError(f"{opts.input}: requantizing from type {first.dtype} is disabled "
                         f"({len(requant)} tensor(s), e.g. {first.name}); requantizing loses quality",
                         hint="pass --allow-requantize to do it anyway, or start from an F32/F16/BF16 model")
    if opts.dry_run:
        for c in choices:
            if c.requires_imatrix and not (imatrix and imatrix.entries):
                warn(f"{c.name} ({c.type}) will require an importance matrix (--imatrix)")
                break
    planned = [PlannedTensor(info, c.type, c.reason, _tensor_bytes(info, c.type), c.fallback)
               for info, c in zip(infos, choices)]
    fallbacks = presets.fallback_count(choices)
    if fallbacks:
        warn(f"{fallbacks} of {len(planned)} tensor(s) required fallback quantization (rows not "
             "divisible by the type's block size)")
    plan_doc = json.dumps([(p.info.name, p.info.dtype, list(p.info.shape), p.type) for p in planned])
    plan_hash = hashlib.sha256(plan_doc.encode()).hexdigest()
    return preset, planned, plan_hash, presets.file_type(preset, infos, reader.meta)


# -- metadata --------------------------------------------------------------------------------------


def parse_override_kv(spec: str) -> tuple[str, KV]:
    """llama.cpp's KEY=TYPE:VALUE with TYPE int, float, bool or str."""
    key, sep, rest = spec.partition("=")
    kind, sep2, value = rest.partition(":")
    if not sep or not sep2 or not key:
        raise UsageError(f"--override-kv '{spec}' is not KEY=TYPE:VALUE", hint="e.g. general.name=str:my-model")
    try:
        if kind == "int":
            return key, KV(GGUFValueType.INT64, int(value))
        if kind == "float":
            return key, KV(GGUFValueType.FLOAT64, float(value))
        if kind == "bool":
            if value not in ("true", "false"):
                raise ValueError(value)
            return key, KV(GGUFValueType.BOOL, value == "true")
        if kind == "str":
            return key, KV(GGUFValueType.STRING, value)
    except ValueError:
        raise UsageError(f"--override-kv '{spec}': '{value}' is not a valid {kind}") from None
    raise UsageError(f"--override-kv '{spec}': unknown type '{kind}'", hint="use int, float, bool or str")


def output_metadata(reader: ModelReader, opts: QuantizeOptions, preset: presets.Preset, ftype: int,
                    imatrix: imatrix_file.Imatrix | None, source_hash: str, plan_hash: str,
                    date: str) -> dict[str, Any]:
    meta: dict[str, Any] = dict(reader.kv)
    meta["general.quantization_version"] = KV(GGUFValueType.UINT32, QUANTIZATION_VERSION)
    meta["general.file_type"] = KV(GGUFValueType.UINT32, int(ftype))
    if imatrix is not None and opts.imatrix is not None:
        meta["quantize.imatrix.file"] = KV(GGUFValueType.STRING, str(opts.imatrix)[:127])
        if imatrix.datasets:
            meta["quantize.imatrix.dataset"] = KV(GGUFValueType.STRING, imatrix.datasets[0][:127])
        meta["quantize.imatrix.entries_count"] = KV(GGUFValueType.INT32, len(imatrix.entries))
        meta["quantize.imatrix.chunks_count"] = KV(GGUFValueType.INT32, int(imatrix.chunk_count))
    for spec in opts.override_kv:
        key, kv = parse_override_kv(spec)
        meta[key] = kv
    profile = Path(opts.profile) if opts.profile is not None else None
    meta.update(provenance(reader, source_hash, date, {
        "preset": preset.name, "plan.sha256": plan_hash,
        "profile": profile.name if profile else None,
        "profile.sha256": _file_hash(profile),
    }))
    return meta


# -- execution -------------------------------------------------------------------------------------


def units_of(plan: list[PlannedTensor]) -> list[tuple[str, list[PlannedTensor]]]:
    """Contiguous runs of tensors in file order that belong to the same layer (or to none)."""
    units: list[tuple[str, list[PlannedTensor]]] = []
    last: object = object()
    for p in plan:
        layer = layer_of(p.info.name)
        if layer != last or not units:
            label = f"{len(units):04d}-" + (f"blk{layer}" if layer is not None else "misc")
            units.append((label, []))
            last = layer
        units[-1][1].append(p)
    return units


CHUNK_BYTES = 8 << 20  # float32 input per slice of rows (less with many threads): memory is slices, not tensors
IN_FLIGHT_BYTES = 128 << 20  # all slices in flight together, with many threads


def window_of(n_threads: int) -> int:
    """Slices in flight: enough that the workers stay busy through a layer's small tensors."""
    return 2 * n_threads + 2


def chunk_bytes(n_threads: int) -> int:
    """Input bytes per slice: CHUNK_BYTES, smaller where a window of slices would pass IN_FLIGHT_BYTES."""
    return min(CHUNK_BYTES, max(1 << 20, IN_FLIGHT_BYTES // window_of(n_threads)))


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of a tensor (seen as (rows, row length)) and where their output goes."""

    p: PlannedTensor
    start: int
    stop: int
    importance: np.ndarray | None  # the imatrix row of the slice's matrix (experts have one each)
    offset: int  # of the slice's bytes in the output file
    nbytes: int  # of the slice's output
    pad: int = 0  # zero bytes after it (the tensor's last slice: up to the file's alignment)


def slices_of(p: PlannedTensor, importance: np.ndarray | None, offset: int, pad: int,
              chunk: int = CHUNK_BYTES) -> list[Slice]:
    """The tensor in slices of at most `chunk` bytes of float32 input, never across two matrices of
    a 3-D (expert) tensor, with each slice's place in the output (the tensor's starts at `offset`;
    the last slice carries the `pad` zero bytes that follow it). Rows are quantized independently,
    so the bytes do not depend on where the slices are cut."""
    info = p.info
    cols = info.shape[-1] if info.shape else 1
    n_rows = info.n_params // max(cols, 1)
    rows_per_mat = info.shape[-2] if len(info.shape) >= 2 else 1
    n_mat = max(n_rows // max(rows_per_mat, 1), 1)  # experts in a 3-D tensor
    row_out = info.row_bytes if p.copy else codecs.get_codec(p.type).row_bytes(cols)
    if n_rows * row_out != p.nbytes:
        raise OutputError(f"tensor '{info.name}': {n_rows} rows of {row_out} bytes, its type needs {p.nbytes}")
    per_mat_imp = None
    if importance is not None and not p.copy:
        if importance.size != cols * n_mat:
            raise InputError(f"imatrix entry for '{info.name}' has {importance.size} values, "
                             f"expected {cols * n_mat}")
        per_mat_imp = importance.reshape(n_mat, cols)
    step = max(1, chunk // (4 * max(cols, 1)))
    out = []
    for m in range(n_mat):
        imp = per_mat_imp[m] if per_mat_imp is not None else None
        for a in range(m * rows_per_mat, (m + 1) * rows_per_mat, step):
            b = min(a + step, (m + 1) * rows_per_mat)
            out.append(Slice(p, a, b, imp, offset + a * row_out, (b - a) * row_out))
    if not out:  # no rows: the slice writes only the padding
        out.append(Slice(p, 0, 0, None, offset, 0))
    out[-1] = replace(out[-1], pad=pad)
    return out


def read_slice(reader: ModelReader, s: Slice, buf: np.ndarray | None = None) -> np.ndarray:
    """The slice's input: stored bytes for a tensor that is copied, float32 rows otherwise (into
    `buf` where the reader copies; valid until `buf` is reused)."""
    try:
        if s.p.copy:
            return reader.raw_rows(s.p.info.name, s.start, s.stop, buf)
        return reader.load_rows(s.p.info.name, s.start, s.stop, buf)
    except QuantcliError as exc:
        raise type(exc)(f"tensor '{s.p.info.name}': {exc.message}", exc.hint) from None
    except OSError as exc:
        raise InputError(f"{reader.path}: reading tensor '{s.p.info.name}' failed: {describe(exc)}") from None


def encode_slice(s: Slice, x: np.ndarray) -> np.ndarray:
    """The slice's output bytes from its input (`read_slice`)."""
    try:
        out = x if s.p.copy else codecs.quantize(x, s.p.type, s.importance)
    except QuantcliError as exc:
        raise type(exc)(f"tensor '{s.p.info.name}': {exc.message}", exc.hint) from None
    out = out.reshape(-1).view(np.uint8)
    if out.size != s.nbytes:
        raise OutputError(f"tensor '{s.p.info.name}': rows {s.start}-{s.stop} gave {out.size} bytes, "
                          f"expected {s.nbytes}")
    return out


def run(opts: QuantizeOptions, progress: ProgressFn | None = None,
        warn: Callable[[str], None] | None = None) -> QuantizeResult:
    step = progress_or_noop(progress)
    warnings: list[str] = []

    def warn_(msg: str) -> None:
        warnings.append(msg)
        if warn:
            warn(msg)

    start = time.perf_counter()
    # the full sha256 of a large input takes a while (~0.6 s of a core per GB): a single file
    # starts hashing on a thread now, while the interpreter opens, plans and loads its kernels
    early_hash = (_Background(file_sha256, Path(opts.input))
                  if not opts.dry_run and Path(opts.input).is_file() else None)
    with open_source(opts.input, warn_) as reader:
        if not opts.dry_run:
            check_output(opts.output, [opts.input], opts.force)
        imatrix = None
        if opts.imatrix is not None:
            imatrix = imatrix_file.load(opts.imatrix).filtered(list(opts.include_weights),
                                                               list(opts.exclude_weights))
        preset, plan, plan_hash, ftype = make_plan(reader, opts, imatrix, warn_)
        params = sum(p.info.n_params for p in plan)
        nbytes = sum(p.nbytes for p in plan)
        summary = dict(plan=plan, params=params, bytes=nbytes, bpw=8.0 * nbytes / max(params, 1),
                       file_type=ftype, fallbacks=sum(p.fallback for p in plan))
        if opts.dry_run:
            return QuantizeResult(output=None, seconds=time.perf_counter() - start,
                                  warnings=warnings, **summary)
        resumed = _execute(reader, opts, preset, ftype, plan, plan_hash, imatrix, step, warn_,
                           early_hash or _Background(source_sha256, reader))
    return QuantizeResult(output=opts.output, resumed_units=resumed,
                          seconds=time.perf_counter() - start, warnings=warnings, **summary)


def _execute(reader, opts, preset, ftype, plan, plan_hash, imatrix, step, warn, source_hash) -> int:
    """Quantize unit by unit straight into `output.partial` in the checkpoint directory, at the
    offsets the plan fixes; after each unit, record its byte range and sha256 in the
    manifest. A re-run verifies the recorded ranges and does only the rest. At the end the header
    is written and the file renamed onto the output (copied, if the checkpoint directory is on
    another file system)."""
    ckpt_dir = opts.checkpoint_dir or checkpoint.default_dir(opts.output)
    # the source's sha256 (`source_hash`, a _Background) is still being computed: the checkpoint
    # key uses a quick fingerprint (sizes, mtimes, inodes, tensor index) instead
    key = {"input": quick_fingerprint(reader), "plan_sha256": plan_hash, "quantcli": quantcli.__version__,
           "gguf": gguf_version(), "imatrix_sha256": _file_hash(opts.imatrix),
           "override_kv": list(opts.override_kv), "profile_sha256": _file_hash(opts.profile)}
    checkpoint.ensure_dir(ckpt_dir)
    store = checkpoint.CheckpointStore(ckpt_dir, key, warn)
    date = store.extra.get("date") or run_date()  # a resumed run keeps its first timestamp
    if store.extra.get("date") != date:
        store.set_extra(date=date)

    alignment = getattr(reader, "alignment", 32)
    tensors = [(p.info.name, p.info.shape, GGMLQuantizationType[p.type]) for p in plan]
    # the provenance hash is not known yet; a placeholder of the same length fixes the layout
    draft = output_metadata(reader, opts, preset, ftype, imatrix, "0" * 64, plan_hash, date)
    header, layout, data_size = gguf_layout(draft, tensors, alignment)
    start_of = {p.info.name: len(header) + off for p, (off, _) in zip(plan, layout)}
    padded = {p.info.name: -(-n // alignment) * alignment for p, (_, n) in zip(plan, layout)}

    codecs.load_kernels(decode={p.info.ggml_type for p in plan if not p.copy and p.info.ggml_type is not None},
                        encode={p.type for p in plan if not p.copy}, weighted=imatrix is not None)
    partial = ckpt_dir / PARTIAL
    if not store.units and partial.exists():
        partial.unlink()  # left by a run whose checkpoints were not usable
    n_threads = opts.threads or os.cpu_count() or 1
    chunk = chunk_bytes(n_threads)
    total_in = sum(p.info.nbytes for p in plan)
    done = {"in": 0, "n": 0, "resumed": 0}

    def tensor_done(p: PlannedTensor) -> None:
        done["in"] += p.info.nbytes
        done["n"] += 1
        step(Progress("tensor", done["n"], len(plan), p.info.name, done["in"], total_in))

    def unit_done(label: str, start: int, size: int, digest: Any) -> None:
        # no fsync per unit: after a crash the recorded sha256 is checked before reuse
        store.record(label, {"start": start, "bytes": size, "sha256": digest.hexdigest()})

    try:
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            os.ftruncate(fd, len(header) + data_size)
            pipe = _Pipeline(fd, n_threads, chunk)
            try:
                for label, group in units_of(plan):
                    first = start_of[group[0].info.name]
                    if _unit_intact(fd, store, label, first):
                        done["resumed"] += 1
                        for p in group:
                            pipe.then(functools.partial(tensor_done, p))
                        continue
                    digest = hashlib.sha256()
                    for p in group:
                        imp = imatrix.importance(p.info.name) if imatrix is not None and not p.copy else None
                        start = start_of[p.info.name]
                        for s in slices_of(p, imp, start, padded[p.info.name] - p.nbytes, chunk):
                            buf = pipe.buffer()
                            pipe.submit(functools.partial(_write_slice, fd, s, read_slice(reader, s, buf)),
                                        digest, buf)
                        reader.release(p.info.name)
                        pipe.then(functools.partial(tensor_done, p))
                    pipe.then(functools.partial(unit_done, label, first,
                                                sum(padded[p.info.name] for p in group), digest))
                pipe.drain()
            finally:
                pipe.close()
            digest = _source_digest(source_hash, opts.input)
            meta = output_metadata(reader, opts, preset, ftype, imatrix, digest, plan_hash, date)
            final_header, _, _ = gguf_layout(meta, tensors, alignment)
            if len(final_header) != len(header):
                raise OutputError(f"{opts.output}: internal error: header length changed")
            _pwrite_all(fd, final_header, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:  # the partial file: disk full, quota, I/O error (reads are InputErrors)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        raise OutputError(f"{opts.output}: write failed: {describe(exc)}",
                          "free space and run the same command again: finished layers are kept"
                          if full else None) from None
    publish(partial, opts.output)
    if not opts.keep_checkpoints:
        store.remove()
    elif not partial.exists():
        store.forget_units()  # the data moved to the output; keep only the manifest's key
    return done["resumed"]


PARTIAL = "output.partial"


class _Pipeline:
    """Slices in flight. The caller reads each slice (in order, into one of `window` reusable
    buffers) and submits it; `n_threads` workers encode it and write it at its offset; one more
    thread feeds the written bytes, in order, to their unit's digest. At most `window` slices are
    in flight, so memory is `window` slices whatever the model. `then` runs a callback on the
    caller's thread once everything submitted before it is written and hashed."""

    def __init__(self, fd: int, n_threads: int, chunk: int) -> None:
        self.window = window_of(n_threads)
        self.free = [np.empty(chunk, np.uint8) for _ in range(self.window)]
        self.pending: collections.deque = collections.deque()  # [hash future, buffer, callbacks]
        self.workers = ThreadPoolExecutor(n_threads, thread_name_prefix="quantize")
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="quantize-hash")

    def buffer(self) -> np.ndarray:
        """A free input buffer (after retiring the oldest slices while the window is full)."""
        while not self.free or len(self.pending) >= self.window:
            self._retire()
        return self.free.pop()

    def submit(self, work: Callable[[], tuple[np.ndarray, ...]], digest: Any,
               buf: np.ndarray | None = None) -> None:
        """Run `work` (it writes bytes and returns them) on a worker; hash its bytes in order;
        give `buf` back once they are hashed."""
        written = self.workers.submit(work)
        self.pending.append((self.hasher.submit(_hash_when_written, written, digest), buf, []))

    def then(self, callback: Callable[[], None]) -> None:
        if self.pending:
            self.pending[-1][2].append(callback)
        else:
            callback()

    def _retire(self) -> None:
        hashed, buf, callbacks = self.pending.popleft()
        hashed.result()  # raises what the worker raised
        if buf is not None:
            self.free.append(buf)
        for callback in callbacks:
            callback()

    def drain(self) -> None:
        while self.pending:
            self._retire()

    def close(self) -> None:
        """Drop queued work (after an error or Ctrl-C) and wait for the running slices."""
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.hasher.shutdown(wait=True, cancel_futures=True)
        self.workers.shutdown(wait=True)


def _hash_when_written(written: Any, digest: Any) -> None:
    for data in written.result():
        digest.update(data)


def _write_slice(fd: int, s: Slice, x: np.ndarray) -> tuple[np.ndarray, ...]:
    """Encode and write the slice (and its padding); returns the bytes written, in order."""
    out = encode_slice(s, x)
    _pwrite_all(fd, out, s.offset)
    written: tuple[np.ndarray, ...] = (out,)
    if s.pad:
        written = (out, np.zeros(s.pad, np.uint8))
        _pwrite_all(fd, written[1], s.offset + s.nbytes)
    start_writeback(fd, s.offset, s.nbytes + s.pad)  # so the final fsync has little left to do
    return written


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _unit_intact(fd: int, store: checkpoint.CheckpointStore, label: str, start: int) -> bool:
    """The unit is recorded for this key and its bytes in the partial file still hash right."""
    entry = store.units.get(label)
    if entry is None:
        return False
    if entry.get("start") == start:
        digest, left, pos = hashlib.sha256(), entry["bytes"], start
        while left > 0:
            block = os.pread(fd, min(left, 8 << 20), pos)
            if not block:
                break
            digest.update(block)
            left -= len(block)
            pos += len(block)
        if left == 0 and digest.hexdigest() == entry["sha256"]:
            return True
    store.log(f"checkpointed unit {label} fails its sha256 check; recomputing it")
    store.drop(label)
    return False


def publish(partial: Path, output: Path) -> None:
    """Rename the finished file onto the output; across file systems, copy it atomically."""
    try:
        os.replace(partial, output)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise OutputError(f"{output}: cannot move the finished file into place: {exc.strerror}") from None
        with atomic_write(output) as out, open(partial, "rb") as src:
            shutil.copyfileobj(src, out, 16 << 20)
        partial.unlink()
        return
    with contextlib.suppress(OSError):
        dfd = os.open(output.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class _Background:
    """fn(*args) on a daemon thread (an interrupted run does not wait for it at exit)."""

    def __init__(self, fn: Callable, *args: Any) -> None:
        import threading

        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _source_digest(source_hash: _Background, path: Path) -> str:
    """The input's sha256 from its thread; a read error there is the input's, not the output's."""
    try:
        return source_hash.result()
    except OSError as exc:
        raise InputError(f"{path}: cannot read it to hash it: {describe(exc)}") from None


def _file_hash(path: Path | None) -> str | None:
    return file_sha256(Path(path)) if path is not None else None


