"""`quantcli report` on an automatic mix through the CLI a user runs: per layer the bits, the size
share and the estimated dKLD (from the file's allocation metadata or a --measurement), the --plot
PNG, and one-line refusals of damaged metadata and of a measurement of another model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner, Result

from quantcli.allocate import Measurement, TensorMeasurement
from quantcli.cli.app import app
from tests.conftest import safetensors_bytes
from tests.models import write_model

runner = CliRunner()
TYPES = ("Q4_0", "Q5_0", "Q8_0")  # the 2-D tensors' types, in turn
PNG = b"\x89PNG\r\n\x1a\n"


def report(*args: str) -> Result:
    return runner.invoke(app, ["report", *args])


def mixed_model(tmp: Path, kld: list[float] | None = None, name: str = "mix.gguf") -> tuple[Path, dict]:
    """A 3-layer llama whose 2-D tensors are Q4_0 / Q5_0 / Q8_0 in turn (norms F32), written with
    gguf-py; with `kld`, the allocation metadata an automatic mix records. Returns the path and
    {tensor name: (numpy shape, type)} in file order."""
    src = write_model(tmp / "src.gguf", "llama", n_layer=3, n_vocab=64, tokenizer=False, tied=False)
    w = gguf.GGUFWriter(str(tmp / name), "llama")
    w.add_block_count(3)
    if kld is not None:
        w.add_string("quantcli.allocation.target", "size 180MB")
        w.add_float32("quantcli.allocation.estimate_kld", float(np.float32(sum(kld))))
        w.add_string("quantcli.allocation.measurement_sha256", "ab" * 32)
        w.add_array("quantcli.allocation.tensor_kld", [float(v) for v in kld])
    layout, k = {}, 0
    for t in gguf.GGUFReader(src).tensors:
        arr = np.asarray(t.data, np.float32)
        if arr.ndim == 2:
            qt = TYPES[k % len(TYPES)]
            k += 1
            w.add_tensor(t.name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType[qt]),
                         raw_dtype=gguf.GGMLQuantizationType[qt])
        else:
            qt = "F32"
            w.add_tensor(t.name, arr)
        layout[t.name] = (arr.shape, qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp / name, layout


def measurement(tmp: Path, layout: dict, *, skip_type_of: str = "token_embd.weight",
                reshape: str | None = None) -> Path:
    """A measurement of every 2-D tensor of `layout` with random errors for the three types and one
    reference; `skip_type_of` gets no error for its own type (its estimate is unknown), `reshape`
    a wrong shape."""
    rng = np.random.default_rng(3)
    tensors = {}
    for name, (shape, qt) in layout.items():
        if len(shape) != 2:
            continue
        e8 = float(rng.uniform(1e-4, 1e-3))
        errors = {"Q4_0": 40 * e8, "Q5_0": 10 * e8, "Q8_0": e8}
        if name == skip_type_of:
            errors = {q: e for q, e in errors.items() if q != qt}
        tm_shape = (shape[0] + 1, shape[1]) if name == reshape else tuple(shape)
        tensors[name] = TensorMeasurement(name, tm_shape, errors, {}, {"Q4_0": float(rng.uniform(1e-3, 1e-2))})
    m = Measurement({"file": "src.gguf", "fingerprint": "abc"}, None, {"chunks": 2, "ctx": 64},
                    list(TYPES), ["Q4_0"], tensors)
    path = tmp / "m.sensitivity.json"
    path.write_bytes(m.dumps())
    return path


def _one_error(res: Result, code: int) -> str:
    """Exit `code`, nothing on stdout, one `error:` line (and at most a hint), no traceback."""
    assert res.exit_code == code, res.output
    assert type(res.exception) is SystemExit
    assert res.stdout == "" and "Traceback" not in res.output
    lines = res.stderr.splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2
    assert all(line.startswith("hint: ") for line in lines[1:])
    return lines[0]


def _layer_sums(doc: dict) -> None:
    """Each layer's and group's estimate is the sum of its tensors' (None when none has one), and
    the shares of the layers and the groups outside them are their bytes over all bytes, adding to 1."""
    total = sum(t["bytes"] for t in doc["tensors"])
    groups = {g["name"]: g for g in doc["outside_layers"]}
    for row in [*doc["layers"], *groups.values()]:
        if "layer" in row:
            members = [t for t in doc["tensors"] if t["layer"] == row["layer"]]
        else:
            members = [t for t in doc["tensors"] if t["layer"] is None and _group(t["name"]) == row["name"]]
        assert row["bytes"] == sum(t["bytes"] for t in members)
        assert row["share"] == pytest.approx(row["bytes"] / total)
        known = [t["estimated_kld"] for t in members if t["estimated_kld"] is not None]
        assert row["estimated_kld"] == (pytest.approx(sum(known)) if known else None)
    assert sum(r["share"] for r in [*doc["layers"], *groups.values()]) == pytest.approx(1.0)
    known = [t["estimated_kld"] for t in doc["tensors"] if t["estimated_kld"] is not None]
    assert doc["totals"]["estimated_kld"] == pytest.approx(sum(known))


def _group(name: str) -> str:
    return "embd" if name.startswith("token_embd") else "out" if name.startswith("output") else "other"


def test_recorded_estimates_per_tensor_and_layer(tmp_path):
    n = 3 * 9 + 3
    kld = [0.0 if i % 3 == 1 else 1e-4 * (i + 1) for i in range(n)]
    path, layout = mixed_model(tmp_path, kld)
    res = report(str(path), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["schema"] == "quantcli.report/1"
    assert doc["allocation"] == {"target": "size 180MB", "estimate_kld": pytest.approx(sum(kld), rel=1e-6),
                                 "measurement_sha256": "ab" * 32}
    assert doc["estimates"] == {"source": "metadata", "measurement": None, "measurement_sha256": "ab" * 32}
    assert [t["name"] for t in doc["tensors"]] == list(layout)
    assert [t["estimated_kld"] for t in doc["tensors"]] == [float(np.float32(v)) for v in kld]
    assert [r["layer"] for r in doc["layers"]] == [0, 1, 2]
    assert [g["name"] for g in doc["outside_layers"]] == ["embd", "out"]
    _layer_sums(doc)
    for r in doc["layers"]:
        assert r["bpw"] == pytest.approx(8 * r["bytes"] / r["params"], abs=1e-4)


def test_measurement_estimates_replace_recorded(tmp_path):
    path, layout = mixed_model(tmp_path, [1.0] * 30)
    meas = measurement(tmp_path, layout)
    res = report(str(path), "--json", "--measurement", str(meas))
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    m = Measurement.load(meas)
    assert doc["estimates"] == {"source": "measurement", "measurement": str(meas),
                                "measurement_sha256": hashlib.sha256(meas.read_bytes()).hexdigest()}
    for t in doc["tensors"]:
        _, qt = layout[t["name"]]
        assert t["type"] == qt
        if t["name"] == "token_embd.weight":
            assert t["estimated_kld"] is None  # no error for its type: unknown
        elif qt == "F32":
            assert t["estimated_kld"] == 0.0
        else:
            assert t["estimated_kld"] == m.tensors[t["name"]].estimate(qt) > 0
    _layer_sums(doc)
    embd = next(g for g in doc["outside_layers"] if g["name"] == "embd")
    assert embd["estimated_kld"] is None
    layer0 = [t for t in doc["tensors"] if t["layer"] == 0]
    assert doc["layers"][0]["estimated_kld"] == pytest.approx(
        sum(m.tensors[t["name"]].estimate(t["type"]) for t in layer0 if t["type"] != "F32"))


def test_table_shows_bits_share_and_estimates(tmp_path):
    path, layout = mixed_model(tmp_path, [2e-4] * 30)
    res = report(str(path), "--no-tensors")
    assert res.exit_code == 0, res.output
    header = next(line for line in res.stdout.splitlines() if "layer" in line and "share" in line)
    for col in ("bpw", "share", "est. dKLD", "types"):
        assert col in header
    labels = [line.split("│")[1].strip() for line in res.stdout.splitlines() if line.startswith("│")]
    assert [lab for lab in labels if lab][:5] == ["embd", "0", "1", "2", "out"]  # (wrapped rows: blank)
    assert "automatic mix: target size 180MB, estimated KLD 0.006" in res.stdout
    assert "estimated KLD 0.006 (sum over tensors, from the file's allocation metadata)" in res.stdout
    meas = measurement(tmp_path, layout)
    res = report(str(path), "--no-tensors", "--measurement", str(meas))
    assert res.exit_code == 0, res.output
    assert (f"from {meas}); 1 tensor(s) without an estimate at their type; not the measurement the mix "
            "was made from") in res.stdout


def test_no_estimates_no_estimate_fields(tmp_path):
    path, _ = mixed_model(tmp_path)
    res = report(str(path), "--json")
    doc = json.loads(res.stdout)
    assert doc["allocation"] is None and doc["estimates"] is None
    assert all("estimated_kld" not in r for r in [*doc["tensors"], *doc["layers"], doc["totals"]])
    assert sum(r["share"] for r in [*doc["layers"], *doc["outside_layers"]]) == pytest.approx(1.0)
    table = report(str(path))
    assert table.exit_code == 0 and "share" in table.stdout and "est. dKLD" not in table.stdout


def test_safetensors_keeps_working(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((32, 16)).astype(np.float32),
               "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((16, 16)).astype(np.float16),
               "model.layers.1.self_attn.q_proj.weight": rng.standard_normal((16, 16)).astype(np.float16),
               "lm_head.weight": rng.standard_normal((32, 16)).astype(np.float32)}
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes(tensors))
    png = tmp_path / "st.png"
    res = report(str(path), "--json", "--plot", str(png))
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["format"] == "safetensors" and doc["estimates"] is None and doc["allocation"] is None
    assert [r["layer"] for r in doc["layers"]] == [0, 1]
    assert [(g["name"], g["tensors"]) for g in doc["outside_layers"]] == [("embd", 1), ("out", 1)]
    assert doc["layers"][0]["share"] == pytest.approx(512 / (2 * 2048 + 2 * 512))
    assert png.read_bytes()[:8] == PNG


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path, layout = mixed_model(tmp_path, [1e-4] * 30)
    png = tmp_path / "layers.png"
    res = report(str(path), "--no-tensors", "--plot", str(png))
    assert res.exit_code == 0, res.output
    data = png.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("layers")] == ["layers.png"]
    res = report(str(path), "--json", "--measurement", str(measurement(tmp_path, layout)), "--plot", str(png))
    assert res.exit_code == 0 and png.read_bytes()[:8] == PNG  # an existing plot is replaced


def test_plot_refusals(tmp_path, monkeypatch):
    path, _ = mixed_model(tmp_path)
    assert "a PNG" in _one_error(report(str(path), "--plot", str(tmp_path / "x.jpg")), 2)
    assert "does not exist" in _one_error(report(str(path), "--plot", str(tmp_path / "no" / "x.png")), 4)
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else find_spec(n, *a))
    assert _one_error(report(str(path), "--plot", str(tmp_path / "x.png")), 2) == "error: --plot needs matplotlib"
    assert not (tmp_path / "x.png").exists()


def test_measurement_of_another_model_is_refused(tmp_path):
    path, layout = mixed_model(tmp_path, [1e-4] * 30)
    bad = measurement(tmp_path, layout, reshape="blk.1.ffn_up.weight")
    line = _one_error(report(str(path), "--measurement", str(bad)), 3)
    assert line == (f"error: {bad}: the measurement is of another model: blk.1.ffn_up.weight is [97, 64] "
                    "there, [96, 64] in mix.gguf")
    other = tmp_path / "other"
    other.mkdir()
    _, foreign = mixed_model(other)
    foreign = {f"x.{n}": v for n, v in foreign.items()}
    bad = measurement(other, foreign, skip_type_of="")
    line = _one_error(report(str(path), "--json", "--measurement", str(bad)), 3)
    assert line == f"error: {bad}: the measurement is of another model: none of the 30 tensors of mix.gguf is in it"
    line = _one_error(report(str(path), "--measurement", str(tmp_path / "missing.json")), 3)
    assert "missing.json: no such measurement file" in line


def test_damaged_tensor_kld_is_refused(tmp_path):
    path, layout = mixed_model(tmp_path, [1e-4] * 29)
    line = _one_error(report(str(path), "--json"), 3)
    assert line == (f"error: {path}: metadata 'quantcli.allocation.tensor_kld' has 29 values for 30 tensors")
    res = report(str(path), "--json", "--measurement", str(measurement(tmp_path, layout)))
    assert res.exit_code == 0, res.output  # a measurement replaces the damaged estimates
