"""`quantcli verify FILE`: checks a CI step can rely on, each with a pass/fail and its figure.

- structure: the file opens under full header validation (counts, shapes, types, offsets, alignment);
- plan: with a preset or profile, every tensor's type equals what quantcli would choose for it;
- bpw: bits per weight equal the plan's (same bytes for the same choices);
- finite: every tensor dequantizes to finite values;
- size_contract: bytes per block as ggml defines them (Q4_K 144/256 = 18 per 32, Q6_K 210/256,
  Q8_0 34/32) and size(Q4_K) < size(Q6_K) < size(Q8_0) < size(F16) < size(F32) per parameter;
  every tensor's byte count equals its parameters at its type's rate.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

import quantcli
from quantcli.digests import cache_root
from quantcli.errors import InputError, QuantcliError, UsageError
from quantcli.formats import ModelReader, open_model
from quantcli.inputs import read_small_text
from quantcli.pipelines.common import source_sha256
from quantcli.progress import ProgressFn
from quantcli.formats.gguf import type_nbytes
from quantcli.plan import PlanOptions, make_plan

SCHEMA = "quantcli.verify/1"
ORDER = [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.F16, Q.F32]
BYTES_PER_32 = {Q.Q4_K: 18.0, Q.Q6_K: 26.25, Q.Q8_0: 34.0, Q.F16: 64.0, Q.F32: 128.0}


# quality gates: the option (gate-file key), the check it makes, the comparison
GATES = {"max_ppl_delta": ("ppl_delta", "<="), "max_ppl_ratio": ("ppl_ratio", "<="), "max_kld": ("kld", "<="),
         "max_kld_p99": ("kld_p99", "<="), "min_top1": ("top1", ">="), "min_coherence": ("coherence", ">="),
         "min_task_ratio": ("task_ratio", ">=")}
DEFAULT_TASK_RATIO = 0.95  # with --task: acc_norm at least 95 % of the base's (the checklist's 95-98 %)
NEEDS_NO_TEXT = ("min_coherence", "min_task_ratio")
SHARES = ("min_top1", "min_coherence")  # thresholds in [0, 1]
DEFAULT_GATES = {"max_ppl_delta": 0.5}  # the evaluation checklist's (spec 004): perplexity at most +0.5
GATE_FILE_KEYS = set(GATES) | {"ctx", "chunks", "presets"}
MAX_GATE_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class QualityOptions:
    """`verify --base BASE --eval-text TEXT`: the model against its base on a text, through gates."""

    base: Path
    text: Path | None  # None: only the coherence gate, which needs no text
    ctx: int = 512
    chunks: int | None = None
    gates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GATES))  # key of GATES -> threshold
    presets: dict[str, dict[str, float]] = field(default_factory=dict)  # a gate file's per-preset overrides
    flags: dict[str, float] = field(default_factory=dict)  # the command line's: over everything
    cache_dir: Path | None = None  # the base's logits (default: cache_root()/base-logits)
    task: Path | None = None  # a multiple-choice task file (pipelines/tasks.py) for min_task_ratio


@dataclass(frozen=True)
class VerifyOptions:
    file: Path
    preset: str | None = None
    profile: Path | None = None
    quality: QualityOptions | None = None
    contracts: bool = False  # the seeds' falsification tests (FALSIFY-QO-*, FALSIFY-QUANT-*) as named checks
    rebuild_from: Path | None = None  # remake FILE from this source with its recorded recipe: same bytes?
    imatrix: Path | None = None  # the rebuild's imatrix (default: the path FILE records)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    figure: Any
    detail: str = ""


@dataclass
class VerifyResult:
    file: str
    checks: list[Check] = field(default_factory=list)
    quality: dict[str, Any] | None = None  # the figures behind the gates, the gates in force, the cache
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "file": self.file, "ok": self.ok,
                "checks": [asdict(c) for c in self.checks], "quality": self.quality}


def _size_contract(reader: ModelReader) -> Check:
    per_param = {t: GGML_QUANT_SIZES[t][1] / GGML_QUANT_SIZES[t][0] for t in ORDER}
    ordered = all(per_param[a] < per_param[b] for a, b in zip(ORDER, ORDER[1:]))
    blocks = all(abs(per_param[t] * 32 - BYTES_PER_32[t]) < 1e-9 for t in ORDER)
    bad = []
    for info in reader.tensors.values():
        if info.ggml_type is None or info.ggml_type not in GGML_QUANT_SIZES:
            continue
        if info.nbytes != type_nbytes(info.ggml_type, info.gguf_shape):
            bad.append(info.name)
    figure = {t.name: round(per_param[t], 6) for t in ORDER}
    detail = "bytes/param " + " < ".join(f"{t.name} {per_param[t]:.4f}" for t in ORDER)
    if bad:
        detail += f"; tensor sizes wrong: {', '.join(bad[:5])}"
    return Check("size_contract", ordered and blocks and not bad, figure, detail)


def _finite(reader: ModelReader) -> Check:
    bad = []
    for name in reader.tensors:
        if not np.isfinite(reader.load_f32(name)).all():
            bad.append(name)
    return Check("finite", not bad, len(reader.tensors) - len(bad),
                 f"non-finite values in {', '.join(bad[:5])}" if bad else "all tensors decode to finite values")


def _plan_checks(reader: ModelReader, opts: VerifyOptions) -> list[Check]:
    # a file made with an imatrix is checked against the plan made with one
    plan = make_plan(reader, PlanOptions(preset=opts.preset, profile=opts.profile, allow_requantize=True,
                                         dry_run=True, source=reader.path),
                     has_imatrix=reader.meta("quantize.imatrix.file") is not None)
    preset, ftype_expected = plan.preset, plan.file_type
    wrong = [(p.info.name, p.info.dtype, p.type) for p in plan
             if p.info.dtype != p.type]
    checks = [Check("plan", not wrong, len(plan) - len(wrong),
                    "; ".join(f"{n} is {have}, plan says {want}" for n, have, want in wrong[:5])
                    or f"all {len(plan)} tensors match {preset.name}"
                       + (f" with {Path(opts.profile).name}" if opts.profile else ""))]
    params = sum(p.info.n_params for p in plan)
    expect = 8.0 * sum(p.nbytes for p in plan) / max(params, 1)
    actual = 8.0 * sum(t.nbytes for t in reader.tensors.values()) / max(params, 1)
    checks.append(Check("bpw", abs(actual - expect) <= 1e-3 * expect, round(actual, 4),
                        f"{actual:.4f} bpw, plan {expect:.4f}"))
    ftype = reader.meta("general.file_type")
    checks.append(Check("file_type", ftype == ftype_expected, ftype,
                        f"general.file_type {ftype}, {preset.name} is {ftype_expected}"))
    return checks


def run(opts: VerifyOptions, progress: ProgressFn | None = None) -> VerifyResult:
    t0 = time.perf_counter()
    result = VerifyResult(str(opts.file))
    try:
        reader = open_model(opts.file)
    except QuantcliError as exc:
        result.checks.append(Check("structure", False, None, exc.message))
        return result
    with reader:
        result.checks.append(Check("structure", True, len(reader.tensors),
                                   f"{reader.format} header valid, {len(reader.tensors)} tensors"))
        if opts.preset or opts.profile:
            result.checks.extend(_plan_checks(reader, opts))
        result.checks.append(_finite(reader))
        result.checks.append(_size_contract(reader))
        if opts.contracts:
            result.checks.extend(contract_checks())
        if opts.rebuild_from is not None:
            from quantcli.pipelines.rebuild import rebuild

            ok, detail, _ = rebuild(Path(opts.file), reader, opts.rebuild_from, opts.imatrix, opts.profile)
            result.checks.append(Check("rebuild", ok, Path(opts.file).stat().st_size if ok else None, detail))
        if opts.quality is not None and all(c.ok for c in result.checks if c.name == "finite"):
            checks, result.quality = _quality(reader, opts, progress)
            result.checks.extend(checks)
    result.seconds = time.perf_counter() - t0
    return result


# -- the seeds' contracts -------------------------------------------------------------------------


def contract_checks() -> list[Check]:
    """FALSIFY-QO-001..005 and FALSIFY-QUANT-001..005 against this quantcli (pipelines/contracts.py)."""
    from quantcli.pipelines.contracts import run_all

    return [Check(cid, ok, figure, detail) for cid, ok, figure, detail in run_all()]


# -- quality gates ---------------------------------------------------------------------------------


def preset_of(reader: ModelReader, given: str | None = None) -> str | None:
    """The preset a file was made with: --type, else quantcli.preset, else general.file_type's."""
    from quantcli.presets import PRESETS

    if given:
        return given.upper()
    recorded = reader.meta("quantcli.preset")
    if recorded:
        return str(recorded).upper()
    ftype = reader.meta("general.file_type")
    names = [name for name, p in PRESETS.items() if p.ftype == ftype]
    return names[0] if names else None


def gates_for(q: QualityOptions, preset: str | None) -> dict[str, float]:
    """The thresholds in force: the flags over a gate file's per-preset gates over its gates."""
    return {**q.gates, **(q.presets.get(preset or "", {})), **q.flags}


def _quality(reader: ModelReader, opts: VerifyOptions, progress: ProgressFn | None) -> tuple[list[Check], dict]:
    from quantcli.engine import base_logits
    from quantcli.engine.model import Model
    from quantcli.engine.perplexity import PerplexityOptions, chunk_tokens
    from quantcli.engine.tokenizer import Tokenizer
    from quantcli.pipelines.common import open_source, read_text

    q = opts.quality
    preset = preset_of(reader, opts.preset)
    gates = gates_for(q, preset)
    figures: dict[str, float] = {}
    info: dict[str, Any] = {"base": str(q.base), "preset": preset, "gates": gates}
    with open_source(Path(q.base), lambda _m: None) as base:
        model = Model(reader)
        bmodel = Model(base)
        mc, bc = model.config, bmodel.config
        if (mc.arch, mc.n_vocab, mc.n_layer, mc.n_embd) != (bc.arch, bc.n_vocab, bc.n_layer, bc.n_embd):
            raise InputError(f"{q.base}: the base is {bc.arch} ({bc.n_layer} layers, {bc.n_embd} wide, "
                             f"{bc.n_vocab} tokens), {opts.file} is {mc.arch} ({mc.n_layer} layers, {mc.n_embd} "
                             f"wide, {mc.n_vocab} tokens): not its base")
        if any(k not in NEEDS_NO_TEXT for k in gates):
            if q.text is None:
                raise UsageError("the perplexity and KL gates need --eval-text TEXT")
            text = read_text(q.text)
            tokens = Tokenizer.from_model(base).encode(text, add_special=True, parse_special=False)
            pop = PerplexityOptions(ctx=q.ctx, chunks=q.chunks)
            chunks = chunk_tokens(tokens, q.ctx, q.chunks, bc.bos_id, bc.add_bos)
            meta = {"base_sha256": source_sha256(base), "tokens_sha256": hashlib.sha256(chunks.tobytes()).hexdigest(),
                    "ctx": q.ctx, "chunks": int(chunks.shape[0]), "n_vocab": bc.n_vocab, "kv_f16": pop.kv_f16,
                    "act_quant": pop.act_quant, "quantcli": quantcli.__version__}
            folder = (q.cache_dir or cache_root() / "base-logits") / _key(
                meta)
            t0 = time.perf_counter()
            cached = base_logits.load(folder, meta)
            info["base_cached"] = cached is not None
            if cached is None:
                cached = base_logits.build(bmodel, chunks, folder, meta, pop, progress)
            info["base_seconds"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            cmp = base_logits.compare(model, chunks, cached, pop, progress)
            info.update(text=str(q.text), ctx=q.ctx, chunks=int(chunks.shape[0]), tokens=cmp.tokens,
                        cache=str(folder), model_seconds=round(time.perf_counter() - t0, 2),
                        perplexity=cmp.perplexity, perplexity_error=cmp.perplexity_error,
                        base_perplexity=cmp.base_perplexity, kld_mean=cmp.kld_mean, kld_p99=cmp.kld_p99,
                        top1_agreement=cmp.top1_agreement)
            figures.update(ppl_delta=cmp.perplexity - cmp.base_perplexity,
                           ppl_ratio=cmp.perplexity / cmp.base_perplexity, kld=cmp.kld_mean, kld_p99=cmp.kld_p99,
                           top1=cmp.top1_agreement)
        if "min_task_ratio" in gates:
            if q.task is None:
                raise UsageError("the task gate needs --task FILE (multiple choice, JSON Lines)")
            figures["task_ratio"] = _task(reader, base, q, info, progress)
        if "min_coherence" in gates:
            from quantcli.pipelines import coherence

            rep = coherence.check(reader, base, progress=progress)
            figures["coherence"] = rep.coherent
            info.update(coherence=round(rep.coherent, 4), coherence_seconds=round(rep.seconds, 2))
    checks = []
    for key, limit in gates.items():
        name, op = GATES[key]
        value = figures[name]
        ok = value <= limit if op == "<=" else value >= limit
        checks.append(Check(name, bool(ok), round(value, 6), _gate_detail(name, value, op, limit, info)))
    return checks, info


def _key(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]


def _task(reader: ModelReader, base: ModelReader, q: QualityOptions, info: dict[str, Any],
          progress: ProgressFn | None) -> float:
    """acc_norm of the file over the base's on q.task; the base's score is cached like its logits."""
    from quantcli.pipelines import tasks

    items = tasks.load(q.task)
    meta = {"base_sha256": source_sha256(base), "task_sha256": hashlib.sha256(Path(q.task).read_bytes()).hexdigest(),
            "quantcli": quantcli.__version__, "kind": "task"}
    entry = (q.cache_dir or cache_root() / "base-logits") / f"task-{_key(meta)}.json"
    try:
        got = json.loads(entry.read_text(encoding="utf-8"))
        base_score = got["acc_norm"] if got.get("meta") == meta else None
    except (OSError, ValueError, KeyError, AttributeError):
        base_score = None
    info["task_base_cached"] = base_score is not None
    if base_score is None:
        b = tasks.score(base, items, progress=progress)
        base_score = b.acc_norm
        from quantcli.formats.atomic import atomic_write

        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(entry, durable=False) as fh:
                fh.write(json.dumps({"meta": meta, **b.to_json()}).encode())
        except (OSError, QuantcliError):
            pass  # a cache that cannot be written is only slower next time
    mine = tasks.score(reader, items, progress=progress)
    info.update(task=str(q.task), task_items=mine.items, task_acc=mine.acc, task_acc_norm=mine.acc_norm,
                task_base_acc_norm=base_score)
    return mine.acc_norm / base_score if base_score > 0 else (1.0 if mine.acc_norm == 0 else float("inf"))


def _gate_detail(name: str, value: float, op: str, limit: float, info: dict[str, Any]) -> str:
    bound = f"{'max' if op == '<=' else 'min'} {limit:g}"
    if name == "ppl_delta":
        return (f"perplexity {info['perplexity']:.4f} vs base {info['base_perplexity']:.4f}: "
                f"{value:+.4f} ({bound})")
    if name == "ppl_ratio":
        return f"perplexity {info['perplexity']:.4f} / base {info['base_perplexity']:.4f} = {value:.4f} ({bound})"
    if name in ("kld", "kld_p99"):
        return f"{'mean' if name == 'kld' else '99th percentile'} KL divergence {value:.6f} ({bound})"
    if name == "top1":
        return f"top-1 agreement {100 * value:.2f}% ({bound})"
    if name == "task_ratio":
        return (f"task acc_norm {100 * info['task_acc_norm']:.1f}% vs base {100 * info['task_base_acc_norm']:.1f}% "
                f"on {info['task_items']} items: {value:.3f} of it ({bound})")
    return f"coherent on {100 * value:.1f}% of the prompts ({bound})"


def load_gates(path: Path) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, int]]:
    """A gate file: (gates, per-preset gates, ctx/chunks). Mistakes name the file and line.

        max_ppl_delta: 0.5
        max_kld: 0.1
        chunks: 16
        presets:
          Q8_0: {max_kld: 0.01}
          IQ2_XS: {max_ppl_delta: 3.0}
    """
    import yaml

    from quantcli.presets import PRESETS
    from quantcli.profiles import ProfileError, _compose

    path = Path(path)
    text = read_small_text(path, "gate", UsageError, MAX_GATE_FILE_BYTES)
    try:
        root = _compose(text, path)
    except ProfileError as exc:
        raise UsageError(exc.message.replace("in profiles", "in gate files")) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise UsageError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML: "
                         f"{getattr(exc, 'problem', exc)}") from None
    if root is None:
        raise UsageError(f"{path}:1: empty gate file", hint="e.g. max_ppl_delta: 0.5")
    if not isinstance(root, yaml.MappingNode):
        raise UsageError(f"{path}:{root.start_mark.line + 1}: a gate file is a mapping of gates to thresholds")

    def thresholds(node: yaml.MappingNode, allowed: set[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in node.value:
            where = f"{path}:{k.start_mark.line + 1}"
            if k.value not in allowed:
                raise UsageError(f"{where}: unknown key '{k.value}'", hint=f"known: {', '.join(sorted(allowed))}")
            if k.value == "presets":
                out["presets"] = v
                continue
            value = yaml.safe_load(yaml.serialize(v)) if isinstance(v, yaml.ScalarNode) else None
            if k.value in ("ctx", "chunks"):
                if not isinstance(value, int) or isinstance(value, bool) or value < (4 if k.value == "ctx" else 1):
                    raise UsageError(f"{where}: {k.value} must be a positive integer, got {v.value!r}")
            elif (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                  or value < 0 or (k.value in SHARES and value > 1)):
                raise UsageError(f"{where}: {k.value} must be a number >= 0"
                                 + (" and <= 1" if k.value in SHARES else "") + f", got {v.value!r}")
            out[k.value] = value
        return out

    top = thresholds(root, GATE_FILE_KEYS)
    presets: dict[str, dict[str, float]] = {}
    node = top.pop("presets", None)
    if node is not None:
        if not isinstance(node, yaml.MappingNode):
            raise UsageError(f"{path}:{node.start_mark.line + 1}: presets is a mapping of preset names to gates")
        for k, v in node.value:
            name = str(k.value).upper()
            if name not in PRESETS:
                raise UsageError(f"{path}:{k.start_mark.line + 1}: unknown preset '{k.value}'")
            if not isinstance(v, yaml.MappingNode):
                raise UsageError(f"{path}:{v.start_mark.line + 1}: the gates of {k.value} are a mapping")
            presets[name] = thresholds(v, set(GATES))
    sizes = {k: top.pop(k) for k in ("ctx", "chunks") if k in top}
    return top, presets, sizes


def junit_xml(result: VerifyResult) -> bytes:
    """The checks as a JUnit XML report: one testcase per check, a failure with its figure."""
    from xml.etree import ElementTree as ET

    failures = sum(not c.ok for c in result.checks)
    suites = ET.Element("testsuites", name="quantcli verify", tests=str(len(result.checks)),
                        failures=str(failures), errors="0", time=f"{result.seconds:.3f}")
    suite = ET.SubElement(suites, "testsuite", name=f"verify {Path(result.file).name}",
                          tests=str(len(result.checks)), failures=str(failures), errors="0", skipped="0",
                          time=f"{result.seconds:.3f}")
    for c in result.checks:
        case = ET.SubElement(suite, "testcase", name=c.name, classname=f"quantcli.verify.{Path(result.file).stem}",
                             time="0")
        if not c.ok:
            fail = ET.SubElement(case, "failure", message=c.detail, type="verification")
            fail.text = f"{c.name}: {c.detail} (figure: {c.figure})"
        else:
            ET.SubElement(case, "system-out").text = c.detail
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="utf-8")
