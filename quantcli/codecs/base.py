"""The codec registry: one class per GGML type, registered at definition.

A codec quantizes whole rows: `(rows, cols) float32 -> (rows, row_bytes) uint8`. Rows, not blocks,
are the unit because ggml's importance-weighted quantizers use statistics of the whole row
(e.g. `sigma2 = sum(x^2) / n_per_row` in `quantize_row_q3_K_impl`).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantcli.errors import NumericError, UsageError

_REGISTRY: dict[GGMLQuantizationType, type["Codec"]] = {}


class NamedType(str):
    """The identity of a codec that is not a GGML type (`SYM4_B64`): a string with the `.name` the
    GGML enum members have, so that messages and error reports treat both alike. GGUF cannot
    hold these types; they are written in other formats (compressed-tensors)."""

    @property
    def name(self) -> str:
        return str(self)


_NAMED: dict[str, type["Codec"]] = {}

# fp16 cannot hold more than this; a block scale above it would be written as Inf
FP16_MAX = 65504.0


class Codec:
    """Base of every codec. Subclasses set `ggml_type=` in the class statement and implement
    `quantize_rows` / `dequantize_rows` on validated, contiguous input."""

    ggml_type: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    requires_importance: ClassVar[bool] = False  # ggml refuses this type without quant_weights
    can_quantize: ClassVar[bool] = True  # False: read-only (decoded for input, never written)
    partial_blocks: ClassVar[bool] = False  # True: a row's last block may be short (any row length)

    def __init_subclass__(cls, ggml_type: GGMLQuantizationType | None = None, named_type: str | None = None,
                          block_size: int | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if named_type is not None:  # a codec outside GGML, registered by its name
            key = named_type.upper()
            prior = _NAMED.get(key)
            if prior is not None or key in GGMLQuantizationType.__members__:
                owner = f"{prior.__module__}.{prior.__qualname__}" if prior else "a GGML type"
                raise ValueError(f"type name {key} is already taken by {owner}; "
                                 f"{cls.__module__}.{cls.__qualname__} cannot register it")
            if not block_size:
                raise ValueError(f"{cls.__qualname__}: a named codec needs block_size=")
            cls.ggml_type = NamedType(key)  # type: ignore[assignment]
            cls.block_size = block_size
            _NAMED[key] = cls
            return
        if ggml_type is None:
            return
        prior = _REGISTRY.get(ggml_type)
        if prior is not None:  # as gguf-py asserts qtype not in _type_traits
            raise ValueError(
                f"GGML type {ggml_type.name} is already registered to "
                f"{prior.__module__}.{prior.__qualname__}; {cls.__module__}.{cls.__qualname__} "
                f"cannot register it again (subclass without ggml_type= to reuse a codec)"
            )
        cls.ggml_type = ggml_type
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[ggml_type]
        _REGISTRY[ggml_type] = cls

    # -- implemented by each codec ------------------------------------------------------------
    @classmethod
    def quantize_rows(cls, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        """(rows, cols) float32 C-contiguous, importance (cols,) float32 or None
        -> (rows, cols // block_size * type_size) uint8."""
        raise NotImplementedError

    @classmethod
    def dequantize_rows(
        cls, data: np.ndarray, cols: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """(rows, row_bytes) uint8 -> (rows, cols) float32; written into `out` when one is given
        (see `rows_out`), which is returned."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    @classmethod
    def row_bytes(cls, cols: int) -> int:
        return cols // cls.block_size * cls.type_size


class FirstUseKernel:
    """`fn` compiled with numba (the codecs' JIT options, cached on disk) when it is first called, so
    that importing the module that defines it does not load numba. `dispatcher` is the compiled
    function once there is one (None before)."""

    def __init__(self, fn) -> None:
        self.fn, self.dispatcher = fn, None
        self.__doc__ = fn.__doc__

    def __call__(self, *args):
        if self.dispatcher is None:
            from numba import njit

            from quantcli.codecs._ggml_math import JIT

            self.dispatcher = njit(**JIT)(self.fn)
        return self.dispatcher(*args)


def rows_out(out: np.ndarray | None, rows: int, cols: int) -> np.ndarray:
    """The (rows, cols) float32 array a decoder fills: `out` itself, checked, or a new one."""
    if out is None:
        return np.empty((rows, cols), np.float32)
    flags = out.flags
    ok = out.shape == (rows, cols) and out.dtype == np.float32
    if not (ok and flags.c_contiguous and flags.writeable):
        raise ValueError(
            f"out must be a writeable C-contiguous float32 array of shape {(rows, cols)}; got "
            f"{out.dtype} {out.shape} (C-contiguous: {flags.c_contiguous}, "
            f"writeable: {flags.writeable})"
        )
    return out


def rows_into(out: np.ndarray | None, y: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Decoded rows `y` as a decoder returns them: `y` itself, or copied into `out` (checked by
    `rows_out`) when one is given."""
    if out is None:
        return y
    rows_out(out, rows, cols)[...] = y
    return out


def resolve_type(ggml_type: "str | int | GGMLQuantizationType") -> GGMLQuantizationType:
    """`"Q4_K"`, `12` or `GGMLQuantizationType.Q4_K` -> the enum member; unknown names list the known."""
    if isinstance(ggml_type, GGMLQuantizationType):
        return ggml_type
    if isinstance(ggml_type, NamedType):
        return ggml_type  # type: ignore[return-value]
    if isinstance(ggml_type, str):
        name = ggml_type.strip().upper()
        try:
            return GGMLQuantizationType[name]
        except KeyError:
            pass
        _load_families()
        if name in _NAMED:
            return _NAMED[name].ggml_type  # type: ignore[return-value]
        raise UsageError(f"unknown type '{ggml_type}'; known: {quantizable_names()}, and outside GGUF "
                         f"{', '.join(_NAMED)}") from None
    try:
        return GGMLQuantizationType(int(ggml_type))
    except (ValueError, TypeError):
        raise UsageError(f"unknown GGML type id {ggml_type!r}") from None


# the codec families, imported on first use so that `import quantcli` stays fast (numba is slow to load)
FAMILIES = ("gguf_backed", "legacy", "kquants", "iq4", "iq3", "iq2", "iq1", "sym4")
_loaded = False


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    import importlib

    for module in FAMILIES:
        importlib.import_module(f"quantcli.codecs.{module}")
    from quantcli.codecs.gguf_backed import register_readers

    register_readers()
    _loaded = True


def get_codec(ggml_type: "str | int | GGMLQuantizationType") -> type[Codec]:
    _load_families()
    qtype = resolve_type(ggml_type)
    if isinstance(qtype, NamedType):
        return _NAMED[qtype]
    try:
        return _REGISTRY[qtype]
    except KeyError:
        raise UsageError(f"type {qtype.name} has no codec; known: {quantizable_names()}") from None


def registered_types(quantizable: bool = True) -> list[GGMLQuantizationType]:
    """Types with a codec; with quantizable=True only those quantcli can write."""
    _load_families()
    return [t for t, c in _REGISTRY.items() if c.can_quantize or not quantizable]


def named_types() -> list[NamedType]:
    """The codecs that are not GGML types (GGUF cannot hold them): SYM4_B64."""
    _load_families()
    return [c.ggml_type for c in _NAMED.values()]  # type: ignore[misc]


def quantizable_names() -> str:
    return ", ".join(t.name for t in registered_types())


def check_finite_rows(x: np.ndarray, what: str = "input") -> None:
    """NaN/Inf anywhere -> NumericError naming the first bad row (llama-quantize refuses these)."""
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = np.argwhere(bad)[0] if x.ndim == 2 else (0, int(np.argwhere(bad)[0][0]))
        raise NumericError(
            f"{what} has a non-finite value ({x[row, col] if x.ndim == 2 else x[col]}) "
            f"in row {int(row)}, column {int(col)}",
            hint="fix the source weights; NaN/Inf cannot be quantized",
        )
