"""`quantize --target-size / --target-bpw / --max-kld` through the CLI a user runs: the file meets
its target, records how it was chosen, reuses a measurement, reproduces itself from the profile it
saves, and refuses impossible targets, unknown types and foreign measurements with one line."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.formats import open_model
from tests.models import write_model

runner = CliRunner()
TEXT = "In the beginning God created the heaven and the earth. And the earth was without form. " * 60
CANDIDATES = "Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q4_0,Q5_0,Q8_0,F16"
ANALYSIS = ["--ctx", "64", "--calib-chunks", "4", "--sensitivity-chunks", "2", "--candidates", CANDIDATES]


def quantize(*args: str, env: dict | None = None):
    return runner.invoke(app, ["quantize", *args], env=env)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A model whose rows fit the 256-blocks, a text, and one measurement made through the CLI."""
    tmp = tmp_path_factory.mktemp("alloc")
    src = write_model(tmp / "m.gguf", "llama", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512)
    text = tmp / "calib.txt"
    text.write_text(TEXT)
    meas = tmp / "m.sensitivity.json"
    res = quantize(str(src), str(tmp / "first.gguf"), "--target-bpw", "6", "--calib", str(text),
                   "--measurement", str(meas), *ANALYSIS, "--json")
    assert res.exit_code == 0, res.output
    return tmp, src, text, meas, json.loads(res.stdout)


def _block(q):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[q]][0]


def _padded(shape, q):
    from gguf import GGMLQuantizationType

    from quantcli.formats.gguf import type_nbytes

    return -(-type_nbytes(GGMLQuantizationType[q], list(reversed(shape))) // 32) * 32


def _sizes(setup):
    tmp, src, *_ = setup
    out = {}
    for preset in ("Q2_K", "Q4_K_M", "Q8_0"):
        res = quantize(str(src), str(tmp / "x.gguf"), "--type", preset, "--dry-run", "--json")
        out[preset] = json.loads(res.stdout)["file_bytes"]
    return out


def test_the_analysis_writes_a_measurement_of_every_tensor(setup):
    tmp, src, text, meas, first = setup
    doc = json.loads(meas.read_text())
    assert doc["schema"] == "quantcli.sensitivity/1"
    with open_model(src) as r:
        two_d = {n for n, i in r.tensors.items() if len(i.shape) == 2}
    assert set(doc["tensors"]) == two_d
    for t in doc["tensors"].values():
        assert all(k > 0 for k in t["kld"].values()) and t["kld"]
    assert first["allocation"]["measurement_sha256"] == __import__("hashlib").sha256(meas.read_bytes()).hexdigest()
    assert first["bpw"] <= 6.0


@pytest.mark.parametrize("preset", ["Q2_K", "Q4_K_M"])
def test_target_size_is_met_within_half_a_percent_and_never_exceeded(setup, preset):
    tmp, src, text, meas, _ = setup
    size = _sizes(setup)[preset]
    out = tmp / f"auto-{preset}.gguf"
    before = meas.read_bytes()
    res = quantize(str(src), str(out), "--target-size", str(size), "--measurement", str(meas), "--json")
    assert res.exit_code == 0, res.output
    assert meas.read_bytes() == before  # reused, not recomputed
    got = out.stat().st_size
    summary = json.loads(res.stdout)
    assert summary["file_bytes"] == got <= size
    # what is left unused is less than any one tensor's step up (on a real model: < 0.5 %, bench)
    steps = []
    for t in summary["tensors"]:
        if "estimated_kld" not in t:
            continue
        mine = _padded(t["shape"], t["type"])
        steps += [_padded(t["shape"], q) - mine for q in CANDIDATES.split(",")
                  if t["shape"][-1] % _block(q) == 0 and _padded(t["shape"], q) > mine]
    assert size - got < min(steps)
    with open_model(out) as r:
        kv = r.kv
        assert kv["quantcli.allocation.target"].value == f"size {size}"
        est = [float(x) for x in kv["quantcli.allocation.tensor_kld"].value]
        assert len(est) == len(r.tensors)
        assert kv["quantcli.allocation.estimate_kld"].value == pytest.approx(sum(est), rel=1e-5)
        assert kv["quantcli.allocation.measurement_sha256"].value == summary["allocation"]["measurement_sha256"]


def test_a_larger_budget_never_estimates_worse(setup):
    tmp, src, text, meas, _ = setup
    ests = []
    for bpw in ("3", "4", "5", "7", "9"):
        res = quantize(str(src), str(tmp / "y.gguf"), "--target-bpw", bpw, "--measurement", str(meas),
                       "--dry-run", "--json")
        assert res.exit_code == 0, res.output
        d = json.loads(res.stdout)
        assert d["bpw"] <= float(bpw)
        ests.append(d["allocation"]["estimated_kld"])
    assert ests == sorted(ests, reverse=True) and ests[0] > ests[-1]


def test_max_kld_gives_the_smallest_mix_under_the_estimate(setup):
    tmp, src, text, meas, _ = setup
    res = quantize(str(src), str(tmp / "z.gguf"), "--max-kld", "0.05", "--measurement", str(meas),
                   "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["allocation"]["estimated_kld"] <= 0.05
    assert sum(t.get("estimated_kld", 0.0) for t in d["tensors"]) == pytest.approx(d["allocation"]["estimated_kld"])


def test_dry_run_prints_type_bytes_and_estimate_per_tensor(setup):
    tmp, src, text, meas, _ = setup
    res = quantize(str(src), str(tmp / "w.gguf"), "--target-bpw", "5", "--measurement", str(meas), "--dry-run")
    assert res.exit_code == 0, res.output
    assert "est. dKLD" in res.stdout and "automatic mix (bpw 5)" in res.stdout
    assert "blk.1.ffn_down.weight" in res.stdout
    assert not (tmp / "w.gguf").exists()


def test_save_profile_then_profile_reproduces_the_bytes(setup):
    tmp, src, text, meas, _ = setup
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    a, prof, b = tmp / "a.gguf", tmp / "mix.yaml", tmp / "b.gguf"
    res = quantize(str(src), str(a), "--target-bpw", "4.5", "--measurement", str(meas), "--save-profile",
                   str(prof), "-q", env=env)
    assert res.exit_code == 0, res.output
    assert prof.exists()
    res = quantize(str(src), str(b), "--profile", str(prof), "-q", env=env)
    assert res.exit_code == 0, res.output
    assert a.read_bytes() == b.read_bytes()


def test_tensor_type_rules_are_kept_fixed(setup):
    tmp, src, text, meas, _ = setup
    res = quantize(str(src), str(tmp / "v.gguf"), "--target-bpw", "4", "--measurement", str(meas),
                   "--tensor-type", "ffn_down=Q8_0", "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    types = {t["name"]: t for t in json.loads(res.stdout)["tensors"]}
    assert types["blk.0.ffn_down.weight"]["type"] == "Q8_0" and "estimated_kld" not in types["blk.0.ffn_down.weight"]
    assert "estimated_kld" in types["blk.0.ffn_up.weight"]


@pytest.mark.parametrize("target", ["1000", "10GB"])
def test_infeasible_targets_give_the_reachable_range_and_nearest_preset(setup, target):
    tmp, src, text, meas, _ = setup
    out = tmp / "never.gguf"
    res = quantize(str(src), str(out), "--target-size", target, "--measurement", str(meas))
    assert res.exit_code == 7, res.output
    assert "out of reach" in res.output and "nearest preset is" in res.output and " to " in res.output
    assert "Traceback" not in res.output and not out.exists()


def test_bad_inputs_are_one_line_errors(setup, tmp_path):
    tmp, src, text, meas, _ = setup
    out = tmp_path / "o.gguf"
    res = quantize(str(src), str(out), "--target-bpw", "4", "--measurement", str(meas), "--candidates", "Q9_X")
    assert res.exit_code == 2 and "Q9_X" in res.output
    res = quantize(str(src), str(out), "--target-bpw", "4", "--measurement", str(meas), "--candidates", "Q3_K_M")
    assert res.exit_code == 2
    other = write_model(tmp_path / "other.gguf", "llama", n_layer=2, n_embd=256, n_head=4, n_head_kv=2,
                        n_ff=512, seed=5)
    res = quantize(str(other), str(out), "--target-bpw", "4", "--measurement", str(meas))
    assert res.exit_code == 3 and "another model" in res.output
    res = quantize(str(src), str(out), "--target-bpw", "4")
    assert res.exit_code == 2 and "--calib" in res.output
    res = quantize(str(src), str(out), "--target-bpw", "4", "--target-size", "1MB", "--measurement", str(meas))
    assert res.exit_code == 2
    res = quantize(str(src), str(out), "--type", "Q4_K_M", "--calib", str(text))
    assert res.exit_code == 2 and "--target-size" in res.output
    assert not out.exists()
    assert all("Traceback" not in r for r in [res.output])


def test_a_measurement_without_a_planned_tensor_is_refused(setup, tmp_path):
    tmp, src, text, meas, _ = setup
    doc = json.loads(meas.read_text())
    del doc["tensors"]["blk.1.ffn_up.weight"]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(doc))
    res = quantize(str(src), str(tmp_path / "o.gguf"), "--target-bpw", "4", "--measurement", str(partial))
    assert res.exit_code == 3 and "blk.1.ffn_up.weight" in res.output and "Traceback" not in res.output


_KILLED = """
import sys
from quantcli.cli.app import app
sys.argv = ["quantcli", "quantize", *sys.argv[1:]]
app()
"""


def test_the_analysis_resumes_after_sigkill_to_the_same_measurement(tmp_path):
    """SIGKILL `quantize --calib` while it measures; the same command again resumes from the
    layer checkpoints and measures what an uninterrupted run measures."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    src = write_model(tmp_path / "m.gguf", "llama", n_layer=6, n_embd=256, n_head=4, n_head_kv=2, n_ff=512)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    script = tmp_path / "run.py"
    script.write_text(_KILLED)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    imx = tmp_path / "imx.gguf"
    assert runner.invoke(app, ["imatrix", str(src), "-f", str(text), "-o", str(imx), "--ctx", "64",
                               "--chunks", "4"]).exit_code == 0

    def cmd(meas, ck):
        return [sys.executable, str(script), str(src), str(tmp_path / "o.gguf"), "--target-bpw", "5", "--imatrix",
                str(imx), "--calib", str(text), "--measurement", str(meas), "--checkpoint-dir", str(ck),
                "--ctx", "64", "--candidates", CANDIDATES, "--dry-run", "-q"]

    subprocess.run(cmd(tmp_path / "ref.json", tmp_path / "ck-ref"), check=True, env=env)
    ck = tmp_path / "ck"
    manifest = ck / "sensitivity" / "manifest.json"
    proc = subprocess.Popen(cmd(tmp_path / "got.json", ck), env=env)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        try:
            if sum(u.startswith("stats-") for u in json.loads(manifest.read_text())["units"]) >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    assert proc.poll() is None, "the analysis finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "got.json").exists()
    subprocess.run(cmd(tmp_path / "got.json", ck), check=True, env=env)
    ref, got = (json.loads((tmp_path / n).read_text()) for n in ("ref.json", "got.json"))
    assert got["tensors"] == ref["tensors"] and got["act_kld"] == ref["act_kld"]
    assert not ck.exists()
