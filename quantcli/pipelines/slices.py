"""Row slices of tensors, quantized in a window of threads: the execution engine of `quantize`.

A tensor is cut into slices of rows (`slices_of`: at most `chunk` bytes of float32 input, never
across two matrices of an expert tensor). The caller reads each slice in order (`read_slice`, into
one of a window of reusable buffers) and submits it; worker threads encode it (`encode_slice`) and
write it at its place in the output (`Writer.write_rows`); one more thread hashes the written bytes
in order, so a unit's sha256 is known when its last slice is written. Rows are quantized
independently, so the bytes do not depend on the slicing or the thread count.
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from quantcli import codecs
from quantcli.errors import InputError, OutputError, QuantcliError
from quantcli.formats import ModelReader, Writer
from quantcli.formats.atomic import describe
from quantcli.plan import PlannedTensor

CHUNK_BYTES = 8 << 20  # float32 input per slice of rows (less with many threads): memory is slices, not tensors
IN_FLIGHT_BYTES = 128 << 20  # all slices in flight together, with many threads


def window_of(n_threads: int) -> int:
    """Slices in flight: enough that the workers stay busy through a layer's small tensors."""
    return 2 * n_threads + 2


def chunk_bytes(n_threads: int) -> int:
    """Input bytes per slice: CHUNK_BYTES, smaller where a window of slices would pass IN_FLIGHT_BYTES."""
    return min(CHUNK_BYTES, max(1 << 20, IN_FLIGHT_BYTES // window_of(n_threads)))


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of a tensor (seen as (rows, row length)) and the bytes they become."""

    p: PlannedTensor
    start: int
    stop: int
    importance: np.ndarray | None  # the imatrix row of the slice's matrix (experts have one each)
    nbytes: int  # of the slice's output


def slices_of(p: PlannedTensor, importance: np.ndarray | None, chunk: int = CHUNK_BYTES) -> list[Slice]:
    """The tensor in slices of at most `chunk` bytes of float32 input, never across two matrices of
    a 3-D (expert) tensor. Rows are quantized independently, so the bytes do not depend on where
    the slices are cut."""
    info = p.info
    cols = info.shape[-1] if info.shape else 1
    n_rows = info.n_params // max(cols, 1)
    rows_per_mat = info.shape[-2] if len(info.shape) >= 2 else 1
    n_mat = max(n_rows // max(rows_per_mat, 1), 1)  # experts in a 3-D tensor
    row_out = info.row_bytes if p.copy else codecs.get_codec(p.type).row_bytes(cols)
    if n_rows * row_out != p.nbytes:
        raise OutputError(f"tensor '{info.name}': {n_rows} rows of {row_out} bytes, its type needs {p.nbytes}")
    per_mat_imp = None
    if importance is not None and not p.copy:
        if importance.size != cols * n_mat:
            raise InputError(f"imatrix entry for '{info.name}' has {importance.size} values, "
                             f"expected {cols * n_mat}")
        per_mat_imp = importance.reshape(n_mat, cols)
    step = max(1, chunk // (4 * max(cols, 1)))
    out = []
    for m in range(n_mat):
        imp = per_mat_imp[m] if per_mat_imp is not None else None
        for a in range(m * rows_per_mat, (m + 1) * rows_per_mat, step):
            b = min(a + step, (m + 1) * rows_per_mat)
            out.append(Slice(p, a, b, imp, (b - a) * row_out))
    if not out:  # no rows: the slice writes only the padding
        out.append(Slice(p, 0, 0, None, 0))
    return out


def read_slice(reader: ModelReader, s: Slice, buf: np.ndarray | None = None) -> np.ndarray:
    """The slice's input: stored bytes for a tensor that is copied, float32 rows otherwise (into
    `buf` where the reader copies; valid until `buf` is reused)."""
    try:
        if s.p.copy:
            return reader.raw_rows(s.p.info.name, s.start, s.stop, buf)
        return reader.load_rows(s.p.info.name, s.start, s.stop, buf)
    except QuantcliError as exc:
        raise type(exc)(f"tensor '{s.p.info.name}': {exc.message}", exc.hint) from None
    except OSError as exc:
        raise InputError(f"{reader.path}: reading tensor '{s.p.info.name}' failed: {describe(exc)}") from None


def encode_slice(s: Slice, x: np.ndarray) -> np.ndarray:
    """The slice's output bytes from its input (`read_slice`)."""
    try:
        out = x if s.p.copy else codecs.quantize(x, s.p.type, s.importance)
    except QuantcliError as exc:
        raise type(exc)(f"tensor '{s.p.info.name}': {exc.message}", exc.hint) from None
    out = out.reshape(-1).view(np.uint8)
    if out.size != s.nbytes:
        raise OutputError(f"tensor '{s.p.info.name}': rows {s.start}-{s.stop} gave {out.size} bytes, "
                          f"expected {s.nbytes}")
    return out


class Pipeline:
    """Slices in flight. The caller reads each slice (in order, into one of `window` reusable
    buffers) and submits it; `n_threads` workers encode it and write it at its offset; one more
    thread feeds the written bytes, in order, to their unit's digest. At most `window` slices are
    in flight, so memory is `window` slices whatever the model. `then` runs a callback on the
    caller's thread once everything submitted before it is written and hashed."""

    def __init__(self, n_threads: int, chunk: int) -> None:
        self.window = window_of(n_threads)
        self.free = [np.empty(chunk, np.uint8) for _ in range(self.window)]
        self.pending: collections.deque = collections.deque()  # [hash future, buffer, callbacks]
        self.workers = ThreadPoolExecutor(n_threads, thread_name_prefix="quantize")
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="quantize-hash")

    def buffer(self) -> np.ndarray:
        """A free input buffer (after retiring the oldest slices while the window is full)."""
        while not self.free or len(self.pending) >= self.window:
            self._retire()
        return self.free.pop()

    def submit(self, work: Callable[[], tuple[np.ndarray, ...]], digest: Any,
               buf: np.ndarray | None = None) -> None:
        """Run `work` (it writes bytes and returns them) on a worker; hash its bytes in order;
        give `buf` back once they are hashed."""
        written = self.workers.submit(work)
        self.pending.append((self.hasher.submit(_hash_when_written, written, digest), buf, []))

    def then(self, callback: Callable[[], None]) -> None:
        if self.pending:
            self.pending[-1][2].append(callback)
        else:
            callback()

    def _retire(self) -> None:
        hashed, buf, callbacks = self.pending.popleft()
        hashed.result()  # raises what the worker raised
        if buf is not None:
            self.free.append(buf)
        for callback in callbacks:
            callback()

    def drain(self) -> None:
        while self.pending:
            self._retire()

    def close(self) -> None:
        """Drop queued work (after an error or Ctrl-C) and wait for the running slices."""
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.hasher.shutdown(wait=True, cancel_futures=True)
        self.workers.shutdown(wait=True)


def _hash_when_written(written: Any, digest: Any) -> None:
    for data in written.result():
        digest.update(data)


def write_slice(writer: Writer, s: Slice, x: np.ndarray) -> tuple[np.ndarray, ...]:
    """Encode the slice and write it (with the tensor's padding after its last rows); returns the
    bytes written, in order."""
    return writer.write_rows(s.p.info.name, s.start, encode_slice(s, x))


