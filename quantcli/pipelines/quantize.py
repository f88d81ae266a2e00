"""`quantcli quantize`: a plan (preset rules, profile rules, overrides) executed tensor by tensor,
layer by layer, with a checkpoint after every layer and an atomic output.

Order of work: open the input (GGUF, safetensors, or a Hugging Face directory seen as GGUF) -> load
and filter the imatrix -> plan every tensor's type with a reason -> (dry run: stop) -> quantize each
unit (a layer's run of tensors) in slices of rows straight into the partial output file, recording
the unit's sha256 in the checkpoint manifest -> write the header -> publish atomically -> remove the
checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGUFValueType

import quantcli
from quantcli import checkpoint, codecs
from quantcli import plan as plan_mod
from quantcli.calibrate import imatrix_file
from quantcli.errors import InputError
from quantcli.formats import ModelReader, TensorSpec, Writer, create_writer
from quantcli.formats.atomic import check_output, describe
from quantcli.formats.base import KV, parse_override_kv
from quantcli.names import layer_of
from quantcli.pipelines.common import (Progress, ProgressFn, file_sha256, gguf_version, open_source,
                                       progress_or_noop, provenance, quick_fingerprint, run_date,
                                       source_sha256)
from quantcli.pipelines.slices import Pipeline, chunk_bytes, read_slice, slices_of, write_slice
from quantcli.plan import Plan, PlannedTensor, PlanOptions
from quantcli.progress import collect_warnings

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


def plan_options(opts: QuantizeOptions) -> PlanOptions:
    return PlanOptions(preset=opts.preset, profile=opts.profile, output_tensor_type=opts.output_tensor_type,
                       token_embedding_type=opts.token_embedding_type, tensor_types=tuple(opts.tensor_types),
                       pure=opts.pure, leave_output_tensor=opts.leave_output_tensor,
                       allow_requantize=opts.allow_requantize, dry_run=opts.dry_run, source=opts.input)


def make_plan(reader: ModelReader, opts: QuantizeOptions, imatrix: imatrix_file.Imatrix | None,
              warn: Callable[[str], None] | None = None) -> Plan:
    """The plan for this run's flags, with or without the (filtered) importance matrix."""
    return plan_mod.make_plan(reader, plan_options(opts), has_imatrix=bool(imatrix and imatrix.entries),
                              imatrix_names=frozenset(imatrix.entries) if imatrix else None, warn=warn)


# -- metadata --------------------------------------------------------------------------------------


def output_metadata(run: "_Run", source_hash: str, date: str) -> dict[str, Any]:
    """The output's metadata: the input's, what llama-quantize adds, overrides, provenance."""
    reader, opts, imatrix = run.reader, run.opts, run.imatrix
    meta: dict[str, Any] = dict(reader.kv)
    meta["general.quantization_version"] = KV(GGUFValueType.UINT32, QUANTIZATION_VERSION)
    meta["general.file_type"] = KV(GGUFValueType.UINT32, int(run.plan.file_type))
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
        "preset": run.plan.preset.name, "plan.sha256": run.plan.sha256,
        "profile": profile.name if profile else None,
        "profile.sha256": _file_hash(profile),
        **run.recipe,
    }))
    return meta


# -- execution -------------------------------------------------------------------------------------


def units_of(plan: Plan | list[PlannedTensor]) -> list[tuple[str, list[PlannedTensor]]]:
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


def run(opts: QuantizeOptions, progress: ProgressFn | None = None,
        warn: Callable[[str], None] | None = None, *, reader: ModelReader | None = None,
        recipe: dict[str, Any] | None = None) -> QuantizeResult:
    """plan -> (dry run: stop) -> execute unit by unit -> publish.

    `reader` replaces the model read from opts.input by a transformed view of it (`smooth` passes
    the smoothed model; opts.input is still what is hashed as the source); `recipe` is that
    transform's provenance, `quantcli.<key>` entries in the output's metadata, and part of the
    checkpoint key (a resumed run must have made the same transform)."""
    warnings, warn_ = collect_warnings(warn)

    start = time.perf_counter()
    # the full sha256 of a large input takes a while (~0.6 s of a core per GB): a single file
    # starts hashing on a thread now, while the interpreter opens, plans and loads its kernels
    early_hash = (_Background(file_sha256, Path(opts.input))
                  if not opts.dry_run and Path(opts.input).is_file() else None)
    with (open_source(opts.input, warn_) if reader is None else contextlib.nullcontext(reader)) as reader:
        if not opts.dry_run:
            check_output(opts.output, [opts.input], opts.force)
        imatrix = None
        if opts.imatrix is not None:
            imatrix = imatrix_file.load(opts.imatrix).filtered(list(opts.include_weights),
                                                               list(opts.exclude_weights))
        plan = make_plan(reader, opts, imatrix, warn_)
        summary = dict(plan=plan.tensors, params=plan.params, bytes=plan.bytes, bpw=plan.bpw,
                       file_type=plan.file_type, fallbacks=plan.fallbacks)
        if opts.dry_run:
            return QuantizeResult(output=None, seconds=time.perf_counter() - start,
                                  warnings=warnings, **summary)
        job = _Run(reader, opts, plan, imatrix, progress_or_noop(progress), warn_,
                   early_hash or _Background(source_sha256, reader), dict(recipe or {}))
        resumed = _execute(job)
    return QuantizeResult(output=opts.output, resumed_units=resumed,
                          seconds=time.perf_counter() - start, warnings=warnings, **summary)


@dataclass
class _Run:
    """What the execution of one plan needs."""

    reader: ModelReader
    opts: QuantizeOptions
    plan: Plan
    imatrix: imatrix_file.Imatrix | None
    step: ProgressFn  # progress events
    warn: Callable[[str], None]
    source_hash: "_Background"  # the input's sha256, still being computed
    recipe: dict[str, Any] = field(default_factory=dict)  # a transform's provenance (quantcli.<key>)

    def importance(self, p: PlannedTensor) -> np.ndarray | None:
        return self.imatrix.importance(p.info.name) if self.imatrix is not None and not p.copy else None

    def checkpoints(self) -> tuple[checkpoint.CheckpointStore, Path]:
        """The checkpoint store for this run and its directory. The key uses a quick fingerprint
        of the input (sizes, mtimes, inodes, tensor index): the full sha256 is not known yet."""
        opts = self.opts
        ckpt_dir = opts.checkpoint_dir or checkpoint.default_dir(opts.output)
        key = {"input": quick_fingerprint(self.reader), "plan_sha256": self.plan.sha256,
               "quantcli": quantcli.__version__, "gguf": gguf_version(),
               "imatrix_sha256": _file_hash(opts.imatrix), "override_kv": list(opts.override_kv),
               "profile_sha256": _file_hash(opts.profile), "recipe": checkpoint.key_json(self.recipe)}
        checkpoint.ensure_dir(ckpt_dir)
        return checkpoint.CheckpointStore(ckpt_dir, key, self.warn), ckpt_dir


PARTIAL = "output.partial"


def _execute(run: _Run) -> int:
    """Quantize unit by unit straight into `output.partial` in the checkpoint directory, at the
    offsets the output's layout fixes; after each unit, record its byte range and sha256 in the
    manifest. A re-run verifies the recorded ranges and does only the rest. At the end the header
    is written and the file published onto the output. Returns the units resumed."""
    store, ckpt_dir = run.checkpoints()
    date = store.extra.get("date") or run_date()  # a resumed run keeps its first timestamp
    if store.extra.get("date") != date:
        store.set_extra(date=date)
    plan = run.plan
    codecs.load_kernels(decode={p.info.ggml_type for p in plan if not p.copy and p.info.ggml_type is not None},
                        encode={p.type for p in plan if not p.copy}, weighted=run.imatrix is not None)
    partial = ckpt_dir / PARTIAL
    if not store.units and partial.exists():
        partial.unlink()  # left by a run whose checkpoints were not usable
    # the provenance hash is not known yet; a placeholder of the same length fixes the layout
    specs = [TensorSpec(p.info.name, p.info.shape, p.type) for p in plan]
    with create_writer("gguf", run.opts.output, output_metadata(run, "0" * 64, date), specs,
                       partial=partial, alignment=getattr(run.reader, "alignment", 32)) as writer:
        resumed = _write_units(run, writer, store)
        writer.finish(output_metadata(run, _source_digest(run.source_hash, run.opts.input), date))
    if not run.opts.keep_checkpoints:
        store.remove()
    elif not partial.exists():
        store.forget_units()  # the data moved to the output; keep only the manifest's key
    return resumed


def _write_units(run: _Run, writer: Writer, store: checkpoint.CheckpointStore) -> int:
    """Every unit not already intact in the partial file, through the slice pipeline."""
    plan = run.plan
    n_threads = run.opts.threads or os.cpu_count() or 1
    chunk = chunk_bytes(n_threads)
    total_in = sum(p.info.nbytes for p in plan)
    done = {"in": 0, "n": 0, "resumed": 0}

    def tensor_done(p: PlannedTensor) -> None:
        done["in"] += p.info.nbytes
        done["n"] += 1
        run.step(Progress("tensor", done["n"], len(plan), p.info.name, done["in"], total_in))

    def unit_done(label: str, start: int, size: int, digest: Any) -> None:
        # no fsync per unit: after a crash the recorded sha256 is checked before reuse
        store.record(label, {"start": start, "bytes": size, "sha256": digest.hexdigest()})

    pipe = Pipeline(n_threads, chunk)
    try:
        for label, group in units_of(plan):
            slots = [writer.slot(p.info.name) for p in group]
            first, size = slots[0].offset, sum(s.nbytes + s.pad for s in slots)
            if _unit_intact(writer, store, label, first):
                done["resumed"] += 1
                for p in group:
                    pipe.then(functools.partial(tensor_done, p))
                continue
            digest = hashlib.sha256()
            for p in group:
                for s in slices_of(p, run.importance(p), chunk):
                    buf = pipe.buffer()
                    pipe.submit(functools.partial(write_slice, writer, s, read_slice(run.reader, s, buf)),
                                digest, buf)
                run.reader.release(p.info.name)
                pipe.then(functools.partial(tensor_done, p))
            pipe.then(functools.partial(unit_done, label, first, size, digest))
        pipe.drain()
    finally:
        pipe.close()
    return done["resumed"]


def _unit_intact(writer: Writer, store: checkpoint.CheckpointStore, label: str, start: int) -> bool:
    """The unit is recorded for this key and its bytes in the partial file still hash right."""
    entry = store.units.get(label)
    if entry is None:
        return False
    if entry.get("start") == start:
        digest, left, pos = hashlib.sha256(), entry["bytes"], start
        while left > 0:
            block = writer.read(pos, min(left, 8 << 20))
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
