"""examples/Makefile on a small model: calibrate -> imatrix -> presets -> verify gates -> report, and
incremental: a second make does nothing, a new imatrix remakes only what depends on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from tests.conftest import DATA
from tests.models import write_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _make(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    variables = [f"QUANTCLI={sys.executable} -m quantcli", f"MODEL={tmp / 'm.gguf'}", f"CALIB={tmp / 'calib.txt'}",
                 f"EVAL={tmp / 'eval.txt'}", f"GATES={tmp / 'gates.yaml'}", "PRESETS=Q8_0 Q4_K_M", f"OUT={tmp / 'out'}",
                 "CTX=64", "IMATRIX_CHUNKS=2", "EVAL_CHUNKS=4", f"BASE_CACHE={tmp / 'cache'}"]
    return subprocess.run(["make", "-f", str(REPO / "examples" / "Makefile"), *args, *variables], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)


def test_the_pipeline_runs_and_is_incremental(tmp_path):
    write_model(tmp_path / "m.gguf", "gemma3", n_layer=2, n_embd=256, n_head_kv=4, n_ff=512, seed=3)
    text = (DATA / "engine" / "genesis.txt").read_text()
    (tmp_path / "calib.txt").write_text(text[:4000])
    (tmp_path / "eval.txt").write_text((DATA / "engine" / "exodus.txt").read_text()[:8000])
    # a random model's figures: gates it passes, one per preset
    (tmp_path / "gates.yaml").write_text("max_ppl_ratio: 1.5\npresets:\n  Q8_0: {max_kld: 0.1}\n"
                                         "  Q4_K_M: {max_kld: 1.0}\n")
    res = _make(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "out"
    for p in ("Q8_0", "Q4_K_M"):
        assert (out / f"model-{p}.gguf").is_file() and (out / f"model-{p}.verified").is_file()
        root = ET.parse(out / f"model-{p}.junit.xml").getroot()
        assert root.get("failures") == "0" and "kld" in [c.get("name") for c in root.iter("testcase")]
        assert (out / f"model-{p}.report.json").read_text().lstrip().startswith("{")
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one base evaluation for both presets
    assert _make(tmp_path, "-q").returncode == 0  # up to date: a second make has nothing to do
    now = time.time()  # a new imatrix: everything older than it, the inputs older still
    for f in tmp_path.glob("*.*"):
        os.utime(f, (now - 300, now - 300))
    for f in out.iterdir():
        os.utime(f, (now - 200, now - 200))
    os.utime(out / "imatrix.gguf", (now - 100, now - 100))
    plan = _make(tmp_path, "-n").stdout
    assert plan.count(" quantize ") == 2 and plan.count(" verify ") == 2 and plan.count(" report ") == 2
    assert " imatrix " not in plan
    # a gate that fails stops the pipeline with verify's exit code and no stamp
    (tmp_path / "gates.yaml").write_text("max_ppl_ratio: 0.5\n")
    res = _make(tmp_path, "verify")
    assert res.returncode != 0 and "verification failed: ppl_ratio" in res.stderr
    assert not (out / "model-Q8_0.verified").exists()
