"""W8A8 fake quantization: the block linears as an int8 engine (vLLM's int8 kernels, SmoothQuant's
W8A8) computes them, in float32 numpy.

Weights are int8 symmetric per output channel: scale_i = max|W_i·| / 127, q = clamp(rint(W / scale),
-127, 127). Activations are int8 symmetric too, either per token (dynamic: one scale per row,
max|x_t·| / 127, as vLLM's `dynamic_scaled_int8_quant`) or per tensor (static: one scale per matmul
input, max|x| / 127 from calibration maxima, values beyond it clipped to -128..127, as vLLM's
`static_scaled_int8_quant` clamps them).
Rounding is numpy's rint, half to even, as torch.round (compressed-tensors) and vLLM's
`float_to_int8_rn` (nearbyint) round. A row (or token) that is all zero gets scale 0 and q = 0.
The product is dequant(q_x) @ dequant(q_W).T, exact in float32 up to the sum's rounding — an int32
accumulation times the two scales gives the same values.

    sim = W8A8("tensor", act_max={"blk.0.attn_q.weight": 11.5, ...})   # or W8A8("token")
    model = Model(reader, simulate=sim)      # every block linear runs W8A8; head and embeddings do not
    W8A8("token", keep=frozenset({"blk.3.ffn_down.weight"}))           # ... but that one in float
    sat = Saturation(); W8A8("tensor", act_max=..., saturation=sat)      # tallies what static scales clip
    W8A8("hybrid", act_max=...)        # static per-tensor, but ffn_down's input per token (DYNAMIC_IN_HYBRID)

Static scales come from calibration text; another text can go beyond them, and those values clip
(a rare feature's spike, cut to the scale). `Saturation` counts, per linear, the tokens whose input
has a value the static scale cannot hold (|x| / scale beyond 127.5, or -128.5) and the largest
max|x| / scale-max ratio seen (on Gemma 3 270M smoothed on Genesis, every linear clips some Exodus
token, up to 8x its scale).

"hybrid" is static per-tensor except ffn_down's input, which is per token. That input is
act(gate) * up, the MLP's neurons, and which neurons fire depends on the text: on Gemma 3 270M
smoothed on Genesis, the Debian license texts and Vim's manual drive some channel of every
layer's ffn_down input 7-32x beyond its Genesis maximum (the same inputs of the other linears:
1-4x), and static scales calibrated on Genesis clip those by 5-28x. vLLM runs such a checkpoint
with two schemes (compressed-tensors config groups), all of it int8.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from quantcli.errors import InputError, UsageError

MODES = ("token", "tensor", "hybrid")
DYNAMIC_IN_HYBRID = ("ffn_down",)  # the linears (short names) "hybrid" quantizes per token
# what `smooth --activations` and the compressed-tensors writer call each mode
ACTIVATION_MODES = {"dynamic": "token", "static": "tensor", "hybrid": "hybrid"}
QMAX = 127  # symmetric int8: -127..127 (-128 unused, as compressed-tensors' symmetric int8)


def _scaled(x: np.ndarray, scale: np.ndarray, lo: int = -QMAX) -> np.ndarray:
    """clamp(rint(x / scale), lo, 127) as int8; 0 where the scale is 0. scale broadcasts to x."""
    scale = np.broadcast_to(scale, x.shape)
    q = np.divide(x, scale, out=np.zeros(x.shape, np.float32), where=scale > 0)
    np.rint(q, out=q)
    np.clip(q, lo, QMAX, out=q)
    return q.astype(np.int8)


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel: w [n_out, n_in] float32 -> q int8 [n_out, n_in], scale float32 [n_out]."""
    w = np.asarray(w, np.float32)
    scale = (np.abs(w).max(axis=1) / np.float32(QMAX)).astype(np.float32)  # [n_out]
    return _scaled(w, scale[:, None]), scale


def quantize_per_token(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic, per row: x [n, k] -> q int8 [n, k], scale float32 [n]."""
    x = np.asarray(x, np.float32)
    scale = (np.abs(x).max(axis=-1) / np.float32(QMAX)).astype(np.float32)  # [n]
    return _scaled(x, scale[..., None]), scale


def quantize_per_tensor(x: np.ndarray, act_max: float) -> tuple[np.ndarray, np.float32]:
    """Static, one scale: x [n, k] and the calibration max|x| -> q int8 [n, k], scale float32.
    Values beyond the scale clip to -128..127 (vLLM's static kernel); within it they are symmetric."""
    scale = np.float32(np.float32(act_max) / np.float32(QMAX))
    return _scaled(np.asarray(x, np.float32), np.array(scale), lo=-QMAX - 1), scale


def dequantize(q: np.ndarray, scale: np.ndarray | np.float32) -> np.ndarray:
    """q int8 [n, k] times its scale ([n] per row, or a scalar) -> float32 [n, k]."""
    scale = np.asarray(scale, np.float32)
    return q.astype(np.float32) * (scale[..., None] if scale.ndim else scale)


def fake_quant_weight(w: np.ndarray) -> np.ndarray:
    """dequant(q_W): the float32 values an int8 per-channel weight stands for."""
    return dequantize(*quantize_weight(w))


def fake_quant_activations(x: np.ndarray, mode: str, act_max: float | None = None) -> np.ndarray:
    """dequant(q_x) per token, or per tensor with the calibration maximum `act_max`."""
    if mode == "token":
        return dequantize(*quantize_per_token(x))
    if act_max is None:
        raise UsageError("per-tensor static activations need the calibration max|x|")
    return dequantize(*quantize_per_tensor(x, act_max))


def mode_of(mode: str, name: str) -> str:
    """How the W8A8 mode `mode` quantizes the input of the linear with weight (or short) name
    `name`: "token" or "tensor"."""
    if mode == "hybrid":
        parts = name.split(".")
        short = parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]
        return "token" if short in DYNAMIC_IN_HYBRID else "tensor"
    return mode


@dataclass
class Saturation:
    """Per linear (weight name), what its static per-tensor activation scale clipped: `tokens`
    seen, `clipped` tokens with at least one input value beyond the int8 range (rint(x / scale)
    outside -128..127), and `overshoot`, the largest max|x| / (the scale's max|x|) of any token."""

    tokens: dict[str, int] = field(default_factory=dict)
    clipped: dict[str, int] = field(default_factory=dict)
    overshoot: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, x: np.ndarray, act_max: float) -> None:
        """Tally input x [T, n_in] of linear `name`, quantized with the static max|x| `act_max`."""
        scale = np.float32(np.float32(act_max) / np.float32(QMAX))
        hi, lo = np.max(x, axis=-1), np.min(x, axis=-1)  # per token
        peak = np.maximum(hi, -lo)
        if scale > 0:  # as _scaled rounds: rint(x / scale) beyond 127 or below -128 saturates
            clipped = (hi / scale >= np.float32(QMAX + 0.5)) | (lo / scale < np.float32(-QMAX - 1.5))
            over = float(peak.max(initial=0.0)) / float(act_max)
        else:  # a scale of 0 holds nothing but zeros
            clipped = peak > 0
            over = float("inf") if clipped.any() else 0.0
        self.tokens[name] = self.tokens.get(name, 0) + int(x.shape[0])
        self.clipped[name] = self.clipped.get(name, 0) + int(clipped.sum())
        self.overshoot[name] = max(self.overshoot.get(name, 0.0), over)

    def summary(self, worst: int = 5) -> dict:
        """What a report shows: how many linears clipped any token, the share of all (token,
        linear) inputs clipped, the largest overshoot, and the `worst` linears by overshoot (MSE-chosen
        scales clip some tokens by design, a little; a spike several times the scale is what a text
        the scales were not calibrated on brings)."""
        total = sum(self.tokens.values())
        names = sorted(self.tokens, key=lambda n: (-self.overshoot[n], -self.clipped[n], n))
        return {"linears": len(self.tokens), "linears_clipping": sum(v > 0 for v in self.clipped.values()),
                "clipped_share": sum(self.clipped.values()) / total if total else 0.0,
                "max_overshoot": max(self.overshoot.values(), default=0.0),
                "worst": [{"linear": n, "clipped_tokens": self.clipped[n], "tokens": self.tokens[n],
                           "overshoot": self.overshoot[n]} for n in names[:worst] if self.clipped[n]]}


@dataclass(frozen=True)
class W8A8:
    """What `Model(reader, simulate=W8A8(...))` runs the block linears as."""

    mode: str = "token"  # "token": dynamic per-token activation scales; "tensor": static per-tensor;
    #   "hybrid": static per-tensor, ffn_down per token
    act_max: Mapping[str, float] | None = field(default=None, compare=False, repr=False)  # weight name -> max|x|
    keep: frozenset[str] = frozenset()  # weight names the engine runs in float (a smoothed model's kept linears)
    saturation: Saturation | None = field(default=None, compare=False, repr=False)  # static: tally clipping
    # weight name -> (q int8 [out, in], scale float32 [out]) rounded another way than to nearest
    # (GPTQ, calibrate/gptq.py): the engine holds those as they are
    rounded: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown W8A8 activation mode '{self.mode}'; known: {', '.join(MODES)}")
        if self.mode != "token" and self.act_max is None:
            raise UsageError("W8A8 with static per-tensor activations needs act_max (weight name -> max|x|); "
                             "gather it with the absmax observer, or use mode 'token'")

    def dynamic(self, name: str) -> bool:
        """Whether the input of the linear with weight `name` is quantized per token."""
        return mode_of(self.mode, name) == "token"

    def int8(self, name: str) -> bool:
        """Whether the engine runs the linear with weight `name` as W8A8 (not one it keeps in float)."""
        return name not in self.keep

    def weight(self, w: np.ndarray, name: str | None = None) -> np.ndarray:
        """A block linear's weight [n_out, n_in] as the int8 engine holds it (dequantized): rounded
        to nearest, or as `rounded` holds weight `name`."""
        if self.rounded is not None and name in self.rounded:
            q, scale = self.rounded[name]
            if q.shape != w.shape:
                raise InputError(f"{name}: the rounded int8 weight is {q.shape}, the model's {w.shape}")
            return dequantize(q, np.asarray(scale, np.float32))
        return fake_quant_weight(w)

    def activations(self, name: str, x: np.ndarray) -> np.ndarray:
        """The input x [T, n_in] of the matmul with weight `name`, as the int8 engine sees it."""
        if self.dynamic(name):
            return fake_quant_activations(x, "token")
        try:
            amax = self.act_max[name]  # type: ignore[index]
        except KeyError:
            raise InputError(f"no calibration max|x| for {name}; the activation maxima are of another model") from None
        if self.saturation is not None:
            self.saturation.add(name, x, float(amax))
        return fake_quant_activations(x, "tensor", float(amax))
