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

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from quantcli.errors import QuantcliError
from quantcli.formats import ModelReader, open_model
from quantcli.formats.gguf import type_nbytes
from quantcli.plan import PlanOptions, make_plan

SCHEMA = "quantcli.verify/1"
ORDER = [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.F16, Q.F32]
BYTES_PER_32 = {Q.Q4_K: 18.0, Q.Q6_K: 26.25, Q.Q8_0: 34.0, Q.F16: 64.0, Q.F32: 128.0}


@dataclass(frozen=True)
class VerifyOptions:
    file: Path
    preset: str | None = None
    profile: Path | None = None


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

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "file": self.file, "ok": self.ok,
                "checks": [asdict(c) for c in self.checks]}


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


def run(opts: VerifyOptions) -> VerifyResult:
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
    return result
