"""The plan: every tensor's output type, why, and what it costs.

llama.cpp's preset rules (`presets.plan`) choose first; a YAML profile's rules (`profiles.Profile.apply`)
override them; the result is a `Plan` that `quantize` executes, `verify` checks a file against and
`--dry-run` prints.

    plan = make_plan(reader, PlanOptions(preset="Q4_K_M"), has_imatrix=False)
    plan.tensors[0].type, plan.bpw, plan.file_type, plan.sha256
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gguf import GGMLQuantizationType

from quantcli import presets
from quantcli.errors import UsageError
from quantcli.formats.base import TensorInfo
from quantcli.progress import collect_warnings
from quantcli.formats.gguf import type_nbytes


@dataclass(frozen=True)
class PlanOptions:
    """The flags that change what a tensor becomes (llama-quantize's, and quantcli's profile)."""

    preset: str | None = None  # a llama.cpp preset name (Q4_K_M, IQ4_XS, ...) or a type name
    profile: Path | None = None  # a YAML layer profile (its base replaces the preset when none is given)
    output_tensor_type: str | None = None  # --output-tensor-type
    token_embedding_type: str | None = None  # --token-embedding-type
    tensor_types: tuple[tuple[str, str], ...] = ()  # --tensor-type (regex, type); first match wins
    pure: bool = False  # every quantizable tensor gets the default type
    leave_output_tensor: bool = False  # output.weight stays as it is
    allow_requantize: bool = False  # an already quantized input may be quantized again
    dry_run: bool = False  # imatrix problems become warnings, not errors
    source: Path | None = None  # the input, named in errors


@dataclass(frozen=True)
class PlannedTensor:
    info: TensorInfo
    type: str  # the output type name
    reason: str
    nbytes: int
    fallback: bool = False
    estimate: float | None = None  # estimated dKLD of this choice (automatic mixes)

    @property
    def copy(self) -> bool:
        return self.type == self.info.dtype


@dataclass(frozen=True)
class Plan:
    tensors: list[PlannedTensor]  # in the input's order, which is the output's
    preset: presets.Preset
    file_type: int  # general.file_type as llama-quantize writes it
    sha256: str  # of (name, input type, shape, output type) for every tensor
    warnings: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(p.info.n_params for p in self.tensors)

    @property
    def bytes(self) -> int:
        """Tensor data bytes (without alignment padding or the header)."""
        return sum(p.nbytes for p in self.tensors)

    @property
    def bpw(self) -> float:
        return 8.0 * self.bytes / max(self.params, 1)

    @property
    def fallbacks(self) -> int:
        return sum(p.fallback for p in self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def tensor_bytes(info: TensorInfo, type_name: str) -> int:
    """Bytes of `info` stored as `type_name` (its own bytes when the type is its own)."""
    if type_name == info.dtype:
        return info.nbytes
    return type_nbytes(GGMLQuantizationType[type_name], info.gguf_shape)


def plan_sha256(tensors: list[PlannedTensor]) -> str:
    doc = json.dumps([(p.info.name, p.info.dtype, list(p.info.shape), p.type) for p in tensors])
    return hashlib.sha256(doc.encode()).hexdigest()


def make_plan(reader: Any, opts: PlanOptions, *, has_imatrix: bool,
              imatrix_names: frozenset[str] | None = None,
              warn: Callable[[str], None] | None = None) -> Plan:
    """Every tensor's output type and why; the profile (if any) overrides the preset's choice.

    has_imatrix: an importance matrix will be used (some presets choose differently with one);
    imatrix_names: the tensors it covers (None: all of them)."""
    warnings, warn_ = collect_warnings(warn)

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
        tensor_types=tuple(opts.tensor_types), has_imatrix=has_imatrix,
        imatrix_names=imatrix_names, dry_run=opts.dry_run,
    )
    infos = list(reader.tensors.values())
    choices = presets.plan(infos, reader.meta, preset.name, options)
    if profile is not None:
        choices = profile.apply(infos, choices, reader.meta)
    requant = presets.requantized(infos, choices)
    if requant and not opts.allow_requantize:
        first = reader.tensors[requant[0].name]
        raise UsageError(f"{opts.source or reader.path}: requantizing from type {first.dtype} is disabled "
                         f"({len(requant)} tensor(s), e.g. {first.name}); requantizing loses quality",
                         hint="pass --allow-requantize to do it anyway, or start from an F32/F16/BF16 model")
    if opts.dry_run:
        for c in choices:
            if c.requires_imatrix and not has_imatrix:
                warn_(f"{c.name} ({c.type}) will require an importance matrix (--imatrix)")
                break
    planned = [PlannedTensor(info, c.type, c.reason, tensor_bytes(info, c.type), c.fallback)
               for info, c in zip(infos, choices)]
    fallbacks = presets.fallback_count(choices)
    if fallbacks:
        warn_(f"{fallbacks} of {len(planned)} tensor(s) required fallback quantization (rows not "
              "divisible by the type's block size)")
    return Plan(planned, preset, presets.file_type(preset, infos, reader.meta), plan_sha256(planned), warnings)


def type_bpw(type_name: str) -> float:
    """Bits per weight of a GGML type (its block's bytes over its block's weights)."""
    t = GGMLQuantizationType[type_name]
    return 8.0 * type_nbytes(t, (256,)) / 256


def size_claim(plan: Plan) -> dict[str, Any]:
    """The plan's size against F16 and against what its default type alone would give; where it
    falls short (under 80 % of that), the tensors that keep it: those holding the most bytes above
    the default type's, until they explain half of the excess (at most three)."""
    params, nbytes = plan.params, max(plan.bytes, 1)
    out: dict[str, Any] = {"ratio_vs_f16": 2.0 * params / nbytes, "default_type": plan.preset.default_type,
                           "default_ratio_vs_f16": None, "kept_by": []}
    if plan.preset.default_type not in GGMLQuantizationType.__members__:
        return out
    nominal = type_bpw(plan.preset.default_type)
    out["default_ratio_vs_f16"] = 16.0 / nominal
    if out["ratio_vs_f16"] >= 0.8 * out["default_ratio_vs_f16"]:
        return out
    excess = sorted(((p.nbytes - p.info.n_params * nominal / 8, p) for p in plan), key=lambda e: -e[0])
    total = sum(e for e, _ in excess if e > 0)
    covered = 0.0
    for e, p in excess[:3]:
        if e <= 0 or covered >= total / 2:
            break
        covered += e
        out["kept_by"].append({"tensor": p.info.name, "type": p.type, "reason": p.reason,
                               "weights_share": p.info.n_params / max(params, 1), "bytes_share": p.nbytes / nbytes})
    return out
