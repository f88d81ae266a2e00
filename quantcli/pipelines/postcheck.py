"""After an ultra-low-bit `quantize`: does the file still talk, and if not, which hybrid does?

`quantize` calls `run` once the output is written when the preset is ultra-low (`ULTRA_LOW`) or the
plan averages under `BPW` bits per weight, unless `--no-check`. The coherence check
(`pipelines.coherence`) compares the output with the input. At `PASS` or above there is nothing to
say; below it a hybrid is looked for and checked the same way before it is offered:

1. Bits go where ultra-low types break a model, in `LEVELS` from the richest: every block tensor
   raised to at least Q6_K, Q5_K or Q4_K; then only attention's values and output projection and the
   feed-forward down projection (the super weights' tensor), to Q4_K, then to Q3_K. Only tensors
   below the level are named (`--tensor-type`, after the user's own rules, which still win;
   llama.cpp's shape fallback applies as usual).
2. The bytes come back from the token embedding: the largest type of `EMBEDDING_LADDER` below its
   type now (that divides its rows) under which some level fits: the file no larger than the one
   checked (`SLACK`; `--token-embedding-type`; sizes from dry runs, which cost no quantization).
   The embedding goes first (as high as it can stay), then the richest level at that type.
3. The first hybrid that fits is quantized into a scratch folder beside the output, checked, and
   deleted; when it passes, its exact command is the suggestion; when not, the next that fits
   (`MAX_CHECKS` in all). When none fits or passes, the note says so and points at the measured mix
   (`--target-size S --calib TEXT`), which needs a calibration text this run does not have.

The thresholds and the figures on Gemma 3 270M are in README "Coherence".
"""

from __future__ import annotations

import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from quantcli.errors import QuantcliError
from quantcli.pipelines import coherence
from quantcli.pipelines.common import merge_adapters, open_source
from quantcli.plan import type_bpw
from quantcli.progress import ProgressFn

ULTRA_LOW = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "TQ1_0", "TQ2_0", "Q2_K", "Q2_K_S")
BPW = 3.0  # any plan averaging fewer bits per weight is checked too
PASS = 0.9  # the share of coherent prompts below which quantize warns
SLACK = 1.0  # "about the same size": a hybrid's file is no larger than the file it replaces
ROLES = ("attn_v", "attn_output", "ffn_down")  # where ultra-low types break a model first
# the hybrids, richest first: every block tensor at least Q6_K, Q5_K, Q4_K; then ROLES alone
LEVELS: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("Q6_K", None), ("Q5_K", None), ("Q4_K", None), ("Q4_K", ROLES), ("Q3_K", ROLES))
MAX_CHECKS = 2  # hybrids quantized and checked at most (a check is ~1 min for a 270M model)
EMBEDDING_LADDER = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "IQ4_NL", "Q4_0")


def wanted(preset: str | None, bpw: float) -> bool:
    """Does a quantize of this preset and average bpw get the check?"""
    return (preset or "").upper() in ULTRA_LOW or bpw < BPW


@dataclass(frozen=True)
class Suggestion:
    command: str
    file_bytes: int
    coherent: float
    changes: tuple[str, ...]  # the flags it adds to the original command

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "file_bytes": self.file_bytes, "coherent": round(self.coherent, 4),
                "changes": list(self.changes)}


@dataclass(frozen=True)
class PostCheck:
    report: coherence.CoherenceReport | None  # None: skipped (the note says why)
    suggestion: Suggestion | None = None
    note: str = ""  # without a suggestion: why not
    tried: list[dict[str, Any]] = field(default_factory=list)  # each hybrid checked: changes, bytes, coherent

    @property
    def passed(self) -> bool:
        return self.report is not None and self.report.coherent >= PASS

    def to_json(self) -> dict[str, Any]:
        r = self.report
        if r is None:
            return {"skipped": self.note, "passed": False, "pass": PASS}
        return {"coherent": round(r.coherent, 4), "prompts": len(r.results), "pass": PASS, "passed": self.passed,
                "seconds": round(r.seconds, 2), "tokens_per_second": round(r.tokens_per_second, 1),
                "failed_prompts": [x.prompt for x in r.results if not x.coherent],
                "suggestion": self.suggestion.to_json() if self.suggestion else None,
                "note": self.note, "tried": self.tried}


def run(opts: Any, plan: list[Any], file_bytes: int, progress: ProgressFn | None = None,
        on_stage: Callable[[str], None] | None = None) -> PostCheck:
    """Check opts.output against opts.input (a `quantize.QuantizeOptions` that has just run, with
    its plan and file size) and, below PASS, look for a checked hybrid of about that size."""
    stage = on_stage or (lambda _s: None)
    with open_source(Path(opts.input), lambda _m: None) as base:
        base, _ = merge_adapters(base, getattr(opts, "lora", ()), True, lambda _m: None)  # what was quantized
        need = memory_needed(base)
        have = memory_available()
        if have is not None and need > have:
            return PostCheck(None, note=f"the coherence check needs ~{need / 2**30:.1f} GiB (both models held as "
                                        f"float32), {have / 2**30:.1f} GiB is available: skipped; run `quantcli "
                                        f"report {opts.output} --coherence --base {opts.input}` where it fits")
        stage(f"checking {opts.output} against {opts.input}")
        report = coherence.check(opts.output, base, progress=progress)
        if report.coherent >= PASS:
            return PostCheck(report)
        if any(x is not None for x in (opts.target_size, opts.target_bpw, opts.max_kld)):
            return PostCheck(report, note="an automatic mix: a larger target, or --max-kld, gives a "
                                          "coherent one")
        return _search(opts, plan, file_bytes, report, base, progress, stage)


def memory_needed(reader: Any) -> int:
    """Bytes the check holds: both models' weights as float32 (each decodes with all its layers
    held), the output rows of each, and ~1 GiB of working arrays and interpreter."""
    params = sum(i.n_params for i in reader.tensors.values())
    return 2 * 4 * params + 2**30


def memory_available() -> int | None:
    """MemAvailable of /proc/meminfo (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _search(opts: Any, plan: list[Any], file_bytes: int, report: coherence.CoherenceReport, base: Any,
            progress: ProgressFn | None, stage: Callable[[str], None]) -> PostCheck:
    from quantcli.pipelines import quantize

    budget = int(file_bytes * SLACK)
    tried: list[dict[str, Any]] = []
    scratch = Path(tempfile.mkdtemp(prefix=".quantcli-hybrid-", dir=Path(opts.output).resolve().parent))
    try:
        for hopts, nbytes, changes in _candidates(opts, plan, budget):
            if sum(t["coherent"] is not None for t in tried) == MAX_CHECKS:
                break
            stage(f"checking a hybrid: {' '.join(changes)}")
            out = scratch / "hybrid.gguf"
            try:
                quantize.run(replace(hopts, output=out, checkpoint_dir=scratch / "checkpoints", force=True))
                rep = coherence.check(out, base, progress=progress)
            except QuantcliError as exc:  # the file the user asked for is written: say why, go on
                tried.append({"changes": list(changes), "file_bytes": nbytes, "coherent": None, "why": str(exc)})
                continue
            finally:
                out.unlink(missing_ok=True)
            tried.append({"changes": list(changes), "file_bytes": nbytes, "coherent": round(rep.coherent, 4)})
            if rep.coherent >= PASS:
                command = command_of(replace(hopts, output=_hybrid_name(Path(opts.output))))
                return PostCheck(report, Suggestion(command, nbytes, rep.coherent, changes), tried=tried)
        if any(t["coherent"] is not None for t in tried):
            note = "no hybrid of this size or smaller passed the check"
        elif tried:
            note = f"no hybrid could be made: {tried[-1]['why']}"
        else:
            note = (f"no hybrid of this size or smaller: raising {'/'.join(ROLES)} to {LEVELS[-1][0]} costs more "
                    "than the token embedding gives back")
        note += f"; a measured mix: --target-size {file_bytes} --calib TEXT (the automatic allocation)"
        return PostCheck(report, note=note, tried=tried)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _candidates(opts: Any, plan: list[Any], budget: int) -> Iterator[tuple[Any, int, tuple[str, ...]]]:
    """The hybrids that fit the budget, best first: the token embedding as high as it can stay
    (in a tied model it is also the output head, whose error reaches every logit), and at each
    embedding type the richest level that fits. Sizes come from dry runs (planning only)."""
    from quantcli.calibrate.sensitivity import block_size  # imports the engine: not at CLI start-up
    from quantcli.pipelines import quantize

    embd = next((p for p in plan if p.info.name == "token_embd.weight"), None)
    ladder: list[str | None] = [None]  # first: the embedding as it is
    if embd is not None and opts.token_embedding_type is None:
        row = embd.info.shape[-1]  # numpy order: a row is the last axis
        ladder += [t for t in EMBEDDING_LADDER if type_bpw(t) < type_bpw(embd.type) and row % block_size(t) == 0]
    for embedding in ladder:
        for raise_to, roles in LEVELS:
            rules = _raises(plan, raise_to, roles)
            if not rules:
                continue
            hopts = replace(opts, tensor_types=tuple(opts.tensor_types) + rules,
                            token_embedding_type=embedding or opts.token_embedding_type)
            try:
                dry = quantize.run(replace(hopts, dry_run=True))
            except QuantcliError:  # e.g. a type this tensor's rows do not take: not a candidate
                continue
            if dry.file_bytes is not None and dry.file_bytes <= budget:
                yield hopts, dry.file_bytes, _flags(rules, embedding)


def _raises(plan: list[Any], raise_to: str, roles: tuple[str, ...] | None) -> tuple[tuple[str, str], ...]:
    """--tensor-type rules raising the block tensors of these roles (None: every role) that hold
    fewer bits than raise_to, and no others: a role's rule names its layers when some already
    hold more."""
    need = type_bpw(raise_to)
    by_role: dict[str, list[tuple[int, bool]]] = {}
    for p in plan:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", p.info.name)
        if m and len(p.info.shape) >= 2:
            by_role.setdefault(m.group(2), []).append((int(m.group(1)), type_bpw(p.type) < need))
    rules = []
    for role, layers in by_role.items():
        low = [il for il, below in layers if below]
        if (roles is not None and role not in roles) or not low:
            continue
        if len(low) == len(layers):
            rules.append((rf"{role}\.weight", raise_to))
        else:
            rules.append((rf"blk\.({'|'.join(map(str, low))})\.{role}\.weight", raise_to))
    return tuple(rules)


def _flags(rules: tuple[tuple[str, str], ...], embedding: str | None) -> tuple[str, ...]:
    flags = [f"--tensor-type {shlex.quote(f'{p}={t}')}" for p, t in rules]
    return tuple(flags + ([f"--token-embedding-type {embedding}"] if embedding else []))


def _hybrid_name(output: Path) -> Path:
    return output.with_name(f"{output.stem}-hybrid{output.suffix or '.gguf'}")


def command_of(opts: Any) -> str:
    """The `quantcli quantize` command line that makes these options' plan."""
    args = ["quantcli", "quantize", str(opts.input), str(opts.output)]
    flag = args.append
    for name, value in (("--type", opts.preset), ("--profile", opts.profile), ("--imatrix", opts.imatrix),
                        ("--output-tensor-type", opts.output_tensor_type),
                        ("--token-embedding-type", opts.token_embedding_type),
                        ("--super-weight-type", opts.super_weight_type)):
        if value is not None:
            args += [name, str(value)]
    for name, values in (("--include-weights", opts.include_weights), ("--exclude-weights", opts.exclude_weights),
                         ("--override-kv", opts.override_kv)):
        for v in values:
            args += [name, v]
    for pattern, type_name in opts.tensor_types:
        args += ["--tensor-type", f"{pattern}={type_name}"]
    for name, on in (("--pure", opts.pure), ("--leave-output-tensor", opts.leave_output_tensor),
                     ("--allow-requantize", opts.allow_requantize),
                     ("--protect-super-weights", opts.protect_super_weights)):
        if on:
            flag(name)
    return shlex.join(args)
