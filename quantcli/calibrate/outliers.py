"""What super-weight detection found, as plain records, and how an imatrix GGUF carries them.

`Outliers` holds the super weights (confirmed ones and the candidates that did not clear the
threshold, each with its measured effect), the massive activations of the residual stream, the
per-layer maxima the detection looked at (so "none found" can say what was there) and the
thresholds it used. `to_kv` / `from_meta` store it in an imatrix file's metadata as parallel GGUF
arrays under `quantcli.super_weights.*`, `quantcli.massive_activations.*` and
`quantcli.outliers.*`; llama-quantize ignores keys it does not know, so the file quantizes to the
same bytes as one without them. `merge` combines the records of several files (`--in-file`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGUFValueType

from quantcli.errors import InputError
from quantcli.formats.base import KV

SCHEMA = "quantcli.outliers/1"


@dataclass(frozen=True)
class Thresholds:
    """The detection's criteria (documented in README.md, "Super weights")."""

    spike_ratio: float = 100.0  # an FFN output channel is a spike at >= this x the median |value|
    share: float = 0.5  # a weight is a candidate when its product is >= this share of the spike
    massive_ratio: float = 1000.0  # a residual channel is massive at >= this x the median |value|
    min_effect: float = 0.01  # confirmed: zeroing it changes perplexity by >= 1 % ...
    control_factor: float = 10.0  # ... and by >= 10x what zeroing the random control weights does
    control_weights: int = 64  # random weights of each tested tensor, zeroed together as the control

    def __post_init__(self) -> None:  # a count, whether it comes as 64 or 64.0 (GGUF keeps these as floats)
        object.__setattr__(self, "control_weights", int(self.control_weights))

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class SuperWeight:
    tensor: str  # blk.N.ffn_down.weight
    row: int  # output channel (GGUF row)
    col: int  # input channel (column)
    value: float  # the weight
    spike: float  # |output| at the spike / median |output| of the tensor's matmul
    share: float  # this weight's product / the spike's value at the spike's token
    effect: float = math.nan  # relative perplexity change when it is zeroed (0.11 = +11 %)
    control: float = math.nan  # the same for the control (`control_weights` random weights of each tested tensor)
    confirmed: bool = False

    @property
    def layer(self) -> int:
        return int(self.tensor.split(".")[1])


@dataclass(frozen=True)
class MassiveActivation:
    layer: int  # the residual stream after this layer
    channel: int
    value: float  # the signed value at its largest |.|
    ratio: float  # |value| / median |residual| of the layer
    position: int  # position in its chunk (0: the BOS)
    token: int  # the token id at that position


@dataclass(frozen=True)
class LayerMaxima:
    """The largest values the detection saw in one layer: channel, |value| and ratio to the median."""

    layer: int
    down_in: tuple[int, float, float]  # ffn_down's input
    down_out: tuple[int, float, float]  # the FFN's output (what it adds to the residual)
    residual: tuple[int, float, float]  # the residual stream after the layer


@dataclass
class Outliers:
    super_weights: list[SuperWeight] = field(default_factory=list)
    massive: list[MassiveActivation] = field(default_factory=list)
    layers: list[LayerMaxima] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    confirm_chunks: int = 0  # calibration chunks the effects were measured on
    base_perplexity: float = math.nan  # perplexity on those chunks, nothing zeroed

    @property
    def confirmed(self) -> list[SuperWeight]:
        return [s for s in self.super_weights if s.confirmed]

    @property
    def candidates(self) -> list[SuperWeight]:
        return [s for s in self.super_weights if not s.confirmed]

    def none_found(self) -> str:
        """The "none found" sentence: the largest values seen and the thresholds they missed."""
        t = self.thresholds
        spike = max(self.layers, key=lambda m: m.down_out[2], default=None)
        resid = max(self.layers, key=lambda m: m.residual[2], default=None)
        parts = []
        if spike is not None:
            parts.append(f"largest FFN output {spike.down_out[2]:.1f}x the median (blk.{spike.layer}, channel "
                         f"{spike.down_out[0]}; a spike needs {t.spike_ratio:g}x)")
        if resid is not None:
            parts.append(f"largest residual {resid.residual[2]:.1f}x the median (after blk.{resid.layer}, "
                         f"channel {resid.residual[0]}; massive needs {t.massive_ratio:g}x)")
        return "no super weights found: " + "; ".join(parts) if parts else "no super weights found"

    def to_json(self) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return None if math.isnan(v) else round(float(v), 6)

        return {
            "schema": SCHEMA,
            "thresholds": self.thresholds.to_dict(),
            "confirm_chunks": self.confirm_chunks,
            "base_perplexity": num(self.base_perplexity),
            "super_weights": [{"tensor": s.tensor, "row": s.row, "col": s.col, "value": s.value,
                               "spike": round(s.spike, 2), "share": round(s.share, 4), "effect": num(s.effect),
                               "control": num(s.control), "confirmed": s.confirmed} for s in self.super_weights],
            "massive_activations": [{"layer": m.layer, "channel": m.channel, "value": m.value,
                                     "ratio": round(m.ratio, 1), "position": m.position, "token": m.token}
                                    for m in self.massive],
            "layers": [{"layer": m.layer, **{k: {"channel": c, "max": v, "ratio": round(r, 2)}
                                             for k, (c, v, r) in (("ffn_down_input", m.down_in),
                                                                  ("ffn_output", m.down_out),
                                                                  ("residual", m.residual))}}
                       for m in self.layers],
        }

    # -- GGUF metadata ------------------------------------------------------------------------------
    def to_kv(self) -> dict[str, KV]:
        sw, ma, ly = self.super_weights, self.massive, self.layers
        out = {"quantcli.outliers.schema": KV(GGUFValueType.STRING, SCHEMA),
               "quantcli.outliers.confirm_chunks": KV(GGUFValueType.UINT32, int(self.confirm_chunks)),
               "quantcli.outliers.base_perplexity": KV(GGUFValueType.FLOAT64, float(self.base_perplexity))}
        for k, v in self.thresholds.to_dict().items():
            out[f"quantcli.outliers.threshold.{k}"] = KV(GGUFValueType.FLOAT64, v)
        out["quantcli.super_weights.tensor"] = _strings([s.tensor for s in sw])
        for key, values, kind in (("row", [s.row for s in sw], "u"), ("col", [s.col for s in sw], "u"),
                                  ("value", [s.value for s in sw], "f"), ("spike", [s.spike for s in sw], "f"),
                                  ("share", [s.share for s in sw], "f"), ("effect", [s.effect for s in sw], "f"),
                                  ("control", [s.control for s in sw], "f"),
                                  ("confirmed", [int(s.confirmed) for s in sw], "u")):
            out[f"quantcli.super_weights.{key}"] = _array(values, kind)
        for key, values, kind in (("layer", [m.layer for m in ma], "u"), ("channel", [m.channel for m in ma], "u"),
                                  ("value", [m.value for m in ma], "f"), ("ratio", [m.ratio for m in ma], "f"),
                                  ("position", [m.position for m in ma], "u"), ("token", [m.token for m in ma], "u")):
            out[f"quantcli.massive_activations.{key}"] = _array(values, kind)
        out["quantcli.outliers.layer"] = _array([m.layer for m in ly], "u")
        for what in ("down_in", "down_out", "residual"):
            out[f"quantcli.outliers.{what}.channel"] = _array([getattr(m, what)[0] for m in ly], "u")
            out[f"quantcli.outliers.{what}.max"] = _array([getattr(m, what)[1] for m in ly], "f")
            out[f"quantcli.outliers.{what}.ratio"] = _array([getattr(m, what)[2] for m in ly], "f")
        return out

    @classmethod
    def from_meta(cls, meta: Any, source: str) -> "Outliers | None":
        """The records of a reader's metadata (`meta(key)`); None when the file has none."""
        schema = meta("quantcli.outliers.schema")
        if schema is None:
            return None
        if schema != SCHEMA:
            raise InputError(f"{source}: super-weight records of schema '{schema}'; this version reads {SCHEMA}")

        def arr(key: str) -> list[Any]:
            v = meta(key)
            return [] if v is None else list(v)

        try:
            t = Thresholds(**{k: float(meta(f"quantcli.outliers.threshold.{k}", getattr(Thresholds, k)))
                              for k in Thresholds().to_dict()})
            p = "quantcli.super_weights."
            cols = [arr(p + k) for k in ("tensor", "row", "col", "value", "spike", "share", "effect", "control",
                                         "confirmed")]
            _same_length(cols, source, "super_weights")
            sws = [SuperWeight(str(n), int(r), int(c), float(v), float(s), float(sh), float(e), float(ct), bool(cf))
                   for n, r, c, v, s, sh, e, ct, cf in zip(*cols)]
            p = "quantcli.massive_activations."
            cols = [arr(p + k) for k in ("layer", "channel", "value", "ratio", "position", "token")]
            _same_length(cols, source, "massive_activations")
            mas = [MassiveActivation(int(a), int(b), float(c), float(d), int(e), int(f)) for a, b, c, d, e, f in zip(*cols)]
            p = "quantcli.outliers."
            cols = [arr(p + "layer")] + [arr(f"{p}{w}.{k}") for w in ("down_in", "down_out", "residual")
                                         for k in ("channel", "max", "ratio")]
            _same_length(cols, source, "outliers")
            lys = [LayerMaxima(int(r[0]), (int(r[1]), float(r[2]), float(r[3])), (int(r[4]), float(r[5]), float(r[6])),
                               (int(r[7]), float(r[8]), float(r[9]))) for r in zip(*cols)]
        except (TypeError, ValueError) as exc:
            raise InputError(f"{source}: malformed super-weight records ({exc})") from None
        return cls(sws, mas, lys, t, int(meta("quantcli.outliers.confirm_chunks", 0)),
                   float(meta("quantcli.outliers.base_perplexity", math.nan)))


def merge(parts: list[Outliers | None]) -> Outliers | None:
    """The records of several imatrix files as one: each super weight once (the entry with an
    effect measured on the most chunks wins; confirmed wins a tie), massive activations and
    per-layer maxima by their largest ratio. None when no part has records."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    weights: dict[tuple[str, int, int], tuple[tuple[int, bool], SuperWeight]] = {}
    massive: dict[tuple[int, int], MassiveActivation] = {}
    layers: dict[int, LayerMaxima] = {}
    for p in parts:
        for s in p.super_weights:
            rank = (p.confirm_chunks if not math.isnan(s.effect) else -1, s.confirmed)
            key = (s.tensor, s.row, s.col)
            if key not in weights or rank > weights[key][0]:
                weights[key] = (rank, s)
        for m in p.massive:
            k = (m.layer, m.channel)
            if k not in massive or m.ratio > massive[k].ratio:
                massive[k] = m
        for m in p.layers:
            old = layers.get(m.layer)
            layers[m.layer] = m if old is None else LayerMaxima(
                m.layer, *(max(a, b, key=lambda x: x[2]) for a, b in
                           ((old.down_in, m.down_in), (old.down_out, m.down_out), (old.residual, m.residual))))
    best = max(parts, key=lambda p: p.confirm_chunks)
    return Outliers(sorted((s for _, s in weights.values()), key=_order),
                    sorted(massive.values(), key=lambda m: (m.layer, -m.ratio)),
                    [layers[k] for k in sorted(layers)], best.thresholds, best.confirm_chunks, best.base_perplexity)


def _order(s: SuperWeight) -> tuple[Any, ...]:
    return (not s.confirmed, -(s.effect if not math.isnan(s.effect) else -1.0), s.layer, s.row, s.col)


def _strings(values: list[str]) -> KV:
    return KV(GGUFValueType.ARRAY, list(values), GGUFValueType.STRING)


def _array(values: list[float], kind: str) -> KV:
    if kind == "u":
        return KV(GGUFValueType.ARRAY, np.asarray(values, np.uint32), GGUFValueType.UINT32)
    return KV(GGUFValueType.ARRAY, np.asarray(values, np.float64), GGUFValueType.FLOAT64)


def _same_length(cols: list[list[Any]], source: str, what: str) -> None:
    if len({len(c) for c in cols}) > 1:
        raise InputError(f"{source}: the {what} records have arrays of different lengths")
