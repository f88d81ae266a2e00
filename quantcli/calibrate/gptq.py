"""GPTQ rounding of int8 per-channel weights (Frantar et al., 2023), on the calibration runner.

Round to nearest (RTN) rounds every weight on its own, which minimises ||W - Q||^2. What the model
sees is the output error ||X (W - Q)^T||^2 over its inputs X; GPTQ rounds the columns of W one at a
time and moves each column's rounding error onto the columns not yet rounded, through the inverse
of the inputs' second moment H = X^T X / n, so that the later columns absorb what the earlier ones
lost. The grid is RTN's: per output channel scale_i = max|W_i| / 127 (what compressed-tensors'
`weight_scale` holds and vLLM multiplies by), q = clamp(rint(w / scale), -127, 127); only which
integer each weight gets changes. Columns are rounded in blocks of `block` with the updates inside
a block applied at once, as the paper's lazy batch; H is damped by `damp` times its mean diagonal.

`smooth --gptq` runs it after smoothing: `GPTQObserver` follows the observer that folds the
smoothing scales into a layer's weights, gathers H of every linear's input on the same calibration
pass (inputs that q/k/v or gate/up share, once), and rounds the layer's linears when all chunks have
been through it. The inputs are the float model's (as llm-compressor's GPTQ, not a pass through
already rounded layers). It holds the int8 weights (one byte a weight) until they are written, and
checkpoints them with each layer, so a resumed run gives the same bytes.

    obs = GPTQObserver()
    run_calibration(model, tokens, options, [smooth_observer, obs])
    res = obs.result()     # GPTQResult: {weight name: (q int8 [out, in], scale float32 [out])}
    res.errors             # {weight name: (RTN's output error, GPTQ's)}, tr(dW H dW^T)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quantcli.calibrate.runner import Observer
from quantcli.engine.model import LINEARS
from quantcli.engine.w8a8 import QMAX, quantize_weight
from quantcli.errors import NumericError

BLOCK = 128  # columns rounded before their error is carried on to the rest
DAMP = 0.01  # of H's mean diagonal, added to it


def output_error(w: np.ndarray, q: np.ndarray, scale: np.ndarray, h: np.ndarray) -> float:
    """tr(dW H dW^T), dW = W - q * scale: the mean squared output error per token."""
    d = np.asarray(w, np.float64) - q.astype(np.float64) * np.asarray(scale, np.float64)[:, None]
    return float(np.sum((d @ np.asarray(h, np.float64)) * d))


def gptq_int8(w: np.ndarray, h: np.ndarray, block: int = BLOCK, damp: float = DAMP,
              act_order: bool = False, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """w [n_out, n_in] float, h [n_in, n_in] the input's second moment -> (q int8, scale float32
    [n_out]) on RTN's per-channel grid. Channels whose input is always zero (H's diagonal 0) are
    rounded to nearest and carry no error on. `act_order`: the columns are rounded by decreasing
    H_jj, the loudest inputs first, while the most columns are left to take up their error (with
    one scale per channel, the order changes nothing else). It is off: where a few tokens' massive
    activations make most of H (the BOS token of Gemma 3), it fits the rounding to those tokens —
    measured on Gemma 3 270M, per-token W8A8 9.3043 with it against 9.2332 without (RTN 9.2940)."""
    w = np.asarray(w, np.float32)
    n_out, n_in = w.shape
    if h.shape != (n_in, n_in):
        raise ValueError(f"{name}: H is {h.shape}, the weight has {n_in} inputs")
    if not np.isfinite(w).all():  # as the round-to-nearest writer refuses them
        raise NumericError(f"{name}: NaN or Inf weights cannot be quantized")
    _, scale = quantize_weight(w)  # RTN's scales, float32
    s = np.where(scale > 0, scale, 1.0).astype(np.float64)[:, None]
    H = np.array(h, np.float64)
    if not np.isfinite(H).all():
        raise NumericError(f"{name}: its inputs' second moment is not finite (NaN or Inf activations)")
    dead = np.diag(H) <= 0
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    H[dead, dead] = 1.0
    live = ~dead
    H[np.diag_indices(n_in)] += damp * (float(np.mean(np.diag(H)[live])) if live.any() else 1.0)
    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n_in)
    H = H[np.ix_(order, order)]
    try:
        U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H^-1 = U^T U
    except np.linalg.LinAlgError:
        raise NumericError(f"{name}: its inputs' second moment is not positive definite") from None
    W = w.astype(np.float64)[:, order]
    q = np.zeros((n_out, n_in), np.int8)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        W1 = W[:, i1:i2].copy()
        E = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            qi = np.clip(np.rint(col[:, None] / s), -QMAX, QMAX)[:, 0]
            q[:, i1 + i] = qi
            e = (col - qi * s[:, 0]) / U1[i, i]
            W1[:, i + 1:] -= np.outer(e, U1[i, i + 1:])
            E[:, i] = e
        W[:, i2:] -= E @ U[i1:i2, i2:]
    out = np.empty_like(q)
    out[:, order] = q
    out[scale == 0] = 0
    return out, scale


@dataclass
class GPTQResult:
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (q, scale)
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (RTN, GPTQ) output error

    def summary(self) -> dict[str, Any]:
        rtn = float(sum(e[0] for e in self.errors.values()))
        gptq = float(sum(e[1] for e in self.errors.values()))
        return {"linears": len(self.weights), "error_rtn": rtn, "error_gptq": gptq,
                "reduction": (1.0 - gptq / rtn) if rtn > 0 else 0.0}


class GPTQObserver(Observer, name="gptq"):
    """GPTQ's int8 weights of every block linear, from the inputs of the layer as the observers
    before it left its weights (see the module)."""

    def __init__(self, block: int = BLOCK, damp: float = DAMP) -> None:
        super().__init__(block=block, damp=damp)
        self.block, self.damp = int(block), float(damp)
        self.result_ = GPTQResult()
        self._layer_reset()

    def _layer_reset(self) -> None:
        self.weights_: dict[str, np.ndarray] | None = None
        self.h_: dict[str, np.ndarray] = {}  # leader weight name -> sum x^T x (float64)
        self.rows_: dict[str, int] = {}
        self.leader_: dict[str, str] = {}  # weight name -> the one whose input it shares
        self.last_: tuple[str, np.ndarray] | None = None
        self.il_ = -1

    def prepare_layer(self, il: int, weights: dict[str, np.ndarray], probe: Any) -> None:
        self._layer_reset()
        self.weights_, self.il_ = weights, il  # edited in place by the observers before this one

    def on_input(self, name: str, x: np.ndarray) -> None:
        if not name.startswith(f"blk.{self.il_}.") or name.split(".")[2] not in LINEARS:
            return
        if self.last_ is not None and self.last_[1] is x:  # q/k/v, gate/up: one input
            self.leader_[name] = self.leader_.get(self.last_[0], self.last_[0])
            return
        self.last_ = (name, x)
        x32 = np.asarray(x, np.float32)
        self.h_[name] = self.h_.get(name, 0.0) + (x32.T @ x32).astype(np.float64)
        self.rows_[name] = self.rows_.get(name, 0) + x32.shape[0]

    def end_layer(self, il: int) -> None:
        weights = self.weights_ or {}
        for short in LINEARS:
            if short not in weights:
                continue
            name = f"blk.{il}.{short}.weight"
            lead = self.leader_.get(name, name)
            if lead not in self.h_:
                continue
            h = self.h_[lead] / max(self.rows_[lead], 1)
            w = weights[short]
            q, scale = gptq_int8(w, h, self.block, self.damp, name=name)
            q0, _ = quantize_weight(w)
            self.result_.weights[name] = (q, scale)
            self.result_.errors[name] = (output_error(w, q0, scale, h), output_error(w, q, scale, h))
        self._layer_reset()

    def layer_state(self, il: int) -> dict[str, np.ndarray]:
        out = {}
        for name, (q, scale) in self.result_.weights.items():
            if name.startswith(f"blk.{il}."):
                out[f"q:{name}"], out[f"s:{name}"] = q, scale
                out[f"e:{name}"] = np.array(self.result_.errors[name], np.float64)
        return out

    def load_layer_state(self, il: int, state: dict[str, np.ndarray]) -> None:
        for key, arr in state.items():
            kind, name = key.split(":", 1)
            if kind == "q":
                self.result_.weights[name] = (arr.astype(np.int8), state[f"s:{name}"].astype(np.float32))
            elif kind == "e":
                self.result_.errors[name] = (float(arr[0]), float(arr[1]))

    def result(self) -> GPTQResult:
        return self.result_
