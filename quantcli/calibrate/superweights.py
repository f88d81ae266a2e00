"""Super weights (Yu et al., 2024) found from activations on the calibration runner, and
confirmed by what zeroing them does.

A super weight sits in a down projection: one input channel j carries a large activation at some
token, one weight W[i, j] multiplies it into output channel i, and the product is nearly all of
a spike in what the feed-forward block adds to the residual stream there — a spike that
persists in the stream as a "massive activation" the model's attention depends on. Its
magnitude is unremarkable (Gemma 3 270M's blk.0.ffn_down[400, 1405] ranks ~189th in its tensor),
so it is found from activations, not weights:

1. **Per layer**, while the calibration runs: the largest |x_j| of ffn_down's input per channel,
   the largest |z_i| of the FFN's output (ffn_down's output after the post-FFN norm where there
   is one: what enters the residual) per channel with the token where it occurs and, at that
   token, the one weight whose product W[i, j] x_j contributes most to it and its share; and the
   residual stream's largest |h_c| per channel after the layer. Ratios are to the median |value|
   of the same activation (all tokens and channels; each chunk's from every 7th value, the
   median over chunks).
2. **Candidates**: output channels whose ratio is >= `spike_ratio` and whose top product is >=
   `share` of the spike. **Massive activations**: residual channels >= `massive_ratio`.
3. **Confirmation**, after the run: the `max_candidates` largest spikes are each zeroed alone,
   and one control copy zeroes `control_weights` random weights of every tested tensor together. The first
   `window` tokens of the first `confirm_chunks` chunks are run again from the embeddings (a
   causal model's first tokens do not depend on the later ones), each zeroed copy splitting off
   the clean stream at its layer and going on to the head. The effect is the relative change of
   perplexity on `positions` scored positions per chunk (evenly spaced over the window's second
   half, as llama-perplexity scores the second half of a chunk). A candidate is confirmed when
   |effect| is >= `min_effect` and >= `control_factor` x the control's |effect| (in a trained
   model zeroing a super weight raises perplexity; either sign shows the output depends on it).

   Cost: the detection is a few reductions per chunk and layer (a few percent of the pass); the
   confirmation is a fixed (2 + the candidates) x `confirm_chunks` x `window` tokens through the
   layers after each candidate, and the head for those positions, whatever the chunk count.

    obs = SuperWeightObserver()
    run_calibration(model, tokens, RunOptions(...), [make_observer("imatrix"), obs])
    obs.result()    # outliers.Outliers
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Any

import numpy as np

from quantcli.calibrate.outliers import LayerMaxima, MassiveActivation, Outliers, SuperWeight, Thresholds
from quantcli.calibrate.runner import Observer, Probe
from quantcli.engine.model import Model
from quantcli.engine.perplexity import PerplexityOptions, head_pass
from quantcli.progress import Progress, progress_or_noop

CONFIRM_CHUNKS = 2  # chunks each candidate's effect is measured on
WINDOW = 256  # their first tokens that are run again
POSITIONS = 96  # scored positions per chunk (evenly spaced over the window's second half)
MAX_CANDIDATES = 8  # candidates measured (and recorded), the largest spikes first
MAX_MASSIVE = 4  # massive channels recorded per layer
MEDIAN_STRIDE = 7  # every 7th |value| gives a chunk's median (7 is prime to the usual widths)


class _Channels:
    """Per channel: the largest |value| seen, where (chunk, position) and its signed value."""

    def __init__(self) -> None:
        self.max: np.ndarray | None = None
        self.chunk: np.ndarray | None = None
        self.pos: np.ndarray | None = None
        self.value: np.ndarray | None = None
        self.medians: list[float] = []

    def fold(self, c: int, x: np.ndarray) -> np.ndarray | None:
        """Fold chunk c's [T, n] values in; the channels whose maximum grew (None: all, first)."""
        a = np.abs(x)
        m = a.max(axis=0)
        # the median of an evenly strided sample: a full one is a third of the watching's cost
        self.medians.append(float(np.median(a.reshape(-1)[:: MEDIAN_STRIDE])))
        if self.max is None:
            grew = np.arange(m.size)
            self.max = m.astype(np.float32)
            self.pos = np.zeros(m.size, np.int64)
            self.chunk = np.full(m.shape, c, np.int64)
            self.value = np.zeros(m.size, np.float32)
        else:
            grew = np.nonzero(m > self.max)[0]
        pos = a[:, grew].argmax(axis=0)  # where, only for the channels that grew (a strided search)
        self.max[grew] = m[grew]
        self.pos[grew] = pos
        self.chunk[grew] = c
        self.value[grew] = x[pos, grew]
        return grew

    def median(self) -> float:
        return float(np.median(self.medians)) if self.medians else 0.0

    def ratios(self) -> np.ndarray:
        med = self.median()
        return self.max / med if med > 0 else np.full(self.max.shape, np.inf)

    def top(self) -> tuple[int, float, float]:
        i = int(self.max.argmax())
        return i, float(self.max[i]), float(self.ratios()[i])


class SuperWeightObserver(Observer, name="superweights"):
    """Detection and confirmation of super weights, and the massive activations (see module)."""

    wants_outputs = True
    wants_residual = True

    def __init__(self, *, confirm_chunks: int = CONFIRM_CHUNKS, window: int = WINDOW, positions: int = POSITIONS,
                 max_candidates: int = MAX_CANDIDATES, thresholds: dict[str, float] | None = None) -> None:
        t = Thresholds(**(thresholds or {}))
        super().__init__(confirm_chunks=confirm_chunks, window=window, positions=positions,
                         max_candidates=max_candidates, thresholds=t.to_dict())
        self.t = t
        self.n_confirm = confirm_chunks
        self.window = max(4, window)
        self.n_positions = positions
        self.max_candidates = max_candidates
        self.progress = progress_or_noop(None)  # the confirmation's progress (set by the caller)
        self.layers_: dict[int, dict[str, Any]] = {}  # layer -> its records (candidates, massive, maxima)
        self.result_: Outliers | None = None

    # -- the run -------------------------------------------------------------------------------------
    def begin(self, model: Model, chunks: np.ndarray) -> None:
        self.model = model
        self.chunks = chunks
        self.k = min(self.n_confirm, chunks.shape[0])

    def prepare_layer(self, il: int, weights: dict[str, np.ndarray], probe: Probe) -> None:
        self.w = weights
        self.down = f"blk.{il}.ffn_down.weight"
        self.down_in, self.down_out, self.resid = _Channels(), _Channels(), _Channels()
        self.contrib: dict[str, np.ndarray] = {}  # per output channel at its maximum: col, share
        self.n_in = self.n_out = 0

    def on_input(self, name: str, x: np.ndarray) -> None:
        if name == self.down:
            self.x = x
            self.down_in.fold(self.n_in, x)
            self.n_in += 1

    def on_output(self, name: str, y: np.ndarray) -> None:
        if name != self.down:
            return
        z = self.model.ffn_residual(self.w, y)
        grew = self.down_out.fold(self.n_out, z)
        self.n_out += 1
        if grew.size:
            # at each grown channel's token: the products W[i, j] x[t, j] over j, and the largest
            t = self.down_out.pos[grew]
            prod = self.w["ffn_down"][grew] * self.x[t]  # [g, n_ff]
            j = np.abs(prod).argmax(axis=1)
            top = prod[np.arange(grew.size), j]
            with np.errstate(divide="ignore", invalid="ignore"):
                share = np.where(y[t, grew] != 0, top / y[t, grew], 0.0)
            if not self.contrib:
                n = self.down_out.max.size
                self.contrib = {"col": np.zeros(n, np.int64), "share": np.zeros(n, np.float32)}
            self.contrib["col"][grew] = j
            self.contrib["share"][grew] = share
        self.x = None

    def on_residual(self, il: int, chunk: int, h: np.ndarray) -> None:
        self.resid.fold(chunk, h)

    def end_layer(self, il: int) -> None:
        self.layers_[il] = self._records(il)
        self.w = None

    def _records(self, il: int) -> dict[str, Any]:
        """Layer il's candidates, massive channels and maxima (JSON-able)."""
        t = self.t
        out_ratio = self.down_out.ratios()
        order = np.argsort(-out_ratio, kind="stable")
        cands = []
        for i in order:
            if out_ratio[i] < t.spike_ratio or len(cands) >= self.max_candidates:
                break
            share = float(self.contrib["share"][i])
            if share < t.share:
                continue
            j = int(self.contrib["col"][i])
            cands.append({"tensor": self.down, "row": int(i), "col": j,
                          "value": float(self.w["ffn_down"][i, j]), "spike": float(out_ratio[i]), "share": share})
        r = self.resid
        ratio = r.ratios()
        massive = []
        for ch in np.argsort(-ratio, kind="stable")[:MAX_MASSIVE]:
            if ratio[ch] < t.massive_ratio:
                break
            pos, c = int(r.pos[ch]), int(r.chunk[ch])
            massive.append({"layer": il, "channel": int(ch), "value": float(r.value[ch]), "ratio": float(ratio[ch]),
                            "position": pos, "token": int(self.chunks[c, pos])})
        return {"candidates": cands, "massive": massive,
                "maxima": [self.down_in.top(), self.down_out.top(), r.top()]}

    def _control(self, name: str, shape: tuple[int, int], avoid: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """`control_weights` random positions of the tensor (seeded by its name), none a candidate."""
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        n = shape[0] * shape[1]
        taken = {r * shape[1] + c for r, c in avoid}
        picks = [int(p) for p in rng.choice(n, size=min(n, self.t.control_weights + len(taken)), replace=False)
                 if int(p) not in taken][: self.t.control_weights]
        return [(p // shape[1], p % shape[1]) for p in picks]

    # -- the effects ---------------------------------------------------------------------------------
    def end(self, model: Model, hidden: np.ndarray) -> None:
        found = [s for il in sorted(self.layers_) for s in self.layers_[il]["candidates"]]
        found.sort(key=lambda s: -s["spike"])
        tested = found[: self.max_candidates]
        ppl = self._confirm(model, tested) if tested else {}
        base = ppl.get("", math.nan)
        sws = []
        for s in tested:  # the smaller spikes are not recorded (the per-layer maxima show them)
            key = f"{s['tensor']}|{s['row']}|{s['col']}"
            e = ppl[key] / base - 1.0 if key in ppl else math.nan
            ctl = ppl["control"] / base - 1.0 if key in ppl else math.nan
            ok = abs(e) >= self.t.min_effect and abs(e) >= self.t.control_factor * abs(ctl)
            sws.append(SuperWeight(s["tensor"], s["row"], s["col"], s["value"], s["spike"], s["share"],
                                   e, ctl, bool(ok)))
        massive = [MassiveActivation(**m) for il in sorted(self.layers_) for m in self.layers_[il]["massive"]]
        layers = [LayerMaxima(il, *(tuple(v) for v in self.layers_[il]["maxima"])) for il in sorted(self.layers_)]
        sws.sort(key=lambda s: (not s.confirmed, -(s.effect if not math.isnan(s.effect) else -1.0),
                                -s.spike))
        self.result_ = Outliers(sws, massive, layers, self.t, self.k if tested else 0, base)

    def _confirm(self, model: Model, tested: list[dict[str, Any]]) -> dict[str, float]:
        """Perplexity on the first `window` tokens of the first K chunks: "" the model as it is,
        "tensor|row|col" with that weight zeroed, "control" with every tested tensor's random control
        weights zeroed (one copy: its effect bounds each tensor's own control's, so the test is, if
        anything, stricter). Every copy splits off the clean stream at its layer and runs to the head."""
        ctx = self.chunks.shape[1]
        window = min(ctx, self.window)
        tokens = self.chunks[: self.k, :window]
        h = model.embed(tokens)  # [K, window, E]
        streams: dict[str, np.ndarray] = {}
        by_layer: dict[int, list[dict[str, Any]]] = {}
        for s in tested:
            by_layer.setdefault(int(s["tensor"].split(".")[1]), []).append(s)
        n_layer = model.config.n_layer
        report = self.progress
        control = None  # one copy with every tested tensor's control weights zeroed, from the first
        for il in range(n_layer):
            w = model.layer_weights(il)
            for s in streams.values():
                for c in range(s.shape[0]):
                    s[c] = model.layer(il, w, s[c])
            cands = by_layer.get(il, [])
            if cands:
                name = cands[0]["tensor"]
                zeroed = [(s["row"], s["col"]) for s in cands]
                for s, rc in zip(cands, zeroed):
                    streams[f"{name}|{rc[0]}|{rc[1]}"] = _zeroed_run(model, il, w, h, [rc])
                picks = self._control(name, w["ffn_down"].shape, zeroed)
                control = _zeroed_run(model, il, w, h if control is None else control, picks)
            elif control is not None:
                for c in range(control.shape[0]):
                    control[c] = model.layer(il, w, control[c])
            for c in range(h.shape[0]):
                h[c] = model.layer(il, w, h[c])
            del w
            report(Progress("confirm", il + 1, n_layer, f"blk.{il}"))
        first = window // 2
        pos = np.unique(np.linspace(first, window - 2, min(self.n_positions, window - 1 - first)).round().astype(np.int64))
        streams["control"] = control
        keys = [""] + list(streams)
        E = model.config.n_embd
        states = [h] + [streams[k] for k in keys[1:]]
        x = np.concatenate([model.head_input(np.ascontiguousarray(s[:, pos]).reshape(-1, E)) for s in states])
        targets = np.tile(tokens[:, pos + 1].reshape(-1), len(states))
        stats, _, _ = head_pass(model, x, targets, PerplexityOptions(ctx=ctx), progress_or_noop(None))
        nll = stats.nll().reshape(len(states), -1).mean(axis=1)
        return {k: float(np.exp(v)) for k, v in zip(keys, nll)}

    # -- state ---------------------------------------------------------------------------------------
    def layer_state(self, il: int) -> dict[str, np.ndarray]:
        return {"records": np.array([json.dumps(self.layers_[il])])}

    def load_layer_state(self, il: int, state: dict[str, np.ndarray]) -> None:
        self.layers_[il] = json.loads(str(state["records"][0]))

    def result(self) -> Outliers:
        if self.result_ is None:
            raise RuntimeError("the run has not ended")
        return self.result_



def _zeroed_run(model: Model, il: int, w: dict[str, np.ndarray], h: np.ndarray,
                zeroed: list[tuple[int, int]]) -> np.ndarray:
    """Every chunk of h [K, T, E] through layer il with these ffn_down weights zeroed."""
    edited = dict(w)
    W = w["ffn_down"].copy()
    rows, cols = np.array(zeroed).T
    W[rows, cols] = 0.0
    edited["ffn_down"] = W
    return np.stack([model.layer(il, edited, x) for x in h])
