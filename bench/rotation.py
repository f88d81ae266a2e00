"""Static W8A8 with online rotations before the block linears' inputs: a measurement, not a feature.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/rotation.py [MODEL.gguf] [--text exodus.txt]
        [--calib genesis.txt] [--ctx 512] [--chunks 8] [--calib-chunks 512]
        [--rotate qkv,gu,o,down] [--r640 kron|random] [--static-scales mse|max]

x·Wᵀ = (xR)(WR)ᵀ for an orthogonal R: exact in float, and an int8 engine that rotates a linear's
input online (vLLM's compressed-tensors input transforms) quantizes xR per tensor and WR per
channel. One spike channel is spread over all of them, so one static scale need not hold it.
`--rotate` names the inputs rotated: qkv (attn_q/k/v's), gu (ffn_gate/up's), o (attn_output's),
down (ffn_down's); R is a Sylvester Hadamard for a power-of-2 width, and for another width
(Gemma 3 270M's 640) H_(n/20) ⊗ Paley's H₂₀ (`--r640 kron`) or a seeded random orthogonal matrix
(`--r640 random`). Static scales: for the rotated inputs the MSE clip (or the maximum) of xR on
`--calib`'s chunks, from the same 2048 sampled rows as the static-scales observer; for the others,
the maxima MODEL records (a `quantcli smooth --activations static` output) or, for a model that
records none, the static-scales observer's, in the same calibration pass. Rows printed: the
unrotated static model and the rotated one, each as `quantcli report --simulate w8a8:tensor`
scores it. The README ("Online rotations") has the table this gave for Gemma 3 270M.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import smoothing_args  # noqa: E402
from quantcli.calibrate.runner import Observer, RunOptions, run_calibration  # noqa: E402
from quantcli.calibrate.smooth import _SHARING, StaticScaleObserver, mse_clip, sample_rows  # noqa: E402
from quantcli.engine.model import Model  # noqa: E402
from quantcli.engine.perplexity import PerplexityOptions, evaluate  # noqa: E402
from quantcli.engine.tokenizer import Tokenizer  # noqa: E402
from quantcli.engine.w8a8 import W8A8, fake_quant_activations, fake_quant_weight  # noqa: E402
from quantcli.formats import open_model  # noqa: E402
from quantcli.pipelines.smooth import recorded_input_max  # noqa: E402

# --rotate's names for the block's four inputs, each with the linears that read it
GROUPS = {"qkv": _SHARING["attn_q"], "gu": _SHARING["ffn_gate"], "o": _SHARING["attn_output"],
          "down": _SHARING["ffn_down"]}


def sylvester(n: int) -> np.ndarray:
    """The normalized Sylvester Hadamard matrix of order n (a power of 2), float64."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def paley20() -> np.ndarray:
    """Paley's construction I for q = 19: a Hadamard matrix of order 20 (entries ±1)."""
    q = 19
    squares = {i * i % q for i in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)])
    s = np.zeros((20, 20))
    s[0, 1:], s[1:, 0] = 1, -1
    s[1:, 1:] = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]
    return np.eye(20) + s


def rotation(n: int, other: str) -> np.ndarray:
    """An orthogonal n x n float32 matrix: Sylvester for a power of 2, else `other`."""
    if n & (n - 1) == 0:
        r = sylvester(n)
    elif other == "kron":
        m = n // 20
        if n % 20 or m & (m - 1):
            raise SystemExit(f"no H_(n/20) ⊗ H_20 Hadamard of order {n}; use --r640 random")
        r = np.kron(sylvester(m), paley20() / np.sqrt(20))
    else:
        r = np.linalg.qr(np.random.default_rng(0).standard_normal((n, n)))[0]
    assert np.allclose(r @ r.T, np.eye(n), atol=1e-9)
    return r.astype(np.float32)


def short(name: str) -> str:
    return name.split(".")[2]


class RotatedScales(Observer, name="bench-rotated-scales"):
    """Per rotated linear, the max|x| of the static scale of its rotated input xR: measured once
    per block input (q/k/v, gate/up share theirs) and given to every linear that reads it."""

    def __init__(self, mats: dict[str, np.ndarray], kind: str, max_rows: int = 2048) -> None:
        super().__init__(rotated=sorted(mats), kind=kind, max_rows=max_rows)
        self.mats, self.kind, self.max_rows = mats, kind, max_rows
        self.values_: dict[str, float] = {}

    def begin(self, model: Model, chunks: np.ndarray) -> None:
        self.rows_ = sample_rows(chunks, self.max_rows)

    def prepare_layer(self, il, weights, probe) -> None:
        peak: dict[str, float] = {}
        parts: dict[str, list[np.ndarray]] = {}

        def hook(name: str, x: np.ndarray) -> None:
            s = short(name)
            if s not in self.mats or s not in _SHARING:  # a sharer's input is its group's first
                return
            xr = x @ self.mats[s]
            peak[name] = max(peak.get(name, 0.0), float(np.abs(xr).max()))
            seen = parts.setdefault(name, [])
            seen.append(xr[self.rows_[len(seen)]])

        probe(hook, None)
        for name, v in peak.items():
            v = mse_clip(np.concatenate(parts[name]), v) if self.kind == "mse" else v
            for sharer in _SHARING[short(name)]:
                self.values_[f"blk.{il}.{sharer}.weight"] = v


@dataclass(frozen=True)
class RotatedW8A8(W8A8):
    """W8A8 static per tensor, the linears in `mats` (short name -> R) with their inputs rotated."""

    mats: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    rotated_max: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    def weight(self, w: np.ndarray, name: str | None = None) -> np.ndarray:
        r = self.mats.get(short(name)) if name else None
        return super().weight(w, name) if r is None else fake_quant_weight(w @ r) @ r.T

    def activations(self, name: str, x: np.ndarray) -> np.ndarray:
        r = self.mats.get(short(name))
        if r is None:
            return super().activations(name, x)
        return fake_quant_activations(x @ r, "tensor", self.rotated_max[name]) @ r.T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    smoothing_args(ap)
    ap.add_argument("--rotate", default="qkv,gu,o,down")
    ap.add_argument("--r640", choices=("kron", "random"), default="kron")
    ap.add_argument("--static-scales", choices=("mse", "max"), default="mse")
    a = ap.parse_args()

    reader = open_model(a.model)
    shorts = {s for g in a.rotate.split(",") for s in GROUPS[g]}
    by_width: dict[int, np.ndarray] = {}
    mats = {}
    for s in sorted(shorts):
        n = reader.tensors[f"blk.0.{s}.weight"].shape[1]
        if n not in by_width:
            by_width[n] = rotation(n, a.r640)
        mats[s] = by_width[n]

    t0 = time.time()
    recorded = recorded_input_max(reader.kv)
    observers: list[Observer] = [RotatedScales(mats, a.static_scales)]
    if recorded is None:
        observers.append(StaticScaleObserver(a.static_scales))
    tokens = Tokenizer.from_model(reader).encode(a.calib.read_text(), add_special=True, parse_special=False)
    run_calibration(Model(reader), tokens, RunOptions(ctx=a.ctx, chunks=a.calib_chunks, kind="bench-rotation"),
                    observers)
    act_max = recorded if recorded is not None else observers[1].result()
    print(f"calibration: {time.time() - t0:.0f} s; static scales "
          f"{'recorded in the model' if recorded is not None else 'from the static-scales observer'}")

    text = a.text.read_text()
    for label, sim in (("static, unrotated", W8A8("tensor", act_max=act_max)),
                       (f"static, rotated {a.rotate} (other widths: {a.r640})",
                        RotatedW8A8("tensor", act_max=act_max, mats=mats, rotated_max=observers[0].values_))):
        t = time.time()
        r = evaluate(reader, text, PerplexityOptions(ctx=a.ctx, chunks=a.chunks, simulate=sim))
        print(f"{label:52s} {r.perplexity:.4f} ± {r.perplexity_error:.4f}  ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
