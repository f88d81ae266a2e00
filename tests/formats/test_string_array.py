"""GGUF string arrays: checked at parse time, decoded on first use, exactly as one by one."""

from __future__ import annotations

import struct

import numpy as np
import pytest


def _packed(strings: list[bytes]) -> bytes:
    return b"".join(struct.pack("<Q", len(s)) + s for s in strings)


@pytest.mark.parametrize("seed", range(6))
def test_string_array_fast_decode_equals_one_by_one(seed):
    from quantcli.formats.base import StringArray

    rng = np.random.default_rng(seed)
    pool = [b"", b"\xe2\x96\x81the", b"\xe2\x82", b"\x80abc", b"caf\xc3\xa9", b"\xf0\x9f\x98", b"<0x0A>",
            b"\xed\xa0\x80", b"\xc3", "\u2581\u2581日本".encode()]
    strings = [pool[i] if i < len(pool) else rng.integers(0, 255, rng.integers(0, 9), np.uint8).tobytes()
               for i in rng.integers(0, len(pool) + 4, 500)]
    if seed == 5:
        strings.append(b"has \xff inside")  # 0xFF present: the one-by-one path
    raw = _packed(strings)
    want = [s.decode("utf-8", "surrogateescape") for s in strings]
    fast = StringArray(raw, len(strings), np.array([len(s) for s in strings]))
    assert list(fast) == want
    assert list(StringArray(raw, len(strings))) == want
