"""`quantcli report IMATRIX`: what an importance-matrix file holds — its entries, chunks and
datasets, the super weights and massive activations `imatrix --super-weights` recorded, and with
`importance=True` the per-layer importance of every tensor.

A tensor's importance is llama-quantize's per-column weight (in_sum2 / counts: the mean squared
input of each column); its row here has the mean and the maximum over columns, and both
normalised to the largest of the same kind of tensor (attn_q, ffn_down, ...) over all layers, so
each kind reads from 0 to 1 along the depth. The JSON form has schema `quantcli.imatrix-report/1`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantcli.calibrate import imatrix_file
from quantcli.calibrate.outliers import Outliers
from quantcli.errors import InputError
from quantcli.names import layer_of

SCHEMA = "quantcli.imatrix-report/1"
# the kinds shown per layer, in order: q, k and v read the same input (so do gate and up)
KINDS = ("attn_q", "attn_output", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class ImportanceRow:
    name: str
    layer: int | None
    kind: str  # the short name: attn_q, ffn_down, ... (output for output.weight)
    columns: int
    mean: float  # mean over columns of in_sum2 / counts
    max: float
    max_channel: int  # the column of the maximum
    mean_norm: float  # mean / the largest mean of this kind
    max_norm: float  # max / the largest max of this kind


@dataclass(frozen=True)
class ImatrixReport:
    file: str
    format: str  # "gguf" or "dat" (legacy)
    entries: int
    chunk_count: int
    chunk_size: int
    datasets: list[str]
    outliers: Outliers | None
    importance: list[ImportanceRow] | None

    def layers(self) -> list[int]:
        return sorted({r.layer for r in self.importance or () if r.layer is not None})

    def cell(self, layer: int, kind: str) -> ImportanceRow | None:
        for r in self.importance or ():
            if r.layer == layer and r.kind == kind:
                return r
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "file": self.file, "format": self.format, "entries": self.entries,
            "chunk_count": self.chunk_count, "chunk_size": self.chunk_size, "datasets": self.datasets,
            "outliers": self.outliers.to_json() if self.outliers is not None else None,
            "importance": None if self.importance is None else [r.__dict__ for r in self.importance],
        }


def is_imatrix(path: Path) -> bool:
    """Whether `path` is an importance matrix (GGUF with general.type "imatrix", or a legacy .dat)."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        head = fh.read(4)
    if head != b"GGUF":
        return path.suffix.lower() == ".dat"
    from quantcli.formats import open_model

    with open_model(path) as m:
        return m.meta("general.type") == "imatrix"


def importance_rows(im: imatrix_file.Imatrix) -> list[ImportanceRow]:
    """One row per entry, in layer order (see the module's docstring)."""
    raw = []
    for name in im.entries:
        imp = im.importance(name)
        if imp is None or imp.size == 0:
            continue
        if not np.isfinite(imp).all():
            raise InputError(f"imatrix entry '{name}' has non-finite values")
        layer = layer_of(name)
        parts = name.split(".")
        kind = parts[2] if layer is not None and len(parts) > 2 else parts[0]
        j = int(imp.argmax())
        raw.append((name, layer, kind, int(imp.size), float(imp.mean()), float(imp[j]), j))
    top_mean: dict[str, float] = {}
    top_max: dict[str, float] = {}
    for _, _, kind, _, mean, mx, _ in raw:
        top_mean[kind] = max(top_mean.get(kind, 0.0), mean)
        top_max[kind] = max(top_max.get(kind, 0.0), mx)
    rows = [ImportanceRow(n, layer, kind, cols, mean, mx, j,
                          mean / top_mean[kind] if top_mean[kind] > 0 else 0.0,
                          mx / top_max[kind] if top_max[kind] > 0 else 0.0)
            for n, layer, kind, cols, mean, mx, j in raw]
    rows.sort(key=lambda r: (r.layer is None, r.layer if r.layer is not None else 0, r.name))
    return rows


def run(path: Path, importance: bool = False, plot: Path | None = None) -> ImatrixReport:
    """The report of the imatrix at `path`; with `plot`, the importance figure as a PNG."""
    if plot is not None:
        from quantcli.pipelines.report import check_plot

        check_plot(plot, [Path(path)])
    im = imatrix_file.load(Path(path))
    rows = importance_rows(im) if importance or plot is not None else None
    rep = ImatrixReport(str(path), "dat" if im.is_legacy else "gguf", len(im.entries), im.chunk_count,
                        im.chunk_size, list(im.datasets), im.outliers, rows if importance else None)
    if plot is not None:
        from quantcli.pipelines.imatrix_plot import plot_importance

        plot_importance(rep, rows, Path(plot))
    return rep
