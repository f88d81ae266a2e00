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
import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import shutil

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

import quantcli
from quantcli import checkpoint, codecs
from quantcli import plan as plan_mod
from quantcli.calibrate import imatrix_file
from quantcli.calibrate.outliers import SuperWeight
from quantcli.errors import InputError, UsageError
from quantcli.formats import ModelReader, TensorSpec, Writer, create_writer
from quantcli.formats.atomic import atomic_write, check_output, describe
from quantcli.formats.base import KV, parse_override_kv
from quantcli.names import layer_of
from quantcli.pipelines import allocation, cluster
from quantcli.pipelines.common import (Progress, ProgressFn, file_sha256, gguf_version, kept_date, merge_adapters,
                                       open_source, progress_or_noop, provenance, quick_fingerprint, run_date,
                                       source_sha256)
from quantcli.pipelines.slices import Pipeline, chunk_bytes, read_slice, slices_of, write_slice
from quantcli.plan import Plan, PlannedTensor, PlanOptions
from quantcli.progress import collect_warnings

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
# what --protect-super-weights gives the tensors that hold super weights (measured: README, "Super weights")
DEFAULT_SUPER_WEIGHT_TYPE = "Q4_K"


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
    # automatic mix (pipelines/allocation.py): one target, and what measures the sensitivity
    target_size: str | None = None  # the output file's size: bytes or 180MB, 172MiB, 4.5GB
    target_bpw: float | None = None  # bits per weight over all tensors
    max_kld: float | None = None  # the smallest mix whose estimated KLD stays at or under this
    calib: Path | None = None  # calibration text: the imatrix (when none is given) and the measurement
    candidates: tuple[str, ...] = ()  # types to choose from (default: allocation's ladder)
    measurement: Path | None = None  # reused when it exists, else written by the analysis
    save_profile: Path | None = None  # the mix as a YAML profile (reproduces the file with --profile)
    calib_chunks: int = 64  # chunks of the imatrix computed from --calib
    sensitivity_chunks: int = 2  # chunks of the KL divergence measurement
    ctx: int = 512
    # super weights (imatrix --super-weights): the tensors that hold confirmed ones get at least this type
    protect_super_weights: bool = False
    super_weight_type: str | None = None  # default: DEFAULT_SUPER_WEIGHT_TYPE
    lora: tuple = ()  # convert.lora.AdapterSpec: merged into the input before quantizing
    ray: str | None = None  # run the slices on a Ray cluster: "local", "auto" or "ray://host:port" (cluster.py)
    out_format: str = "gguf"  # or "compressed-tensors": a Hugging Face directory for vLLM (with scheme)
    scheme: str | None = None  # compressed-tensors: W4A16 (int4 groups of 64, the SYM4_B64 codec) or W8A8
    date: str | None = None  # quantcli.date to record (verify --rebuild-from: the original's); None: now
    imatrix_label: str | None = None  # quantize.imatrix.file to record instead of the path (a rebuild's)


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
    allocation: dict[str, Any] | None = None  # an automatic mix: target, estimate, reachable range
    file_bytes: int | None = None  # the output file's size (a dry run: what it will be)
    protected: list[dict[str, Any]] | None = None  # --protect-super-weights: tensor, type, its super weights
    size: dict[str, Any] = field(default_factory=dict)  # plan.size_claim: the ratio to F16 and what keeps it

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": "quantcli.quantize/1",
            "output": str(self.output) if self.output else None,
            "dry_run": self.output is None,
            "tensors": [{"name": p.info.name, "shape": list(p.info.shape), "from": p.info.dtype,
                         "type": p.type, "bytes": p.nbytes, "reason": p.reason,
                         **({"estimated_kld": p.estimate} if p.estimate is not None else {})}
                        for p in self.plan],
            "params": self.params, "bytes": self.bytes, "bpw": round(self.bpw, 4),
            "file_bytes": self.file_bytes,
            "file_type": self.file_type, "fallbacks": self.fallbacks,
            "resumed_units": self.resumed_units, "seconds": round(self.seconds, 3),
            "allocation": self.allocation,
            "protected": self.protected,
            "size": self.size,
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
    if imatrix is not None and (opts.imatrix is not None or opts.calib is not None):
        source = (opts.imatrix_label or str(opts.imatrix)) if opts.imatrix is not None else f"computed from {opts.calib}"
        meta["quantize.imatrix.file"] = KV(GGUFValueType.STRING, source[:127])
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
        "recipe": json.dumps(recipe_of(opts, run.recipe, run.transformed, imatrix), sort_keys=True),
        **run.recipe,
    }))
    return meta


REBUILDABLE = ("preset", "include_weights", "exclude_weights", "output_tensor_type", "token_embedding_type",
               "tensor_types", "pure", "leave_output_tensor", "allow_requantize", "override_kv",
               "protect_super_weights", "super_weight_type")


def recipe_of(opts: QuantizeOptions, recipe: dict[str, Any], transformed: bool,
              imatrix: imatrix_file.Imatrix | None = None) -> dict[str, Any]:
    """What remakes this file from its source (`quantcli.recipe`, read by verify --rebuild-from):
    the flags, and the imatrix and profile by sha256. An automatic mix saved as a profile records
    that profile (the profile remakes it byte for byte, so both files record the same); one not
    saved, or a transformed model (smooth), records that it cannot be remade from flags alone."""
    out: dict[str, Any] = {k: getattr(opts, k) for k in REBUILDABLE}
    out["tensor_types"] = [list(t) for t in opts.tensor_types]
    out.update({k: list(out[k]) for k in ("include_weights", "exclude_weights", "override_kv")})
    # the imatrix by its statistics (after --include/--exclude-weights), not its file: records that
    # do not change the quantization (super weights) do not change the recipe
    out["imatrix_statistics_sha256"] = imatrix.digest() if imatrix is not None and opts.imatrix is not None else None
    out["profile_sha256"] = _file_hash(opts.profile)
    if any(x is not None for x in (opts.target_size, opts.target_bpw, opts.max_kld)):
        if opts.save_profile is not None:
            out["profile_sha256"] = recipe.get("profile.sha256")
        else:
            out["automatic"] = True
    if transformed:
        out["transform"] = True
    if recipe.get("lora"):
        out["lora"] = [{"sha256": a["sha256"], "scale": a["scale"]} for a in json.loads(recipe["lora"])]
    return out


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
    transformed = reader is not None
    cluster.require_ray(opts.ray)
    if opts.out_format != "gguf" or opts.scheme is not None:
        return run_compressed_tensors(opts, progress, warn_, warnings)

    start = time.perf_counter()
    # the full sha256 of a large input takes a while (~0.6 s of a core per GB): a single file
    # starts hashing on a thread now, while the interpreter opens, plans and loads its kernels
    early_hash = (_Background(file_sha256, Path(opts.input))
                  if not opts.dry_run and Path(opts.input).is_file() else None)
    with (open_source(opts.input, warn_) if reader is None else contextlib.nullcontext(reader)) as reader:
        if not opts.dry_run:
            check_output(opts.output, [opts.input] + [Path(a.path) for a in opts.lora], opts.force)
        reader, merged = merge_adapters(reader, opts.lora, opts.allow_requantize, warn_)
        target = allocation.Target.of(opts.target_size, opts.target_bpw, opts.max_kld)
        if target is None and (opts.calib or opts.measurement or opts.save_profile or opts.candidates):
            raise UsageError("--calib, --measurement, --candidates and --save-profile choose an automatic mix: "
                             "give --target-size, --target-bpw or --max-kld with them")
        if target is not None and opts.save_profile is not None and not opts.dry_run:
            check_output(opts.save_profile, [opts.input], opts.force)
        imatrix = None
        if opts.imatrix is not None:
            imatrix = imatrix_file.load(opts.imatrix).filtered(list(opts.include_weights),
                                                               list(opts.exclude_weights))
        recipe = {**(recipe or {}), **merged}
        protected: dict[str, list[SuperWeight]] = {}
        if opts.protect_super_weights:
            protected, opts = _protect(reader, opts, imatrix, target is None, warn_)
            if protected:
                recipe["super_weights.protected"] = ",".join(protected)
                recipe["super_weights.type"] = opts.super_weight_type
        elif opts.super_weight_type is not None:
            raise UsageError("--super-weight-type is the type of --protect-super-weights; pass that too")
        job = _Run(reader, opts, None, imatrix, progress_or_noop(progress), warn_,  # type: ignore[arg-type]
                   early_hash or _Background(source_sha256, reader), recipe, transformed=transformed)
        mix = None
        if target is None:
            plan = make_plan(reader, opts, imatrix, warn_)
            if opts.profile is not None:  # a saved automatic mix records what the mix recorded
                from quantcli import profiles

                recipe.update(profiles.load(opts.profile).allocation or {})
        else:
            mix, imatrix, profile = _automatic(job, target)
            plan, job.imatrix = mix.plan, imatrix
            recipe.update(mix.recipe())
            if profile is not None:
                recipe["profile"] = Path(opts.save_profile).name
                recipe["profile.sha256"] = allocation.file_hash_of(profile)
        if protected:
            plan = _labelled(plan, protected)
        job.plan = plan
        _ternary_check(reader, plan, warn_)
        summary = dict(plan=plan.tensors, params=plan.params, bytes=plan.bytes, bpw=plan.bpw,
                       file_type=plan.file_type, fallbacks=plan.fallbacks,
                       allocation=_allocation_json(mix, opts) if mix else None,
                       file_bytes=_file_bytes(job),
                       protected=_protected_json(plan, protected) if opts.protect_super_weights else None,
                       size=plan_mod.size_claim(plan))
        if opts.dry_run:
            return QuantizeResult(output=None, seconds=time.perf_counter() - start,
                                  warnings=warnings, **summary)
        resumed = _execute(job)
        if mix is not None and profile is not None:
            with atomic_write(Path(opts.save_profile)) as fh:
                fh.write(profile.encode())
    return QuantizeResult(output=opts.output, resumed_units=resumed,
                          seconds=time.perf_counter() - start, warnings=warnings, **summary)


# -- compressed-tensors ---------------------------------------------------------------------------

CT_FLAGS = ("preset", "profile", "imatrix", "output_tensor_type", "token_embedding_type", "target_size",
            "target_bpw", "max_kld", "calib", "measurement", "save_profile", "checkpoint_dir")


def run_compressed_tensors(opts: QuantizeOptions, progress: ProgressFn | None, warn: Callable[[str], None],
                           warnings: list[str]) -> QuantizeResult:
    """`quantize IN OUT --format compressed-tensors --scheme W4A16|W8A8`: every block linear whose
    rows allow it quantized (W4A16: groups of 64 by the SYM4_B64 codec; W8A8: int8 per channel,
    dynamic per-token activations), everything else in its stored dtype, as a directory vLLM loads."""
    from quantcli.pipelines import compressed_tensors as ct

    if opts.out_format != "compressed-tensors":
        raise UsageError(f"--scheme {opts.scheme} is a compressed-tensors scheme: add --format compressed-tensors"
                         if opts.out_format == "gguf" else
                         f"unknown output format '{opts.out_format}'; use gguf or compressed-tensors")
    scheme = (opts.scheme or "").upper()
    if scheme not in ct.SCHEMES:
        raise UsageError(f"--format compressed-tensors needs --scheme {' or '.join(ct.SCHEMES)}"
                         + (f", not '{opts.scheme}'" if opts.scheme else ""))
    given = [f"--{k.replace('_', '-')}" for k in CT_FLAGS if getattr(opts, k) is not None]
    given += [f"--{k.replace('_', '-')}" for k in ("tensor_types", "pure", "leave_output_tensor") if getattr(opts, k)]
    if given:
        raise UsageError(f"{', '.join(given)} choose GGUF types; --format compressed-tensors writes "
                         f"{scheme} (leave them out)")
    if opts.dry_run:
        raise UsageError("--dry-run prints a GGUF plan; it does not apply to --format compressed-tensors")
    if opts.ray is not None:
        raise UsageError("--ray distributes GGUF quantization; --format compressed-tensors runs on this machine")
    start = time.perf_counter()
    with open_source(opts.input, warn) as reader:
        reader, merged = merge_adapters(reader, opts.lora, opts.allow_requantize, warn)
        from quantcli.convert.to_hf import block_linear

        linears = [n for n, i in reader.tensors.items() if block_linear(n) is not None and len(i.shape) == 2]
        if scheme == "W4A16":
            skipped = ct.with_fused(n for n in linears if reader.tensors[n].shape[1] % ct.GROUP) & set(linears)
            if skipped:
                warn(f"{len(skipped)} linears (e.g. {sorted(skipped)[0]}) have rows that do not split into groups "
                     f"of {ct.GROUP}: kept in their stored dtype")
            linears = [n for n in linears if n not in skipped]
        header = {k: str(v) for k, v in provenance(reader, source_sha256(reader), extra={
            "scheme": scheme, "codec": "SYM4_B64" if scheme == "W4A16" else "int8 per channel", **merged}).items()}
        source = Path(opts.input)
        res = ct.write_compressed_tensors(
            reader, Path(opts.output), linears=linears, scheme=scheme,
            source_config=ct.config_of_source(reader),
            tokenizer_dir=source if source.is_dir() else None, metadata=header, force=opts.force,
            progress=progress)
        for w in res.warnings:
            warn(w)
        params = sum(i.n_params for i in reader.tensors.values())
    return QuantizeResult(output=opts.output, plan=[], params=params, bytes=res.bytes,
                          bpw=8.0 * res.bytes / max(params, 1), file_type=0, fallbacks=0,
                          seconds=time.perf_counter() - start, warnings=warnings, file_bytes=res.bytes,
                          size={"format": "compressed-tensors", "scheme": scheme, "quantized_linears": res.n_quantized,
                                "files": list(res.files)})


# -- ternary -------------------------------------------------------------------------------------

TERNARY = ("TQ1_0", "TQ2_0")
TERNARY_ROWS = 256  # rows sampled per tensor (evenly spaced)
TERNARY_SHARE = 0.9  # a model "is ternary" when this share of the sampled blocks are


def ternary_share(x: np.ndarray, block: int = 256) -> float:
    """The share of `block`-wide row blocks of x whose values take at most three levels, -s, 0 and
    +s (s the block's largest |value|; within 1 % of s, as fp16/bf16 storage of a ternary model
    keeps them): what TQ1_0/TQ2_0 store exactly. Rows not divisible by the block: their whole
    length is one block."""
    x = np.asarray(x, np.float32)
    cols = x.shape[-1]
    b = x.reshape(-1, block) if cols % block == 0 else x.reshape(-1, cols)
    a = np.abs(b)
    s = a.max(axis=1, keepdims=True)
    ok = (a <= 0.01 * s) | (np.abs(a - s) <= 0.01 * s)
    return float(np.mean(ok.all(axis=1))) if b.shape[0] else 1.0


def _ternary_check(reader: ModelReader, plan: Plan, warn: Callable[[str], None]) -> None:
    """Before quantizing to TQ1_0/TQ2_0: whether the model's weights already are ternary per block
    (a model trained so, BitNet b1.58 style); if not, say that ternary will destroy it."""
    targets = [p for p in plan if p.type in TERNARY and not p.copy]
    if not targets:
        return
    shares = []
    for p in targets:
        rows = p.info.shape[0]
        idx = np.unique(np.linspace(0, rows - 1, min(rows, TERNARY_ROWS)).round().astype(np.int64))
        # only the sampled rows are read (a whole F16/BF16 tensor would be converted otherwise)
        x = np.concatenate([reader.load_rows(p.info.name, int(i), int(i) + 1) for i in idx])
        shares.append((ternary_share(x), p.info.n_params))
    share = sum(s * n for s, n in shares) / max(sum(n for _, n in shares), 1)
    if share < TERNARY_SHARE:
        warn(f"{reader.path}: the weights are not ternary (only {100 * share:.0f}% of the sampled "
             f"blocks of the {len(targets)} tensor(s) planned as {'/'.join(sorted({p.type for p in targets}))} take "
             "three values -s, 0, +s): ternary types suit models trained ternary (BitNet b1.58); this model "
             "will lose most of what it knows")


# -- super weights -------------------------------------------------------------------------------


def _protect(reader: ModelReader, opts: QuantizeOptions, imatrix: imatrix_file.Imatrix | None, raise_only: bool,
             warn: Callable[[str], None]) -> tuple[dict[str, list[SuperWeight]], QuantizeOptions]:
    """The tensors that hold the imatrix's confirmed super weights and the options that give them
    --super-weight-type: a --tensor-type rule after the user's own (which win where they match).
    With raise_only (a preset or profile), only where the plan has fewer bytes than that type; an
    automatic mix takes them as fixed."""
    from quantcli.presets import ggml_type_name

    sw_type = ggml_type_name(opts.super_weight_type or DEFAULT_SUPER_WEIGHT_TYPE, "--super-weight-type")
    opts = replace(opts, super_weight_type=sw_type)
    if opts.imatrix is None or imatrix is None:
        raise UsageError("--protect-super-weights reads the super weights from the importance matrix: pass "
                         "--imatrix FILE", hint="make one with: quantcli imatrix MODEL --text TEXT --super-weights -o FILE")
    found = imatrix.outliers
    if found is None:
        raise UsageError(f"{opts.imatrix}: no super-weight records in this imatrix",
                         hint="make it with: quantcli imatrix MODEL --text TEXT --super-weights -o FILE")
    by_tensor: dict[str, list[SuperWeight]] = {}
    for s in found.confirmed:
        info = reader.tensors.get(s.tensor)
        if info is None or len(info.shape) != 2 or not (s.row < info.shape[0] and s.col < info.shape[1]):
            raise InputError(f"{opts.imatrix}: super weight {s.tensor}[{s.row}, {s.col}] is not in this model's "
                             "tensors; the imatrix was made from another model")
        by_tensor.setdefault(s.tensor, []).append(s)
    if not by_tensor:
        warn(f"{opts.imatrix}: no confirmed super weights (" + (found.none_found() if not found.super_weights else
             f"{len(found.candidates)} candidate(s) below the threshold") + "); nothing to protect")
        return {}, opts
    types = {}
    for n in by_tensor:  # the type's blocks must divide the rows; else Q8_0's blocks of 32
        cols = reader.tensors[n].shape[-1]
        types[n] = next((t for t in (sw_type, "Q8_0") if cols % codecs.get_codec(t).block_size == 0), None)
        if types[n] is None:
            warn(f"{n}: rows of {cols} fit neither {sw_type} nor Q8_0 blocks; its super weights are not protected")
        elif types[n] != sw_type:
            warn(f"{n}: rows of {cols} do not fit {sw_type} blocks; protected as Q8_0")
    by_tensor = {n: v for n, v in by_tensor.items() if types[n] is not None}
    if raise_only:
        plan = make_plan(reader, opts, imatrix, lambda _m: None)
        planned = {p.info.name: p for p in plan}
        by_tensor = {n: v for n, v in by_tensor.items()
                     if plan_mod.tensor_bytes(planned[n].info, types[n]) > planned[n].nbytes}
    rules = tuple((f"^{re.escape(n)}$", types[n]) for n in by_tensor)
    return by_tensor, replace(opts, tensor_types=tuple(opts.tensor_types) + rules)


def _labelled(plan: Plan, protected: dict[str, list[SuperWeight]]) -> Plan:
    """The plan with the protected tensors' reasons saying why (where the protection rule chose)."""
    out = []
    for p in plan:
        sws = protected.get(p.info.name)
        if sws and p.reason == f"--tensor-type ^{re.escape(p.info.name).lower()}$={p.type}":
            where = ", ".join(f"[{s.row}, {s.col}] ({100 * s.effect:+.1f}% ppl zeroed)" for s in sws)
            p = replace(p, reason=f"protected: super weight{'s' if len(sws) > 1 else ''} {where} -> {p.type}")
        out.append(p)
    return replace(plan, tensors=out)


def _protected_json(plan: Plan, protected: dict[str, list[SuperWeight]]) -> list[dict[str, Any]]:
    types = {p.info.name: p.type for p in plan}
    return [{"tensor": n, "type": types[n], "super_weights": [
        {"row": s.row, "col": s.col, "value": s.value, "effect": s.effect} for s in sws]} for n, sws in protected.items()]


# -- automatic mixes -------------------------------------------------------------------------------


def _automatic(job: "_Run", target: "allocation.Target"):
    """The measured mix for `target`: (Mix, the imatrix it used, the profile text or None)."""
    from quantcli.calibrate.sensitivity import check_candidates

    opts, reader = job.opts, job.reader
    imatrix, imatrix_sha = job.imatrix, _file_hash(opts.imatrix)
    measurement = _measurement(job, imatrix_sha)
    if measurement is None:
        if imatrix is None:
            imatrix, imatrix_sha = _computed_imatrix(job)
        measurement = _measure(job, imatrix, imatrix_sha)
    candidates = check_candidates(opts.candidates) if opts.candidates else tuple(measurement.candidates)
    unmeasured = [c for c in candidates if c not in measurement.candidates]
    if unmeasured:
        raise UsageError(f"--candidates {unmeasured[0]} was not measured in {opts.measurement}",
                         hint=f"measured: {', '.join(measurement.candidates)}; run the analysis again "
                              "with these candidates")

    def plan_for(preset: str) -> Plan | None:
        try:
            return make_plan(reader, replace(opts, preset=preset, dry_run=False), imatrix, lambda _m: None)
        except UsageError:
            return None

    sizes = allocation.preset_sizes(plan_for)
    base_preset = opts.preset
    if base_preset is None and opts.profile is None:  # the preset nearest the target gives the file type
        q8 = make_plan(reader, replace(opts, preset="Q8_0"), imatrix, job.warn)
        guess = (target.size - _header_bytes(job, q8, target, opts) if target.size is not None else
                 target.bpw * q8.params / 8 if target.bpw is not None else None)
        base_preset = allocation.nearest(sizes, guess) if guess is not None else "Q8_0"
    base = make_plan(reader, replace(opts, preset=base_preset), imatrix, job.warn)
    header = _header_bytes(job, base, target, opts)
    mix = allocation.make_mix(base, measurement, target, candidates, imatrix, header,
                              getattr(reader, "alignment", 32), sizes)
    profile = allocation.profile_text(mix) if opts.save_profile is not None else None
    return mix, imatrix, profile


def _measurement(job: "_Run", imatrix_sha: str | None):
    """The --measurement file when it exists (checked against this model and imatrix), else None."""
    from quantcli.calibrate.runner import model_fingerprint

    path = job.opts.measurement
    if path is None or not Path(path).exists():
        if job.opts.calib is None:
            raise UsageError("an automatic mix needs a measurement: pass --calib TEXT (and --measurement "
                             "FILE to keep it for other targets) or an existing --measurement FILE")
        return None
    m = allocation.Measurement.load(path)
    m.check(path, model_fingerprint(job.reader), imatrix_sha)
    return m


def _computed_imatrix(job: "_Run"):
    """The importance matrix of --calib (llama-imatrix's statistics), checkpointed beside the run."""
    from quantcli.calibrate import imatrix as calib
    from quantcli.pipelines.common import read_text

    opts = job.opts
    ckpt = (opts.checkpoint_dir or checkpoint.default_dir(opts.output)) / "imatrix"
    text = read_text(opts.calib)
    options = calib.ImatrixOptions(ctx=opts.ctx, chunks=opts.calib_chunks, dataset=str(opts.calib),
                                   checkpoint_dir=ckpt, keep_checkpoints=True)
    if opts.ray is not None:
        result = cluster.imatrix(Path(opts.input), text, options, opts.ray, job.step, job.warn, tuple(opts.lora),
                                 job.reader)
    else:
        result = calib.compute(job.reader, text, options, job.step, job.warn)
    job.cleanup.append(ckpt)
    digest = hashlib.sha256(repr(sorted((k, v.sums.tobytes(), v.counts.tobytes())
                                        for k, v in result.imatrix.entries.items())).encode()).hexdigest()
    return result.imatrix, digest


def _measure(job: "_Run", imatrix, imatrix_sha: str | None):
    from quantcli.calibrate.sensitivity import DEFAULT_CANDIDATES, check_candidates

    opts = job.opts
    ckpt = (opts.checkpoint_dir or checkpoint.default_dir(opts.output)) / "sensitivity"
    candidates = check_candidates(opts.candidates) if opts.candidates else DEFAULT_CANDIDATES
    m = allocation.measure(job.reader, imatrix, imatrix_sha, opts.calib, candidates, opts.sensitivity_chunks,
                           opts.ctx, ckpt, opts.keep_checkpoints, opts.threads, job.step, job.warn,
                           ray=opts.ray, source=Path(opts.input), lora=tuple(opts.lora))
    if opts.measurement is not None:
        allocation.save_measurement(m, opts.measurement)
    else:
        m.dumps()  # its sha256 is what the output records
    if not opts.keep_checkpoints:
        for d in job.cleanup:
            shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):  # the run's own checkpoints (if any) come later
            ckpt.parent.rmdir()
    return m


def _header_bytes(job: "_Run", plan: Plan, target: "allocation.Target", opts: QuantizeOptions) -> int:
    """The output's header length for this target: the same whatever types the tensors get (the
    allocation metadata has fixed-size values)."""
    placeholder = allocation.recipe(target, 0.0, "0" * 64, np.zeros(len(plan.tensors), np.float32))
    if opts.save_profile is not None:
        placeholder.update({"profile": Path(opts.save_profile).name, "profile.sha256": "0" * 64})
    probe = _Run(job.reader, opts, plan, job.imatrix, job.step, job.warn, job.source_hash,
                 {**job.recipe, **placeholder}, transformed=job.transformed)
    return _layout(probe)[0]


def _file_bytes(job: "_Run") -> int:
    """The output file's size: the header and every tensor at its aligned offset."""
    header, data = _layout(job)
    return header + data


def _layout(job: "_Run") -> tuple[int, int]:
    """(header bytes, data bytes) of the file this run writes, its source hash not yet known."""
    from quantcli.formats.gguf import gguf_layout

    meta = output_metadata(job, "0" * 64, run_date())
    specs = [(p.info.name, p.info.shape, GGMLQuantizationType[p.type]) for p in job.plan]
    header, _, data = gguf_layout(meta, specs, getattr(job.reader, "alignment", 32))
    return len(header), data


def _allocation_json(mix: "allocation.Mix", opts: QuantizeOptions) -> dict[str, Any]:
    lo, hi = mix.reachable
    return {"target": mix.target.text, "estimated_kld": mix.estimate, "nearest_preset": mix.nearest_preset,
            "reachable_bytes": [lo, hi], "measurement_sha256": mix.measurement_sha256,
            "measurement": str(opts.measurement) if opts.measurement else None,
            "profile": str(opts.save_profile) if opts.save_profile else None}


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
    transformed: bool = False  # the model read is a transform of the input (smooth's)
    cleanup: list[Path] = field(default_factory=list)  # analysis checkpoints to remove after success

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
    date = kept_date(store, run.opts.date)  # a resumed run keeps its first timestamp
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


class _TensorProgress:
    """Progress of the tensors written (or found intact), in file order."""

    def __init__(self, run: _Run) -> None:
        self.run, self.n, self.bytes = run, 0, 0
        self.total = sum(p.info.nbytes for p in run.plan)

    def done(self, p: PlannedTensor) -> None:
        self.n += 1
        self.bytes += p.info.nbytes
        self.run.step(Progress("tensor", self.n, len(self.run.plan), p.info.name, self.bytes, self.total))


def _units(run: _Run, writer: Writer, store: checkpoint.CheckpointStore):
    """(label, tensors, first byte, bytes, intact) of each unit in file order; intact: recorded and
    still hashing right in the partial file, so it is not written again."""
    for label, group in units_of(run.plan):
        slots = [writer.slot(p.info.name) for p in group]
        first, size = slots[0].offset, sum(s.nbytes + s.pad for s in slots)
        yield label, group, first, size, _unit_intact(writer, store, label, first)


def _record_unit(store: checkpoint.CheckpointStore, label: str, start: int, size: int, digest: Any) -> None:
    # no fsync per unit: after a crash the recorded sha256 is checked before reuse
    store.record(label, {"start": start, "bytes": size, "sha256": digest.hexdigest()})


def _write_units(run: _Run, writer: Writer, store: checkpoint.CheckpointStore) -> int:
    """Every unit not already intact in the partial file, through the slice pipeline."""
    if run.opts.ray is not None:
        return _write_units_ray(run, writer, store)
    n_threads = run.opts.threads or os.cpu_count() or 1
    chunk = chunk_bytes(n_threads)
    progress, resumed = _TensorProgress(run), 0
    pipe = Pipeline(n_threads, chunk)
    try:
        for label, group, first, size, intact in _units(run, writer, store):
            if intact:
                resumed += 1
                for p in group:
                    pipe.then(functools.partial(progress.done, p))
                continue
            digest = hashlib.sha256()
            for p in group:
                for s in slices_of(p, run.importance(p), chunk):
                    buf = pipe.buffer()
                    pipe.submit(functools.partial(write_slice, writer, s, read_slice(run.reader, s, buf)),
                                digest, buf)
                run.reader.release(p.info.name)
                pipe.then(functools.partial(progress.done, p))
            pipe.then(functools.partial(_record_unit, store, label, first, size, digest))
        pipe.drain()
    finally:
        pipe.close()
    return resumed


def _write_units_ray(run: _Run, writer: Writer, store: checkpoint.CheckpointStore) -> int:
    """`_write_units` with the slices encoded by Ray tasks (`cluster.encode_task`): the results come
    back in submission order, so they are written and hashed exactly as a local run writes them,
    and each unit is recorded in the manifest (here, on the coordinator) once its last slice is."""
    if run.transformed:
        raise UsageError("--ray reads the input on the workers: a transformed model (smooth) cannot go there")
    ray_cluster = cluster.connect(run.opts.ray, run.opts.threads or None)
    try:
        cluster.check_inputs(ray_cluster, [Path(run.opts.input)] + [Path(a.path) for a in run.opts.lora])
        task = ray_cluster.remote(cluster.encode_task)
        source, lora = str(Path(run.opts.input).resolve()), tuple(run.opts.lora)
        progress, resumed = _TensorProgress(run), 0
        # slice, unit, its first byte, its bytes, last slice of its tensor, last slice of its unit
        work: list[tuple[Any, str, int, int, bool, bool]] = []
        for label, group, first, size, intact in _units(run, writer, store):
            if intact:
                resumed += 1
                for p in group:
                    progress.done(p)
                continue
            unit = []
            for p in group:
                sl = slices_of(p, run.importance(p), chunk_bytes(ray_cluster.workers))
                unit += [(s, label, first, size, s is sl[-1], False) for s in sl]
            unit[-1] = unit[-1][:5] + (True,)
            work += unit
        digest = hashlib.sha256()
        results = ray_cluster.map_ordered(task, ((source, lora, w[0]) for w in work))
        for (s, label, first, size, tensor_last, unit_last), data in zip(work, results):
            for written in writer.write_rows(s.p.info.name, s.start, data):
                digest.update(written)
            if tensor_last:
                progress.done(s.p)
            if unit_last:
                _record_unit(store, label, first, size, digest)
                digest = hashlib.sha256()
    finally:
        ray_cluster.close()
    return resumed


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
