"""Automatic mixes: one type per tensor that minimises the estimated KL divergence under a byte budget.

The measurement (`calibrate/sensitivity.py`, saved as a `quantcli.sensitivity/1` JSON document)
gives per tensor t the weight error energy err_w(t, q) of every candidate type q, the measured mean
KLD of t alone quantized to a reference type (float activations), and the measured KLD of t's
inputs alone rounded as its types would (Q8_K for K-quants and IQ types, Q8_0 for the 32-blocks),
where it has that choice. The model of dKLD, per tensor:

    dKLD(t, q) = w(err_w(t, q)) + a(t, A(q))

w: through the references' points (err_w(t, r), k_r) in log-log space; slope 1 below the lowest (a
small perturbation of the logits moves the KL divergence by its square, and the logits' change is
linear in the weights' error: dKLD is proportional to the error energy); between two references
the line through them; above the highest, their slope clamped to 1..2, or 1 with one reference.
a: ggml-cpu rounds a quantized weight's inputs to its vec_dot type A; measured for t on its own
where it has a choice of A, else g_A * slope * err_act(t, A), with g_A from the stream that rounds
every input (`Measurement.act_scale`: on Gemma 3 270M a unit of activation error costs about half
what a unit of weight error does). The tensors' estimates add: independent small errors add their
KL divergences to second order. The estimate of a mix is that sum.

The solver is an exact multiple-choice knapsack by dynamic programming over the byte budget in
units of ceil(budget / 2**18) bytes (each option's bytes rounded *up* to whole units, so the budget
is never exceeded and at most one unit per tensor is left unused). `solve` returns the optimum of
that problem; the tests compare it with brute force.

    m = Measurement.load(path)
    cost = m.estimate("blk.0.ffn_down.weight", "Q4_K")
    picks = solve([[(bytes, cost), ...] per tensor], budget)   # index of the option per tensor
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantcli.errors import InfeasibleTarget, InputError, UsageError
from quantcli.inputs import read_small

SCHEMA = "quantcli.sensitivity/1"
MAX_UNITS = 1 << 18  # DP capacity states
SLOPE_RANGE = (1.0, 2.0)  # allowed log-log slope above the highest reference


__all__ = ["InfeasibleTarget", "Measurement", "TensorMeasurement", "Solution", "solve", "solve_max_cost",
           "parse_size", "format_size"]


# -- sizes -----------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_size(text: str) -> int:
    """'180MB' (10^6), '172MiB' (2^20), '4.5GB', '230552064' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"--target-size '{text}' is not a size",
                         hint="use bytes or a unit: 180MB, 172MiB, 4.5GB")
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(n) or n <= 0:
        raise UsageError(f"--target-size '{text}' must be positive")
    return int(n)


def format_size(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.3f} GB"


# -- the measurement --------------------------------------------------------------------------------


@dataclass
class TensorMeasurement:
    name: str
    shape: tuple[int, ...]
    errors: dict[str, float]  # type -> weight error energy
    act_errors: dict[str, float]  # activation type -> activation rounding error energy
    kld: dict[str, float]  # reference type -> measured mean KLD (float activations)
    act_kld: dict[str, float] = field(default_factory=dict)  # activation type -> measured KLD of its rounding
    act_scale: dict[str, float] = field(default_factory=dict, compare=False)  # see Measurement.act_scale

    def slope1(self) -> float:
        """dKLD per unit of weight error at the lowest reference (0 without one)."""
        pts = self.points()
        return pts[0][1] / pts[0][0] if pts else 0.0

    def points(self) -> list[tuple[float, float]]:
        """(weight error, kld) of the references, by increasing error; those with no error skipped."""
        pts = sorted((self.errors[r], k) for r, k in self.kld.items() if r in self.errors)
        return [(e, k) for e, k in pts if e > 0]

    def estimate(self, type_name: str) -> float:
        """Estimated dKLD of this tensor stored as `type_name`: its weights' error, and the rounding
        of its inputs that type brings (see the module)."""
        return self.weight_estimate(self.errors[type_name]) + self.act_estimate(type_name)

    def act_estimate(self, type_name: str) -> float:
        from quantcli.engine.ops import activation_type  # (not at import: ops is the engine's)

        act = activation_type(type_name)
        if act in self.act_kld:
            return self.act_kld[act]
        return self.act_scale.get(act, 1.0) * self.slope1() * self.act_errors.get(act, 0.0)

    def weight_estimate(self, e: float) -> float:
        """dKLD of a weight error energy e, through the references' points in log-log space."""
        pts = self.points()
        if e <= 0 or not pts:
            return 0.0
        floor = 1e-12  # a reference whose effect is below measurement keeps its slope defined
        (e0, k0) = pts[0]
        k0 = max(k0, floor)
        if e <= e0 or len(pts) == 1:
            return k0 * (e / e0)
        (e1, k1) = pts[-1]
        k1 = max(k1, floor)
        slope = math.log(k1 / k0) / math.log(e1 / e0) if e1 > e0 else 1.0
        if e <= e1:
            return k0 * (e / e0) ** min(max(slope, 0.0), 4.0)
        return k1 * (e / e1) ** min(max(slope, SLOPE_RANGE[0]), SLOPE_RANGE[1])


@dataclass
class Measurement:
    """A `quantcli.sensitivity/1` document: what a later run needs to allocate for any target."""

    model: dict[str, Any]  # {"file", "fingerprint"}
    imatrix_sha256: str | None
    calibration: dict[str, Any]  # {"text_sha256", "chunks", "ctx", "positions"}
    candidates: list[str]
    references: list[str]
    tensors: dict[str, TensorMeasurement]
    seconds: float = 0.0
    sha256: str = ""  # of the file's bytes (set by load / dumps)
    extra: dict[str, Any] = field(default_factory=dict)
    act_kld: dict[str, float] = field(default_factory=dict)  # activation type -> KLD of rounding alone

    def __post_init__(self) -> None:
        scale = self.act_scale()
        for t in self.tensors.values():
            t.act_scale = scale

    def act_scale(self) -> dict[str, float]:
        """Per activation type A, what a unit of activation error energy costs relative to a unit
        of weight error, for the tensors whose rounding to A was not measured on its own: the
        measured KLD of every input rounded to A (weights float) less the tensors measured on
        their own, over what the others' weight-error slopes predict for their activation errors.
        Without a measurement of it, 1."""
        out = {}
        for act, k in self.act_kld.items():
            alone = math.fsum(t.act_kld[act] for t in self.tensors.values() if act in t.act_kld)
            predicted = math.fsum(t.slope1() * t.act_errors.get(act, 0.0) for t in self.tensors.values()
                                  if act not in t.act_kld)
            out[act] = max(k - alone, 0.0) / predicted if predicted > 0 else 1.0
        return out

    def estimate(self, name: str, type_name: str) -> float:
        return self.tensors[name].estimate(type_name)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "model": self.model, "imatrix_sha256": self.imatrix_sha256,
                "calibration": self.calibration, "candidates": self.candidates,
                "references": self.references, "seconds": round(self.seconds, 1), "act_kld": self.act_kld,
                **self.extra,
                "tensors": {n: {"shape": list(t.shape), "errors": t.errors, "act_errors": t.act_errors,
                                "kld": t.kld, "act_kld": t.act_kld} for n, t in self.tensors.items()}}

    def dumps(self) -> bytes:
        data = (json.dumps(self.to_json(), indent=1) + "\n").encode()
        self.sha256 = hashlib.sha256(data).hexdigest()
        return data

    @classmethod
    def load(cls, path: Path) -> "Measurement":
        path = Path(path)
        raw = read_small(path, "measurement")
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
                raise ValueError(f"not a {SCHEMA} document")
            tensors = {}
            for name, t in doc["tensors"].items():
                tensors[name] = TensorMeasurement(
                    name, tuple(int(d) for d in t["shape"]),
                    {str(k): _number(v) for k, v in t["errors"].items()},
                    {str(k): _number(v) for k, v in t["act_errors"].items()},
                    {str(k): _number(v) for k, v in t["kld"].items()},
                    {str(k): _number(v) for k, v in t.get("act_kld", {}).items()})
            known = {"schema", "model", "imatrix_sha256", "calibration", "candidates", "references",
                     "seconds", "tensors", "act_kld"}
            m = cls(dict(doc["model"]), doc.get("imatrix_sha256"), dict(doc["calibration"]),
                    [str(c) for c in doc["candidates"]], [str(r) for r in doc["references"]], tensors,
                    float(doc.get("seconds", 0.0)), hashlib.sha256(raw).hexdigest(),
                    {k: v for k, v in doc.items() if k not in known},
                    {str(k): _number(v) for k, v in doc.get("act_kld", {}).items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{path}: not a valid measurement file ({exc})",
                             hint="make one with quantize --calib TEXT --measurement FILE") from None
        return m

    def check(self, path: Path, fingerprint: str, imatrix_sha256: str | None) -> None:
        """Refuse a measurement of another model or made with another importance matrix."""
        if self.model.get("fingerprint") != fingerprint:
            raise InputError(f"{path}: the measurement was made for another model "
                             f"({self.model.get('file')}), not this one",
                             hint="run the analysis again for this model (--calib TEXT)")
        if imatrix_sha256 is not None and self.imatrix_sha256 not in (None, imatrix_sha256):
            raise InputError(f"{path}: the measurement was made with another importance matrix",
                             hint="pass the imatrix it was made with, or run the analysis again")


def _number(v: Any) -> float:
    x = float(v)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"bad value {v!r}")
    return x


# -- the solver ------------------------------------------------------------------------------------


def _dp_kernel(weights, costs, n_opts, C, choice, best):
    """Multiple-choice knapsack: best[c] = min cost with capacity c (at most), choice[i, c] = option."""
    n = weights.shape[0]
    new = np.empty(C + 1, np.float64)
    for c in range(C + 1):
        best[c] = 0.0
    for i in range(n):
        for c in range(C + 1):
            v_best = np.inf
            k_best = -1
            for k in range(n_opts[i]):
                w = weights[i, k]
                if w <= c:
                    v = best[c - w] + costs[i, k]
                    if v < v_best:
                        v_best = v
                        k_best = k
            new[c] = v_best
            choice[i, c] = k_best
        for c in range(C + 1):
            best[c] = new[c]


_kernel = None


def _dp():
    global _kernel
    if _kernel is None:
        from numba import njit

        _kernel = njit(cache=True, nogil=True)(_dp_kernel)
    return _kernel


@dataclass(frozen=True)
class Solution:
    picks: list[int]  # option index per item
    bytes: int
    cost: float


def _tables(options: list[list[tuple[int, float]]], unit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(options)
    K = max(len(o) for o in options)
    weights = np.zeros((n, K), np.int64)
    costs = np.full((n, K), np.inf)
    n_opts = np.array([len(o) for o in options], np.int64)
    for i, opts in enumerate(options):
        for k, (b, c) in enumerate(opts):
            weights[i, k] = -(-int(b) // unit)
            costs[i, k] = float(c)
    return weights, costs, n_opts


def _run(options: list[list[tuple[int, float]]], capacity: int, unit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    weights, costs, n_opts = _tables(options, unit)
    C = capacity // unit
    choice = np.empty((len(options), C + 1), np.int16)
    best = np.empty(C + 1, np.float64)
    _dp()(weights, costs, n_opts, C, choice, best)
    return weights, choice, best


def _backtrack(options, weights: np.ndarray, choice: np.ndarray, c: int) -> Solution:
    picks = [0] * len(options)
    for i in range(len(options) - 1, -1, -1):
        k = int(choice[i, c])
        picks[i] = k
        c -= int(weights[i, k])
    return Solution(picks, sum(options[i][k][0] for i, k in enumerate(picks)),
                    math.fsum(options[i][k][1] for i, k in enumerate(picks)))


def solve(options: list[list[tuple[int, float]]], budget: int, unit: int | None = None) -> Solution | None:
    """The options (one per item; each (bytes, cost)) of least total cost whose bytes, rounded up to
    `unit` each, fit `budget`; None when even the smallest do not fit."""
    if not options:
        return Solution([], 0, 0.0)
    if any(not o for o in options):
        raise ValueError("every item needs at least one option")
    unit = unit or max(1, -(-budget // MAX_UNITS))
    if sum(-(-min(b for b, _ in o) // unit) for o in options) > budget // unit:
        return None
    weights, choice, best = _run(options, budget, unit)
    if not math.isfinite(best[budget // unit]):
        return None
    return _backtrack(options, weights, choice, budget // unit)


def solve_max_cost(options: list[list[tuple[int, float]]], max_cost: float,
                   unit: int | None = None) -> Solution | None:
    """The smallest mix (in units) whose cost stays at or under `max_cost`; None when none does."""
    if not options:
        return Solution([], 0, 0.0)
    top = sum(max(b for b, _ in o) for o in options)
    unit = unit or max(1, -(-top // MAX_UNITS))
    weights, choice, best = _run(options, top + unit * len(options), unit)
    ok = np.nonzero(best <= max_cost)[0]
    if not ok.size:
        return None
    return _backtrack(options, weights, choice, int(ok[0]))
