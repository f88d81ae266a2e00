"""Per-channel activation ranges: max |x_j| of every matmul's input over all calibration tokens.

The statistic SmoothQuant starts from (s_j = max|X_j|^a / max|W_j|^(1-a)) and the one static
activation quantization needs; with `outputs=True` also max |y_i| of every matmul's output, which
shows the massive activations that super weights cause (ffn_down's output channels).

    run_calibration(model, tokens, options, [make_observer("absmax", outputs=True)])
    stats = observer.result()     # ChannelStats: {weight name: float32 [n_in]}, rows seen
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quantcli.calibrate.runner import Observer
from quantcli.errors import InputError


@dataclass
class ChannelStats:
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # weight -> float32 [n_in] max |x_j|
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # weight -> float32 [n_out] max |y_i|
    rows: dict[str, int] = field(default_factory=dict)  # weight -> input rows (tokens) seen


class AbsMaxObserver(Observer, name="absmax"):
    """max |x| per input channel of every matmul (and per output channel with outputs=True).
    A maximum is exact in float32 and does not depend on the order the chunks come in, so shards
    merge to the same result as one run."""

    def __init__(self, outputs: bool = False) -> None:
        super().__init__(outputs=outputs)
        self.wants_outputs = outputs  # an instance attribute: the runner asks each observer
        self.total_ = ChannelStats()
        self.layer_ = ChannelStats()

    def prepare_layer(self, il: int, weights: dict[str, np.ndarray], probe: Any) -> None:
        self.layer_ = ChannelStats()

    def on_input(self, name: str, x: np.ndarray) -> None:
        fold_max(self.layer_.inputs, name, x)
        self.layer_.rows[name] = self.layer_.rows.get(name, 0) + x.shape[0]

    def on_output(self, name: str, y: np.ndarray) -> None:
        fold_max(self.layer_.outputs, name, y)

    def end_layer(self, il: int) -> None:
        self._add(self.layer_)

    def layer_state(self, il: int) -> dict[str, np.ndarray]:
        out = {f"in:{n}": v for n, v in self.layer_.inputs.items()}
        out.update({f"out:{n}": v for n, v in self.layer_.outputs.items()})
        out.update({f"rows:{n}": np.array(r, np.int64) for n, r in self.layer_.rows.items()})
        return out

    def load_layer_state(self, il: int, state: dict[str, np.ndarray]) -> None:
        layer = ChannelStats()
        for key, arr in state.items():
            kind, name = key.split(":", 1)
            if kind == "in":
                layer.inputs[name] = arr.astype(np.float32)
            elif kind == "out":
                layer.outputs[name] = arr.astype(np.float32)
            elif kind == "rows":
                layer.rows[name] = int(arr)
        self._add(layer)

    def merge(self, other: Observer) -> None:
        if not isinstance(other, AbsMaxObserver):
            raise TypeError(f"cannot merge {type(other).__name__} into absmax")
        self._add(other.total_)

    def _add(self, part: ChannelStats) -> None:
        for name, v in part.inputs.items():
            fold_max(self.total_.inputs, name, v[None, :])
        for name, v in part.outputs.items():
            fold_max(self.total_.outputs, name, v[None, :])
        for name, r in part.rows.items():
            self.total_.rows[name] = self.total_.rows.get(name, 0) + r

    def result(self) -> ChannelStats:
        return self.total_


def fold_max(into: dict[str, np.ndarray], name: str, x: np.ndarray) -> None:
    """into[name] = max(into[name], max |x| over rows) in float32; x [n, k] (non-finite values refused)."""
    m = np.abs(x).max(axis=0).astype(np.float32, copy=False) if x.shape[0] else None
    if m is None:
        return
    if not np.isfinite(m).all():
        raise InputError(f"non-finite activations reach {name}; the model or its weights are broken")
    if name in into:
        if into[name].shape != m.shape:
            raise InputError(f"{name}: {m.size} channels here, {into[name].size} before; "
                             "statistics of different models cannot be merged")
        np.maximum(into[name], m, out=into[name])
    else:
        into[name] = m.copy()
