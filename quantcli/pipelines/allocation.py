"""`quantize --target-size / --target-bpw / --max-kld`: the measured mix.

Order of work: the importance matrix (given, or computed from --calib) -> the sensitivity
measurement (loaded from --measurement FILE when it exists and matches, else measured on --calib and
saved there) -> the plan of the base preset and the user's rules (their tensors are fixed) -> for
every other quantizable tensor its candidate types with bytes and estimated dKLD -> the exact
knapsack (allocate.solve) under the byte budget -> the plan `quantize` executes, with the estimate,
the target and the measurement's sha256 recorded in the output's metadata.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

import quantcli
from quantcli import allocate
from quantcli.allocate import InfeasibleTarget, Measurement, Solution
from quantcli.calibrate import imatrix_file
from quantcli.errors import InputError, UsageError
from quantcli.formats.atomic import atomic_write
from quantcli.plan import Plan, PlannedTensor, plan_sha256
from quantcli.progress import ProgressFn

IMATRIX_CHUNKS = 64  # chunks of the imatrix computed from --calib (llama-imatrix's reference run)
SENSITIVITY_CHUNKS = 2  # chunks whose KL divergence measures each tensor's effect
# the presets a target is compared with ("nearest preset") and may take its file type from
PRESETS = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
           "Q2_K_S", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "IQ4_NL", "Q4_0", "Q4_1", "Q4_K_S",
           "Q4_K_M", "Q5_0", "Q5_1", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
FIXED_REASONS = ("--tensor-type", "--token-embedding-type", "--output-tensor-type", "profile ")


@dataclass(frozen=True)
class Target:
    """What the mix must meet: one of size (file bytes), bpw (tensor bits per weight), max_kld."""

    size: int | None = None
    bpw: float | None = None
    max_kld: float | None = None
    text: str = ""  # as given, recorded in the metadata

    @classmethod
    def of(cls, target_size: str | None, target_bpw: float | None, max_kld: float | None) -> "Target | None":
        given = [x is not None for x in (target_size, target_bpw, max_kld)]
        if sum(given) == 0:
            return None
        if sum(given) > 1:
            raise UsageError("give one of --target-size, --target-bpw and --max-kld")
        if target_size is not None:
            return cls(size=allocate.parse_size(target_size), text=f"size {target_size}")
        if target_bpw is not None:
            if not 0 < target_bpw <= 32:
                raise UsageError(f"--target-bpw {target_bpw} is not a number of bits per weight in (0, 32]")
            return cls(bpw=float(target_bpw), text=f"bpw {target_bpw:g}")
        if not max_kld > 0:
            raise UsageError(f"--max-kld {max_kld} must be positive")
        return cls(max_kld=float(max_kld), text=f"max-kld {max_kld:g}")


# -- the measurement ------------------------------------------------------------------------------


def measure(reader: Any, imatrix: imatrix_file.Imatrix | None, imatrix_sha256: str | None, calib: Path,
            candidates: tuple[str, ...], chunks: int, ctx: int, checkpoint_dir: Path | None,
            keep_checkpoints: bool, threads: int, progress: ProgressFn | None,
            log: Callable[[str], None], ray: str | None = None, source: Path | None = None,
            lora: tuple = ()) -> Measurement:
    """The sensitivity analysis on `calib` (see calibrate/sensitivity.py); with `ray` (a cluster
    address) on a Ray cluster whose workers read `source` (and merge `lora`) themselves."""
    from quantcli.calibrate.runner import RunOptions, make_chunks, model_fingerprint, run_calibration
    from quantcli.calibrate.sensitivity import SensitivityObserver
    from quantcli.engine.model import Model
    from quantcli.engine.tokenizer import Tokenizer
    from quantcli.pipelines.common import read_text

    t0 = time.perf_counter()
    text = read_text(calib)
    model = Model(reader, act_quant=False)
    tokens = Tokenizer.from_model(reader).encode(text, add_special=True)
    obs = SensitivityObserver(candidates=candidates, imatrix=imatrix, imatrix_sha256=imatrix_sha256,
                              threads=threads)
    options = RunOptions(ctx=ctx, chunks=chunks, checkpoint_dir=checkpoint_dir, keep_checkpoints=keep_checkpoints,
                         kind="sensitivity")
    if ray is not None:
        from quantcli.pipelines import cluster

        cluster.sensitivity(Path(source or reader.path), model, make_chunks(model, tokens, options), obs,
                            checkpoint_dir, ray, progress, log, lora, keep_checkpoints)
    else:
        run_calibration(model, tokens, options, [obs], progress, log)
    tensors = {n: allocate.TensorMeasurement(t.name, t.shape, t.errors, t.act_errors, t.kld, t.act_kld)
               for n, t in obs.result().items()}
    return Measurement(
        model={"file": Path(reader.path).name, "fingerprint": model_fingerprint(reader)},
        imatrix_sha256=imatrix_sha256,
        calibration={"text": Path(calib).name, "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
                     "chunks": chunks, "ctx": ctx, "positions": obs.n_positions},
        candidates=list(candidates), references=list(obs.references), tensors=tensors,
        seconds=time.perf_counter() - t0, extra={"quantcli": quantcli.__version__, "top_k_mass": obs.coverage_},
        act_kld=dict(obs.act_kld_))


def save_measurement(m: Measurement, path: Path) -> None:
    data = m.dumps()
    with atomic_write(Path(path)) as fh:
        fh.write(data)


# -- the mix -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mix:
    plan: Plan
    estimate: float  # the mix's estimated mean KLD (sum over tensors)
    target: Target
    measurement_sha256: str
    reachable: tuple[int, int]  # smallest and largest file (size) / tensor bytes (bpw) reachable
    nearest_preset: str
    estimates: dict[str, float]  # per optimised tensor

    def recipe(self) -> dict[str, Any]:
        kld = np.array([self.estimates.get(p.info.name, 0.0) for p in self.plan], np.float32)
        return recipe(self.target, self.estimate, self.measurement_sha256, kld)


def recipe(target: Target, estimate: float, measurement_sha256: str, tensor_kld: np.ndarray) -> dict[str, Any]:
    """The output's quantcli.allocation.* metadata. Its values have fixed sizes (a float32, a
    sha256, one float32 per tensor), so the header's length does not depend on the solution."""
    return {"allocation.target": target.text, "allocation.estimate_kld": float(np.float32(estimate)),
            "allocation.measurement_sha256": measurement_sha256, "allocation.tensor_kld": tensor_kld}


def is_fixed(p: PlannedTensor) -> bool:
    """Chosen by the user (a --tensor-type, embedding/output type, or profile rule), or kept."""
    return p.copy or len(p.info.shape) < 2 or p.reason.startswith(FIXED_REASONS)


def padded(nbytes: int, alignment: int) -> int:
    return -(-nbytes // alignment) * alignment


def preset_sizes(plan_for: Callable[[str], Plan | None]) -> dict[str, int]:
    """Tensor bytes (unpadded) of each preset that plans for this model."""
    out = {}
    for name in PRESETS:
        p = plan_for(name)
        if p is not None:
            out[name] = p.bytes
    return out


def nearest(sizes: dict[str, int], value: float) -> str:
    return min(sizes, key=lambda k: abs(sizes[k] - value)) if sizes else "Q8_0"


def options_of(p: PlannedTensor, m: Measurement, candidates: tuple[str, ...], has_importance: bool,
               alignment: int | None) -> list[tuple[str, int, float]]:
    """(type, bytes, estimated dKLD) of every candidate the tensor can take, by increasing bytes."""
    from quantcli.calibrate.sensitivity import candidates_for
    from quantcli.plan import tensor_bytes

    t = m.tensors[p.info.name]
    out = []
    for q in candidates_for(p.info.name, p.info.shape, candidates, has_importance):
        if q not in t.errors:
            continue
        b = tensor_bytes(p.info, q)
        out.append((q, padded(b, alignment) if alignment else b, t.estimate(q)))
    out.sort(key=lambda o: (o[1], o[2]))
    return out


def make_mix(base: Plan, m: Measurement, target: Target, candidates: tuple[str, ...],
             imatrix: imatrix_file.Imatrix | None, header_bytes: int, alignment: int,
             sizes: dict[str, int]) -> Mix:
    """The plan of least estimated KLD that meets `target` (see the module)."""
    missing = [p.info.name for p in base if not is_fixed(p) and p.info.name not in m.tensors]
    if missing:
        raise InputError(f"the measurement has no entry for {missing[0]} ({len(missing)} tensor(s)): "
                         "it was made for another plan or model",
                         hint="run the analysis again (--calib TEXT) for this model and these rules")
    by_size = target.size is not None
    align = alignment if by_size else None
    free = [p for p in base if not is_fixed(p)]
    fixed_bytes = sum(padded(p.nbytes, alignment) if by_size else p.nbytes for p in base if is_fixed(p))
    offset = fixed_bytes + (header_bytes if by_size else 0)
    options = []
    for p in free:
        has_imp = imatrix is not None and imatrix.importance(p.info.name) is not None
        opts = options_of(p, m, candidates, has_imp, align)
        if not opts:
            raise UsageError(f"no candidate type fits {p.info.name} (rows of {p.info.shape[-1]})",
                             hint="add a type with 32-blocks to --candidates, e.g. Q8_0")
        options.append(opts)
    lo = offset + sum(o[0][1] for o in options)
    hi = offset + sum(max(x[1] for x in o) for o in options)
    header_note = header_bytes if by_size else 0
    near = nearest(sizes, (target.size - header_note) if by_size else
                   (target.bpw * base.params / 8 if target.bpw is not None else lo))
    pairs = [[(b, c) for _, b, c in o] for o in options]
    if target.max_kld is not None:
        sol = allocate.solve_max_cost(pairs, target.max_kld)
        if sol is None:
            best = sum(min(c for _, c in o) for o in pairs)
            raise InfeasibleTarget(f"no mix reaches an estimated KLD of {target.max_kld:g}: the best "
                                   f"estimate is {best:.4g} ({allocate.format_size(hi)} of tensors)",
                                   hint="raise --max-kld or add higher-precision --candidates")
    else:
        if by_size:
            budget, what, shown = target.size, "file", allocate.format_size(target.size)
        else:
            budget = int(target.bpw * base.params / 8)
            what, shown = "tensors", f"{target.bpw:g} bpw"
        if budget < lo or budget > hi:
            rng = (f"{allocate.format_size(lo)} to {allocate.format_size(hi)}" if by_size else
                   f"{8 * lo / base.params:.3f} to {8 * hi / base.params:.3f} bpw")
            raise InfeasibleTarget(f"target {shown} is out of reach: the {what} can be {rng} with these "
                                   f"candidates; the nearest preset is {near} "
                                   f"(about {allocate.format_size(sizes.get(near, 0) + header_note)})",
                                   hint="choose a target in the reachable range")
        sol = allocate.solve(pairs, budget - offset)
        assert sol is not None  # budget >= lo
    return _mix_of(base, free, options, sol, target, m, (lo, hi), near)


def _mix_of(base: Plan, free: list[PlannedTensor], options: list, sol: Solution, target: Target,
            m: Measurement, reachable: tuple[int, int], near: str) -> Mix:
    from quantcli.plan import tensor_bytes

    chosen = {}
    for p, opts, k in zip(free, options, sol.picks):
        q, _, c = opts[k]
        chosen[p.info.name] = (q, c)
    tensors = []
    for p in base:
        if p.info.name in chosen:
            q, c = chosen[p.info.name]
            tensors.append(PlannedTensor(p.info, q, f"auto ({target.text}): est. dKLD {c:.3g}",
                                         tensor_bytes(p.info, q), estimate=c))
        else:
            tensors.append(p)
    plan = replace(base, tensors=tensors, sha256=plan_sha256(tensors))
    estimates = {n: c for n, (_, c) in chosen.items()}
    return Mix(plan, float(sum(estimates.values())), target, m.sha256, reachable, near, estimates)


# -- the profile that reproduces it ---------------------------------------------------------------


def profile_text(mix: Mix) -> str:
    """A YAML profile whose --profile run writes the same file (types, and the allocation metadata)."""
    import yaml

    rules = [{"name": p.info.name, "type": p.type} for p in mix.plan
             if len(p.info.shape) >= 2 and not p.copy]
    recipe = mix.recipe()
    doc = {
        "description": f"quantcli auto mix ({mix.target.text}), estimated KLD {mix.estimate:.4g}",
        "base": mix.plan.preset.name,
        "allocation": {"target": recipe["allocation.target"],
                       "estimate_kld": recipe["allocation.estimate_kld"],
                       "measurement_sha256": recipe["allocation.measurement_sha256"],
                       "tensor_kld": [float(x) for x in recipe["allocation.tensor_kld"]]},
        "rules": rules,
    }
    return "# written by quantcli quantize --save-profile\n" + yaml.safe_dump(doc, sort_keys=False, width=200)


def file_hash_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
