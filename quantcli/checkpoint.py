"""Layer-level checkpoints: each finished unit of work (a layer's quantized tensors, a layer's
statistics) is a file in a checkpoint directory, recorded in `manifest.json` with its sha256.

A checkpoint is used only when its manifest's key (input fingerprint, plan hash, quantcli and gguf
versions, ...) equals this run's and the unit's bytes still hash to what the manifest says; anything
else is reported through `log` and recomputed. Every file is written atomically (temp +
rename), the manifest last, so a SIGKILL at any moment leaves either the old or the new state.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from quantcli.errors import OutputError
from quantcli.formats.atomic import atomic_write


def key_json(value: Any) -> Any:
    """`value` as a checkpoint key's JSON holds it: tuples as lists, arrays as lists of numbers,
    anything else JSON cannot take (paths, ...) as its str."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))

MANIFEST = "manifest.json"
FORMAT = "quantcli.checkpoint/1"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            h.update(block)
    return h.hexdigest()


class _HashingWriter:
    """A file wrapper that hashes what passes through it."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.hash, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        self.hash.update(mv)
        self.size += mv.nbytes
        return self.fh.write(mv)


class CheckpointStore:
    def __init__(self, directory: Path, key: dict[str, Any], log: Callable[[str], None]) -> None:
        self.dir = Path(directory)
        self.key = key
        self.log = log
        self.units: dict[str, dict[str, Any]] = {}
        self.extra: dict[str, Any] = {}
        self._load()

    def _load(self) -> None:
        path = self.dir / MANIFEST
        if not path.exists():
            return
        try:
            doc = json.loads(path.read_text())
            ok = doc.get("format") == FORMAT and isinstance(doc.get("units"), dict)
        except (OSError, ValueError):
            ok = False
        if not ok:
            self.log(f"checkpoint manifest {path} is unreadable; recomputing everything")
            self._clear()
            return
        if doc.get("key") != self.key:
            changed = sorted(k for k in set(self.key) | set(doc.get("key", {}))
                             if doc.get("key", {}).get(k) != self.key.get(k))
            self.log(f"checkpoints in {self.dir} were made with a different "
                     f"{', '.join(changed)}; recomputing")
            self._clear()
            return
        self.units = doc["units"]
        self.extra = doc.get("extra", {})

    def _clear(self) -> None:
        self.units, self.extra = {}, {}
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.is_file() and (p.name in (MANIFEST, "output.partial")
                                    or p.name.startswith(("unit-", ".unit-", ".manifest"))):
                    p.unlink()

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        doc = {"format": FORMAT, "key": self.key, "extra": self.extra, "units": self.units}
        with atomic_write(self.dir / MANIFEST, durable=False) as fh:
            fh.write(json.dumps(doc, indent=1, sort_keys=True).encode())

    def set_extra(self, **values: Any) -> None:
        """Run-wide values a resumed run must reuse (e.g. the timestamp written into the output)."""
        self.extra.update(values)
        self._save()

    def path(self, unit: str) -> Path:
        return self.dir / f"unit-{unit}.bin"

    def get(self, unit: str) -> Path | None:
        """The unit's file if it is recorded and intact, else None (a damaged one is reported)."""
        entry = self.units.get(unit)
        if entry is None:
            return None
        path = self.path(unit)
        try:
            intact = path.stat().st_size == entry["bytes"] and _sha256_file(path) == entry["sha256"]
        except OSError:
            intact = False
        if not intact:
            self.log(f"checkpoint {path.name} fails its sha256 check; recomputing it")
            del self.units[unit]
            self._save()
            return None
        return path

    @contextmanager
    def put(self, unit: str) -> Iterator[_HashingWriter]:
        """Write a unit: `with store.put("layer-3") as fh: fh.write(...)`; recorded when the block ends."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path(unit)) as fh:
            w = _HashingWriter(fh)
            yield w
        self.units[unit] = {"sha256": w.hash.hexdigest(), "bytes": w.size}
        self._save()

    def record(self, unit: str, entry: dict[str, Any]) -> None:
        """Record a unit whose bytes live elsewhere (e.g. a range of a partial output file)."""
        self.units[unit] = entry
        self._save()

    def drop(self, unit: str) -> None:
        if self.units.pop(unit, None) is not None:
            self._save()

    def forget_units(self) -> None:
        self.units = {}
        self._save()

    def remove(self) -> None:
        """Delete the checkpoint directory after a successful run."""
        if self.dir.is_dir():
            self._clear()
            try:
                self.dir.rmdir()
            except OSError:
                pass  # the user keeps other files there


def default_dir(output: Path) -> Path:
    return output.with_name(output.name + ".checkpoints")


def ensure_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{directory}: cannot create checkpoint directory: {exc.strerror}") from None

