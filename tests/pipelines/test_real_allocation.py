"""Automatic mixes on the real model, from the measurement `quantize --calib genesis.txt` made of its
F32 base with the reference imatrix (tests/data/allocation; remade by bench/allocation.py): each
preset's file size is met within 0.5 % and never exceeded, with a smaller estimated KLD than the
preset's own; the written file is what the dry run promised, its profile reproduces it, and
llama.cpp loads and runs it (when llama-perplexity is found)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from quantcli.allocate import Measurement
from quantcli.pipelines import quantize as qp
from tests.conftest import DATA
from tests.pipelines.test_llama_cpp_runs import _llama_perplexity

IMATRIX = DATA / "reference" / "gemma3-270m" / "imatrix-genesis.gguf"
MEASUREMENT = DATA / "allocation" / "gemma3-270m-genesis.sensitivity.json"
PRESETS = ("Q2_K", "Q3_K_M", "Q4_K_M", "IQ2_XXS", "IQ3_XXS", "IQ4_XS", "IQ1_S")


def _dry(real_f32, tmp_path, **kw) -> qp.QuantizeResult:
    return qp.run(qp.QuantizeOptions(real_f32, tmp_path / "x.gguf", imatrix=IMATRIX, dry_run=True, **kw))


def _same(a, b) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 24), fb.read(1 << 24)
            if x != y:
                return False
            if not x:
                return True


@pytest.fixture(scope="module")
def measurement():
    return Measurement.load(MEASUREMENT)


@pytest.mark.parametrize("preset", PRESETS)
def test_each_presets_size_is_met_with_a_smaller_estimate(real_f32, tmp_path, measurement, preset):
    base = _dry(real_f32, tmp_path, preset=preset)
    size = base.file_bytes
    mix = _dry(real_f32, tmp_path, target_size=str(size), measurement=MEASUREMENT)
    assert 0.995 * size <= mix.file_bytes <= size
    preset_estimate = sum(measurement.estimate(p.info.name, p.type) for p in base.plan
                          if p.info.name in measurement.tensors)
    assert mix.allocation["estimated_kld"] < preset_estimate
    assert sum(p.estimate or 0.0 for p in mix.plan) == pytest.approx(mix.allocation["estimated_kld"])


def test_the_file_is_the_dry_runs_and_its_profile_reproduces_it(real_f32, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    size = _dry(real_f32, tmp_path, preset="IQ2_XXS").file_bytes
    out, prof, again = tmp_path / "auto.gguf", tmp_path / "auto.yaml", tmp_path / "again.gguf"
    opts = dict(target_size=str(size), measurement=MEASUREMENT, save_profile=prof)
    dry = _dry(real_f32, tmp_path, **opts)
    assert not prof.exists()  # a dry run writes nothing
    done = qp.run(qp.QuantizeOptions(real_f32, out, imatrix=IMATRIX, **opts))
    assert out.stat().st_size == done.file_bytes == dry.file_bytes <= size
    assert [p.type for p in done.plan] == [p.type for p in dry.plan]
    qp.run(qp.QuantizeOptions(real_f32, again, imatrix=IMATRIX, profile=prof))
    assert out.stat().st_size == again.stat().st_size and _same(out, again)  # (pytest's diff of 231 MB: hours)
    # and verify --rebuild-from remakes the mix from its saved profile
    from quantcli.formats import open_model
    from quantcli.pipelines.rebuild import rebuild

    again.unlink()
    with open_model(out) as r:
        ok, detail, _ = rebuild(out, r, real_f32, IMATRIX, prof)
    assert ok, detail

    exe = _llama_perplexity()
    if exe is None:
        pytest.skip("llama-perplexity not found (set QUANTCLI_LLAMA_BIN)")
    proc = subprocess.run([str(exe), "-m", str(out), "-f", str(DATA / "engine" / "exodus.txt"), "-c", "512",
                           "--chunks", "2", "-t", str(min(2, os.cpu_count() or 1))],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr).group(1))
    assert 1 < ppl < 30
