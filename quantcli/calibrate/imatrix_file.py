"""Importance-matrix files as llama.cpp reads and writes them.

Two formats (llama.cpp's `common/imatrix-loader.cpp`):
- GGUF (llama-imatrix's default): per weight `<name>.in_sum2` (F32, ne = (n_per_row, n_mat)) and
  `<name>.counts` (F32, ne = (1, n_mat)); metadata `general.type = "imatrix"`,
  `imatrix.datasets` (string array), `imatrix.chunk_count`, `imatrix.chunk_size` (u32).
- legacy `.dat`: int32 n_entries; per entry int32 name length, name, int32 ncall, int32 nval,
  nval float32 values (already `sum/count * ncall`); then optionally int32 chunk count, int32 dataset
  name length, dataset name.

`importance()` turns either into what llama-quantize hands to the quantizers: per column
`in_sum2 / count` in float32 (1.0 where a count is 0); for legacy files `values / ncall`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from quantcli.calibrate.outliers import Outliers
from quantcli.errors import InputError
from quantcli.formats import open_model
from quantcli.formats.atomic import atomic_write
from quantcli.formats.base import KV
from quantcli.formats.writer import TensorSpec, create_writer

SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # float32 (n_mat, n_per_row): sum of squared activations per input column
    counts: np.ndarray  # float32 (n_mat,): tokens seen per matrix (expert)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False
    outliers: Outliers | None = None  # super weights and massive activations (imatrix --super-weights)

    def importance(self, name: str) -> np.ndarray | None:
        """float32 (n_mat * n_per_row,) per-column weights as llama-quantize computes them."""
        e = self.entries.get(name)
        if e is None:
            return None
        if self.is_legacy:
            ncall = np.float32(e.counts[0]) if e.counts.size else np.float32(0)
            flat = e.sums.reshape(-1)
            return (flat / ncall).astype(np.float32) if ncall > 0 else flat.astype(np.float32)
        counts = e.counts.astype(np.float32).reshape(-1, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(counts > 0, e.sums / np.where(counts > 0, counts, 1), np.float32(1))
        return out.astype(np.float32).reshape(-1)

    def digest(self) -> str:
        """sha256 of the statistics quantize uses (entry names, sums, counts): the same for two files
        that differ only in what else they record (super weights, datasets, format)."""
        import hashlib

        h = hashlib.sha256(b"legacy" if self.is_legacy else b"gguf")
        for name in sorted(self.entries):
            e = self.entries[name]
            h.update(name.encode() + b"\0")
            h.update(np.ascontiguousarray(e.sums, "<f4").tobytes())
            h.update(np.ascontiguousarray(e.counts, "<f4").tobytes())
        return h.hexdigest()

    def filtered(self, include: list[str], exclude: list[str]) -> "Imatrix":
        """llama-quantize's --exclude-weights then --include-weights (substring matches)."""
        entries = {n: e for n, e in self.entries.items() if not any(s in n for s in exclude)}
        if include:
            entries = {n: e for n, e in entries.items() if any(s in n for s in include)}
        return Imatrix(entries, self.datasets, self.chunk_count, self.chunk_size, self.is_legacy, self.outliers)


def load(path: Path) -> Imatrix:
    """Read a GGUF or legacy imatrix file; errors name the file and the problem."""
    path = Path(path)
    try:
        head = path.open("rb").read(4)
    except FileNotFoundError:
        raise InputError(f"{path}: no such imatrix file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    return _load_gguf(path) if head == b"GGUF" else _load_legacy(path)


def _load_gguf(path: Path) -> Imatrix:
    with open_model(path) as m:
        pairs: dict[str, dict[str, np.ndarray]] = {}
        for name, info in m.tensors.items():
            for suffix, key in ((SUM_SUFFIX, "sums"), (COUNT_SUFFIX, "counts")):
                if name.endswith(suffix):
                    if info.dtype != "F32":
                        raise InputError(f"{path}: imatrix tensor '{name}' must be F32, is {info.dtype}")
                    pairs.setdefault(name[: -len(suffix)], {})[key] = np.array(m.load_f32(name))
        if not pairs:
            raise InputError(f"{path}: no imatrix data (no '*.in_sum2' tensors)")
        entries = {}
        for name, sc in pairs.items():
            if set(sc) != {"sums", "counts"}:
                raise InputError(f"{path}: mismatched sums and counts for '{name}'")
            sums, counts = sc["sums"], sc["counts"].reshape(-1)
            if sums.size % max(counts.size, 1):
                raise InputError(f"{path}: '{name}' has {sums.size} sums for {counts.size} counts")
            entries[name] = ImatrixEntry(sums.reshape(counts.size, -1), counts)
        datasets = m.meta("imatrix.datasets") or []
        has_meta = all(m.meta(k) is not None for k in
                       ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"))
        if not has_meta:
            raise InputError(f"{path}: missing imatrix metadata (imatrix.datasets, chunk_count, "
                             "chunk_size)")
        return Imatrix(entries, list(datasets), int(m.meta("imatrix.chunk_count", 0)),
                       int(m.meta("imatrix.chunk_size", 0)), outliers=Outliers.from_meta(m.meta, str(path)))


def _load_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise InputError(f"{path}: not a GGUF imatrix and a truncated legacy one ({what} at byte {pos})")
        out = data[pos:pos + n]
        pos += n
        return out

    (n_entries,) = struct.unpack("<i", take(4, "entry count"))
    if n_entries < 1:
        raise InputError(f"{path}: no data in imatrix file")
    if n_entries > len(data) // 16:
        raise InputError(f"{path}: imatrix claims {n_entries} entries, the file is too small for that")
    entries = {}
    for _ in range(n_entries):
        (length,) = struct.unpack("<i", take(4, "name length"))
        name = take(length, "name").decode("utf-8", errors="replace")
        ncall, nval = struct.unpack("<ii", take(8, "counts"))
        if nval < 1:
            raise InputError(f"{path}: entry '{name}' has {nval} values")
        sums = np.frombuffer(take(4 * nval, f"values of '{name}'"), dtype="<f4").astype(np.float32)
        entries[name] = ImatrixEntry(sums.reshape(1, -1), np.array([ncall], dtype=np.float32))
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):
        (chunk_count,) = struct.unpack("<i", take(4, "chunk count"))
        if pos + 4 <= len(data):
            (length,) = struct.unpack("<i", take(4, "dataset length"))
            if 0 < length <= len(data) - pos:
                datasets = [take(length, "dataset").decode("utf-8", errors="replace")]
    return Imatrix(entries, datasets, chunk_count, 0, is_legacy=True)


def save_gguf(imatrix: Imatrix, out: Path) -> None:
    """Write llama-imatrix's GGUF format, atomically (with the super-weight records, if any, in
    `quantcli.*` metadata that llama.cpp ignores)."""
    meta = {
        "general.type": KV(GGUFValueType.STRING, "imatrix"),
        "imatrix.datasets": KV(GGUFValueType.ARRAY, list(imatrix.datasets), GGUFValueType.STRING),
        "imatrix.chunk_count": KV(GGUFValueType.UINT32, int(imatrix.chunk_count)),
        "imatrix.chunk_size": KV(GGUFValueType.UINT32, int(imatrix.chunk_size)),
    }
    if imatrix.outliers is not None:
        meta.update(imatrix.outliers.to_kv())
    tensors, arrays = [], []
    for name in sorted(imatrix.entries):
        e = imatrix.entries[name]
        sums = np.ascontiguousarray(e.sums, dtype=np.float32).reshape(e.counts.size, -1)
        counts = np.ascontiguousarray(e.counts, dtype=np.float32).reshape(e.counts.size, 1)
        if e.counts.size == 1:  # ggml_n_dims drops trailing 1s: llama writes 1-D tensors here
            sums, counts = sums.reshape(-1), counts.reshape(-1)
        tensors += [TensorSpec(name + SUM_SUFFIX, sums.shape, "F32"),
                    TensorSpec(name + COUNT_SUFFIX, counts.shape, "F32")]
        arrays += [sums, counts]
    with create_writer("gguf", out, meta, tensors) as w:
        for spec, arr in zip(tensors, arrays):
            w.write(spec.name, arr)
        w.finish()


def save_legacy(imatrix: Imatrix, out: Path) -> None:
    """Write the legacy `.dat` format (values stored as sum/count * ncall, ncall = chunk count)."""
    ncall = max(int(imatrix.chunk_count), 1)
    parts = [struct.pack("<i", len(imatrix.entries))]
    for name in sorted(imatrix.entries):
        e = imatrix.entries[name]
        counts = e.counts.astype(np.float32).reshape(-1, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(counts > 0, e.sums / np.where(counts > 0, counts, 1), 0).astype(np.float32)
        values = (mean * np.float32(ncall)).astype("<f4").reshape(-1)
        raw = name.encode()
        parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size), values.tobytes()]
    dataset = (imatrix.datasets[0] if imatrix.datasets else "").encode()
    parts += [struct.pack("<i", int(imatrix.chunk_count)), struct.pack("<i", len(dataset)), dataset]
    with atomic_write(out) as fh:
        fh.write(b"".join(parts))
