"""SYM4_B64: the symmetric 4-bit block code of `spec/001` (not a GGML type; GGUF cannot hold it).

    q = round(clamp(x / scale, -7, 7)),  x_hat = q * scale,  scale = max|x_block| / 7 (float32)

in blocks of 64 values along a row; `round` is half away from zero (the contract's reference is
Rust's `f32::round`). A row of any length is accepted: its last block may be short.

Row layout, per block: the scale as a little-endian float32, then the block's values two to a byte,
value 2k in the low nibble of byte k and value 2k+1 in the high one, each stored as q + 8 (1..15;
the same offset nibbles compressed-tensors' pack-quantized format uses). A short block of odd
length leaves the high nibble of its last byte 0. So a row of n values takes
4 * ceil(n / 64) + ceil(n / 2) bytes: 4.5 bits per value, 32 / 4.5 = 7.1x smaller than float32.
(The contract notes "approximately 6x"; its own formula, 32 / (4 + 32/64), gives 7.1x.)

What the contract promises, and why: |x - x_hat| <= scale / 2 < scale for every value (rounding
to the nearest step of size `scale`; the clamp never bites, since |x| / scale <= 7), so the mean
squared error of a block is at most scale^2 / 4. The contract writes that bound as
(scale / 7)^2 / 4 with `scale` there meaning the block's max|x| (max/7 is the step); with the
`scale` of the first formula it would read scale^2 / 196, which rounding cannot meet.
Zero blocks get scale 0, q = 0 and decode to 0.
"""

from __future__ import annotations

import math

import numpy as np

from quantcli.codecs.base import Codec, rows_out

BLOCK = 64
QMAX = 7
SCALE_BYTES = 4


def row_bytes(cols: int) -> int:
    return SCALE_BYTES * -(-cols // BLOCK) + -(-cols // 2)


def round_half_away(v: np.ndarray) -> np.ndarray:
    """Rust's f32::round: halves away from zero (numpy's rint rounds them to even). In float64,
    where v + 0.5 is exact for any float32 v."""
    v = np.asarray(v, np.float64)
    return np.copysign(np.floor(np.abs(v) + 0.5), v)


def block_scales(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) float32 -> its blocks zero-padded to (rows, n_blocks, 64) and their scales
    max|x| / 7 as float32 (rows, n_blocks)."""
    rows, cols = x.shape
    nb = -(-cols // BLOCK)
    blocks = np.zeros((rows, nb * BLOCK), np.float32)
    blocks[:, :cols] = x
    blocks = blocks.reshape(rows, nb, BLOCK)
    scale = np.abs(blocks).max(axis=2) / np.float32(QMAX)  # float32 / float32
    return blocks, scale.astype(np.float32)


def _quantize_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) float32 -> q int8 (rows, n_blocks * 64), the padding 0, and scales (rows, n_blocks)."""
    blocks, scale = block_scales(x)
    s = scale[:, :, None]
    v = np.divide(blocks, s, out=np.zeros_like(blocks), where=s > 0)  # float32 x / scale
    q = np.clip(round_half_away(v), -QMAX, QMAX).astype(np.int8)
    return q.reshape(x.shape[0], -1), scale


def quantize_values(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) float32 -> q int8 (rows, cols) in [-7, 7] and scales float32 (rows, n_blocks)."""
    q, scale = _quantize_blocks(x)
    return q[:, :x.shape[1]], scale


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """int8 (rows, n) in [-8, 7] -> uint8 (rows, ceil(n/2)): q + 8, two to a byte, low nibble first;
    an odd n leaves the last high nibble 0."""
    rows, n = q.shape
    u = np.zeros((rows, n + (n & 1)), np.uint8)
    u[:, :n] = (q.astype(np.int16) + 8).astype(np.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of `pack_nibbles`: uint8 (rows, ceil(n/2)) -> int8 (rows, n)."""
    lo = (packed & 0x0F).astype(np.int8) - 8
    hi = (packed >> 4).astype(np.int8) - 8
    return np.stack([lo, hi], axis=2).reshape(packed.shape[0], -1)[:, :n]


class Sym4B64(Codec, named_type="SYM4_B64", block_size=BLOCK):
    """spec/001's symmetric 4-bit code, blocks of 64 with float32 scales (see the module docstring)."""

    type_size = SCALE_BYTES + BLOCK // 2  # bytes of a full block
    partial_blocks = True

    @classmethod
    def row_bytes(cls, cols: int) -> int:
        return row_bytes(cols)

    @classmethod
    def quantize_rows(cls, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        # importance does not change a symmetric absmax code: one scale per block, no search
        rows, cols = x.shape
        q, scale = _quantize_blocks(x)
        nb = scale.shape[1]
        nib = pack_nibbles(q).reshape(rows, nb, BLOCK // 2)
        tail = cols - (nb - 1) * BLOCK  # values in the last block
        if tail % 2:  # its padding nibble: 0, not the 8 of a stored zero
            nib[:, -1, tail // 2] &= 0x0F
        out = np.empty((rows, nb, cls.type_size), np.uint8)
        out[:, :, :SCALE_BYTES] = scale.astype("<f4").reshape(rows, nb, 1).view(np.uint8)
        out[:, :, SCALE_BYTES:] = nib
        return np.ascontiguousarray(out.reshape(rows, -1)[:, :row_bytes(cols)])

    @classmethod
    def dequantize_rows(cls, data: np.ndarray, cols: int, out: np.ndarray | None = None) -> np.ndarray:
        rows = data.shape[0]
        nb = -(-cols // BLOCK)
        full = np.zeros((rows, nb * cls.type_size), np.uint8)
        full[:, :data.shape[1]] = data
        full = full.reshape(rows, nb, cls.type_size)
        scale = np.ascontiguousarray(full[:, :, :SCALE_BYTES]).view("<f4").reshape(rows, nb, 1)
        q = unpack_nibbles(full[:, :, SCALE_BYTES:].reshape(rows * nb, -1), BLOCK).reshape(rows, nb, BLOCK)
        y = rows_out(out, rows, cols)
        y[...] = (q.astype(np.float32) * scale).reshape(rows, -1)[:, :cols]
        return y


def reference_quantize(values: list[float]) -> tuple[list[int], list[float], bytes]:
    """The contract written out one value at a time, in float32 scalars: (q, scales, the row's
    bytes). The vectorised codec must give the same bytes (FALSIFY-QO-005)."""
    f32 = np.float32
    qs: list[int] = []
    scales: list[float] = []
    out = bytearray()
    for b0 in range(0, len(values), BLOCK):
        block = [f32(v) for v in values[b0:b0 + BLOCK]]
        amax = f32(0.0)
        for v in block:
            amax = max(amax, f32(abs(v)))
        scale = f32(amax / f32(QMAX))
        q = []
        for v in block:
            if scale == 0:
                q.append(0)
                continue
            r = float(f32(v / scale))
            q.append(int(max(-QMAX, min(QMAX, math.copysign(math.floor(abs(r) + 0.5), r)))))
        out += np.array([scale], "<f4").tobytes()
        for k in range(0, len(q), 2):
            lo = q[k] + 8
            hi = q[k + 1] + 8 if k + 1 < len(q) else 0
            out.append(lo | hi << 4)
        qs += q
        scales.append(float(scale))
    return qs, scales, bytes(out)
