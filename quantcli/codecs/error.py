"""What quantizing rows to a type loses: a report of sums, counts and maxima, so that slices merge.

    quantize_with_error(x, "Q4_K", importance) -> (bytes, QuantError)   # in quantcli.codecs
    measure(x, "Q4_K", importance) -> QuantError

The weighted figure is what llama.cpp's quantizers minimise, sum_ij imp_j * (w_ij - what_ij)^2
with imp the tensor's imatrix row (all ones without one). One compiled pass over x and x_hat per
chunk of rows, decoded into one reused buffer, accumulating in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
from gguf import GGMLQuantizationType

from quantcli.codecs.base import Codec, FirstUseKernel

CHUNK_VALUES = 1 << 20  # rows per pass: about this many values (a 4 MiB float32 decode buffer)

# columns of the per-row statistics the kernel writes: (rows, 5) float64
_SSE, _WSSE, _NORM, _WNORM, _MAX = range(5)


@dataclass(frozen=True)
class QuantError:
    """Reconstruction error of `rows` rows of `cols` values quantized to `ggml_type`.

    Sums, not means, so that `a.add(b)` of two row slices is the report of both. The totals are
    the correctly rounded sums (`math.fsum`) of per-row figures kept alongside (`per_row`, left out
    of `==` and `repr`), so a merge of slices equals the whole tensor's report exactly, whatever
    the slicing."""

    ggml_type: GGMLQuantizationType
    rows: int
    cols: int
    sse: float  # sum (w - w_hat)^2
    weighted_sse: float  # sum imp_j (w - w_hat)^2; equals sse without importance
    norm: float  # sum w^2
    weighted_norm: float  # sum imp_j w^2
    max_abs: float  # max |w - w_hat|
    # per row: sse, weighted_sse, norm, weighted_norm, max_abs; float64 (rows, 5)
    per_row: np.ndarray = field(compare=False, repr=False)

    @classmethod
    def from_rows(cls, ggml_type: GGMLQuantizationType, cols: int, per_row: np.ndarray) -> "QuantError":
        """From per-row figures, float64 `(rows, 5)` as the kernel writes them."""
        per_row = np.asarray(per_row, dtype=np.float64).view()
        per_row.flags.writeable = False  # the report is frozen, its rows too
        return cls(
            ggml_type, per_row.shape[0], cols,
            *(math.fsum(per_row[:, i]) for i in (_SSE, _WSSE, _NORM, _WNORM)),
            float(per_row[:, _MAX].max(initial=0.0)),
            per_row,
        )

    @classmethod
    def merge(cls, reports: Iterable["QuantError"]) -> "QuantError":
        """The report of all rows of `reports` (row slices of one tensor), in their order."""
        reports = list(reports)
        if not reports:
            raise ValueError("merge needs at least one QuantError")
        first = reports[0]
        for r in reports[1:]:
            if (r.ggml_type, r.cols) != (first.ggml_type, first.cols):
                raise ValueError(
                    f"cannot merge the error of {r.ggml_type.name} rows of {r.cols} into that of "
                    f"{first.ggml_type.name} rows of {first.cols}; merge slices of one tensor"
                )
        return cls.from_rows(first.ggml_type, first.cols,
                             np.concatenate([r.per_row for r in reports]))

    def add(self, other: "QuantError") -> "QuantError":
        """`merge([self, other])`; to merge many slices, merge them at once (one copy of the rows)."""
        return QuantError.merge([self, other])

    @property
    def count(self) -> int:
        return self.rows * self.cols

    @property
    def mse(self) -> float:
        return self.sse / self.count if self.count else 0.0

    @property
    def rmse(self) -> float:
        return math.sqrt(self.mse)

    @property
    def relative(self) -> float:
        """weighted_sse / sum imp_j w^2: the share of the (weighted) signal energy lost."""
        if self.weighted_norm > 0:
            return self.weighted_sse / self.weighted_norm
        return 0.0 if self.weighted_sse == 0 else math.inf

    @property
    def row_sse(self) -> np.ndarray:
        return self.per_row[:, _SSE]

    @property
    def row_weighted_sse(self) -> np.ndarray:
        return self.per_row[:, _WSSE]

    @property
    def row_max_abs(self) -> np.ndarray:
        return self.per_row[:, _MAX]

    @property
    def row_rmse(self) -> np.ndarray:
        return np.sqrt(self.row_sse / self.cols) if self.cols else np.zeros(self.rows)

    def to_json(self) -> dict:
        return {"type": self.ggml_type.name, "rows": self.rows, "cols": self.cols,
                "rmse": self.rmse, "max_abs": self.max_abs,
                "weighted_sse": self.weighted_sse, "relative": self.relative}


def _error_rows(x, y, imp, stats):
    """Per row r: sum d^2, sum imp d^2, sum x^2, sum imp x^2, max |d| of d = x - y, in float64.
    x, y: (rows, cols) float32; imp: (cols,) float32; stats: (rows, 5) float64."""
    for r in range(x.shape[0]):
        sse = wsse = nrm = wnrm = mx = 0.0
        for j in range(x.shape[1]):
            v = np.float64(x[r, j])
            w = np.float64(imp[j])
            d = v - np.float64(y[r, j])
            e2 = d * d
            sse += e2
            wsse += w * e2
            nrm += v * v
            wnrm += w * (v * v)
            mx = max(mx, abs(d))
        stats[r, 0] = sse
        stats[r, 1] = wsse
        stats[r, 2] = nrm
        stats[r, 3] = wnrm
        stats[r, 4] = mx


_error_kernel = FirstUseKernel(_error_rows)


def error_of(
    codec: type[Codec],
    x: np.ndarray,
    importance: np.ndarray | None,
    data: np.ndarray | None = None,
    encode: Callable[[int, int], np.ndarray] | None = None,
) -> QuantError:
    """The error of `codec` on validated rows `x` (C-contiguous float32 `(rows, cols)`): decoding
    `data` (their bytes, `(rows, row_bytes)`), or, without it, `encode(r0, r1)` of each chunk of
    rows, so that memory stays bounded by one chunk."""
    rows, cols = x.shape
    stats = np.zeros((rows, 5), np.float64)
    imp = np.ones(cols, np.float32) if importance is None else importance
    chunk = max(1, min(rows, CHUNK_VALUES // max(cols, 1)))
    buf = np.empty((chunk, cols), np.float32)
    kernel = _error_kernel
    from quantcli.codecs._ggml_math import readonly  # one signature, memory map or not

    imp = readonly(imp)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        part = data[r0:r1] if data is not None else encode(r0, r1)
        y = codec.dequantize_rows(part, cols, out=buf[: r1 - r0])
        kernel(readonly(x[r0:r1]), readonly(y), imp, stats[r0:r1])
    return QuantError.from_rows(codec.ggml_type, cols, stats)
