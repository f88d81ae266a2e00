"""`quantcli report`: per-tensor rows, per-layer aggregates, totals and the model's metadata summary.

The JSON form (`to_json`) has a stable schema, `quantcli.report/1`, documented in the README.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantcli.formats import ModelReader, open_model

SCHEMA = "quantcli.report/1"
# `blk.12.attn_q.weight` (GGUF), `model.layers.12.mlp...` (HF), `encoder.layer.3...` (BERT), `h.4` (GPT-2)
_LAYER = re.compile(r"(?:^|\.)(?:blk|layers|layer|h|blocks|block)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class TensorRow:
    name: str
    shape: list[int]  # numpy order: (..., rows, cols); GGUF's ne is this reversed
    type: str
    params: int
    bytes: int
    bpw: float
    layer: int | None


@dataclass(frozen=True)
class LayerRow:
    layer: int
    tensors: int
    params: int
    bytes: int
    bpw: float
    types: dict[str, int]  # type -> number of tensors


@dataclass(frozen=True)
class Totals:
    tensors: int
    params: int
    bytes: int
    bpw: float
    ratio_vs_f16: float  # F16 bytes of the same parameters / actual bytes
    ratio_vs_f32: float
    types: dict[str, dict[str, int]]  # type -> {tensors, params, bytes}


@dataclass(frozen=True)
class Report:
    file: str
    format: str
    metadata: dict[str, Any]
    tensors: list[TensorRow]
    layers: list[LayerRow]
    totals: Totals
    evaluation: dict[str, Any] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        out = {"schema": SCHEMA, **asdict(self)}
        if out["evaluation"] is None:
            del out["evaluation"]
        return out


def _bpw(nbytes: int, params: int) -> float:
    return round(8.0 * nbytes / params, 4) if params else 0.0


def build(reader: ModelReader) -> Report:
    rows = [
        TensorRow(name=t.name, shape=list(t.shape), type=t.dtype, params=t.n_params,
                  bytes=t.nbytes, bpw=_bpw(t.nbytes, t.n_params), layer=layer_of(t.name))
        for t in reader.tensors.values()
    ]
    per_layer: dict[int, list[TensorRow]] = defaultdict(list)
    for r in rows:
        if r.layer is not None:
            per_layer[r.layer].append(r)
    layers = []
    for idx in sorted(per_layer):
        group = per_layer[idx]
        params, nbytes = sum(r.params for r in group), sum(r.bytes for r in group)
        layers.append(LayerRow(layer=idx, tensors=len(group), params=params, bytes=nbytes,
                               bpw=_bpw(nbytes, params),
                               types=dict(sorted(Counter(r.type for r in group).items()))))
    by_type: dict[str, dict[str, int]] = {}
    for r in rows:
        t = by_type.setdefault(r.type, {"tensors": 0, "params": 0, "bytes": 0})
        t["tensors"] += 1
        t["params"] += r.params
        t["bytes"] += r.bytes
    params, nbytes = sum(r.params for r in rows), sum(r.bytes for r in rows)
    totals = Totals(
        tensors=len(rows), params=params, bytes=nbytes, bpw=_bpw(nbytes, params),
        ratio_vs_f16=round(2.0 * params / nbytes, 4) if nbytes else 0.0,
        ratio_vs_f32=round(4.0 * params / nbytes, 4) if nbytes else 0.0,
        types=dict(sorted(by_type.items())),
    )
    return Report(file=str(reader.path), format=reader.format, metadata=reader.summary(),
                  tensors=rows, layers=layers, totals=totals)


def run(path: Path) -> Report:
    with open_model(path) as reader:
        return build(reader)
