"""The kernel cache a wheel ships (setup.py) and the read-only views that keep one signature per
kernel."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from quantcli import codecs
from quantcli.codecs import kquants
from quantcli.codecs._dequant import dequant_q4_k
from quantcli.codecs._ggml_math import readonly


def test_readonly_is_a_view_and_keeps_none():
    a = np.arange(4, dtype=np.float32)
    v = readonly(a)
    assert not v.flags.writeable and a.flags.writeable and np.shares_memory(a, v)
    assert readonly(None) is None


def test_writeable_and_read_only_buffers_reach_a_kernel_as_one_type(monkeypatch):
    from numba import typeof

    seen = []

    def recording(blocks, y):
        seen.append((typeof(blocks), typeof(y)))
        dequant_q4_k(blocks, y)

    monkeypatch.setattr(kquants.Q4_K, "dequant_kernel", staticmethod(recording))
    data = codecs.quantize(np.linspace(-1, 1, 512, dtype=np.float32).reshape(2, 256), "Q4_K")
    frozen = data.copy()
    frozen.flags.writeable = False
    a = codecs.dequantize(data, "Q4_K", (2, 256))
    b = codecs.dequantize(frozen, "Q4_K", (2, 256))
    assert a.tobytes() == b.tobytes()
    assert len(seen) == 2 and seen[0] == seen[1] and not seen[0][0].mutable


def _installed_wheel() -> Path | None:
    """The package folder of a non-editable quantcli install (not this checkout), or None."""
    repo = Path(__file__).resolve().parents[2]
    for dist in importlib.metadata.distributions(name="quantcli"):
        direct = dist.read_text("direct_url.json")
        if direct and json.loads(direct).get("dir_info", {}).get("editable"):
            continue
        package = Path(dist.locate_file("quantcli")).resolve()
        if (package / "__init__.py").exists() and not package.is_relative_to(repo):
            return package
    return None


def test_an_installed_wheel_ships_kernels_numba_accepts():
    package = _installed_wheel()
    if package is None:
        pytest.skip("quantcli is not installed from a wheel here (editable or source checkout)")
    fn = kquants._qk45.py_func
    index = package / "codecs" / "__pycache__" / f"kquants._qk45-{fn.__code__.co_firstlineno}.py{sys.version_info[0]}{sys.version_info[1]}.nbi"
    if not index.exists():
        pytest.fail(f"{index} missing: the wheel was built without its kernels (QUANTCLI_PREBUILD=0, "
                    "or setup.py's warmup failed: see the build log)")
    with open(index, "rb") as f:
        import numba

        assert pickle.load(f) == numba.__version__
        stamp, overloads = pickle.loads(f.read())
    # numba uses an entry only when the stamp is the sha256 of the source beside it
    assert stamp == hashlib.sha256((package / "codecs" / "kquants.py").read_bytes()).digest()
    assert overloads
