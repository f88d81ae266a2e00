"""Super weights: found from activations and confirmed by their effect (calibrate/superweights.py),
recorded in the imatrix GGUF (calibrate/outliers.py), merged, and protected by quantize."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantcli.calibrate import imatrix as calib
from quantcli.calibrate import imatrix_file as imf
from quantcli.calibrate.outliers import LayerMaxima, MassiveActivation, Outliers, SuperWeight, Thresholds, merge
from quantcli.calibrate.runner import RunOptions, make_observer, run_calibration
from quantcli.engine.model import Model
from quantcli.engine.tokenizer import Tokenizer
from quantcli.errors import InputError
from quantcli.formats import open_model
from tests.conftest import DATA
from tests.models import write_model

ROW, COL = 37, 50  # the planted super weight of blk.0.ffn_down (output channel, input channel)


def planted(path, plant: bool = True):
    """A 3-layer random llama; with `plant`, blk.0's gate/up row COL points along the BOS embedding
    (a large input to ffn_down at the BOS token only) and ffn_down[ROW, COL] = 2 carries it into
    output channel ROW: a spike ~300x the median made by one weight, as in a trained model."""
    bos = {}

    def edit(name: str, a: np.ndarray) -> np.ndarray:
        if name == "token_embd.weight":
            bos["u"] = a[2] / np.linalg.norm(a[2])
        elif name in ("blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"):
            a = a.copy()
            a[COL] = 4.0 * bos["u"]
        elif name == "blk.0.ffn_down.weight":
            a = a.copy()
            a[ROW, COL] = 2.0
        return a

    return write_model(path, "llama", n_layer=3, seed=3, edit=edit if plant else None)


def detect(path, chunks: int = 16, ctx: int = 64) -> Outliers:
    with open_model(path) as r:
        tokens = Tokenizer.from_model(r).encode((DATA / "engine" / "genesis.txt").read_text(), add_special=True,
                                                parse_special=False)
        obs = make_observer("superweights")
        run_calibration(Model(r), tokens, RunOptions(ctx=ctx, chunks=chunks), [make_observer("imatrix"), obs])
        return obs.result()


def test_a_planted_super_weight_is_found_exactly_and_confirmed(tmp_path):
    found = detect(planted(tmp_path / "m.gguf"))
    assert [(s.tensor, s.row, s.col) for s in found.confirmed] == [("blk.0.ffn_down.weight", ROW, COL)]
    s = found.confirmed[0]
    assert s.value == 2.0 and s.share > 0.95 and s.spike > 100
    assert abs(s.effect) > 0.05 and abs(s.effect) > 10 * abs(s.control)
    assert found.confirm_chunks == 2 and found.base_perplexity > 1
    assert found.layers[0].down_out[0] == ROW and found.layers[0].down_in[0] == COL


def test_a_model_without_one_reports_none_found_with_the_maxima(tmp_path):
    found = detect(planted(tmp_path / "m.gguf", plant=False))
    assert found.super_weights == [] and found.massive == []
    line = found.none_found()
    assert line.startswith("no super weights found: largest FFN output ")
    assert "a spike needs 100x" in line and "massive needs 1000x" in line
    assert len(found.layers) == 3 and all(m.down_out[2] < 100 for m in found.layers)


def test_detection_resumes_from_layer_checkpoints_to_the_same_records(tmp_path, monkeypatch):
    path = planted(tmp_path / "m.gguf")
    whole = detect(path).to_json()
    with open_model(path) as r:
        tokens = Tokenizer.from_model(r).encode((DATA / "engine" / "genesis.txt").read_text(), add_special=True,
                                                parse_special=False)
        opts = RunOptions(ctx=64, chunks=16, checkpoint_dir=tmp_path / "ck")
        model = Model(r)
        real = Model.layer_weights
        calls = []

        def crash(self, il):
            calls.append(il)
            if len(calls) == 3:  # layers 0 and 1 are checkpointed
                raise KeyboardInterrupt
            return real(self, il)

        monkeypatch.setattr(Model, "layer_weights", crash)
        with pytest.raises(KeyboardInterrupt):
            run_calibration(model, tokens, opts, [make_observer("imatrix"), make_observer("superweights")])
        monkeypatch.setattr(Model, "layer_weights", real)
        obs = make_observer("superweights")
        run = run_calibration(model, tokens, opts, [make_observer("imatrix"), obs])
    assert run.resumed_layers == 2
    assert obs.result().to_json() == whole


def _records() -> Outliers:
    return Outliers(
        [SuperWeight("blk.0.ffn_down.weight", 400, 1405, 0.203125, 8782.0, 0.99, 0.16, 0.0004, True),
         SuperWeight("blk.2.ffn_down.weight", 400, 56, 0.0755, 1277.0, 0.57, -0.002, -0.0015, False)],
        [MassiveActivation(0, 400, 2983.8, 5445.9, 0, 2)],
        [LayerMaxima(0, (1405, 139.2, 1953.3), (400, 2862.8, 8782.1), (400, 2983.8, 5445.9)),
         LayerMaxima(1, (1775, 25.8, 405.0), (400, 1508.0, 3154.3), (400, 5088.4, 6771.6))],
        Thresholds(), 2, 1.785)


def test_records_survive_the_imatrix_gguf_and_leave_its_statistics_alone(tmp_path):
    src = imf.load(DATA / "reference" / "gemma3-270m" / "imatrix-genesis.gguf")
    plain, marked = tmp_path / "plain.gguf", tmp_path / "marked.gguf"
    imf.save_gguf(src, plain)
    imf.save_gguf(imf.Imatrix(src.entries, src.datasets, src.chunk_count, src.chunk_size, outliers=_records()), marked)
    back = imf.load(marked)
    assert back.outliers.to_json() == _records().to_json()
    assert imf.load(plain).outliers is None
    for name in src.entries:
        np.testing.assert_array_equal(back.importance(name), src.importance(name))


def test_empty_records_round_trip(tmp_path):
    none = Outliers([], [], [LayerMaxima(0, (1, 2.0, 3.0), (4, 5.0, 6.0), (7, 8.0, 9.0))], Thresholds(), 0)
    src = imf.load(DATA / "reference" / "gemma3-270m" / "imatrix-genesis.gguf")
    out = tmp_path / "none.gguf"
    imf.save_gguf(imf.Imatrix(src.entries, src.datasets, src.chunk_count, src.chunk_size, outliers=none), out)
    back = imf.load(out).outliers
    assert back.super_weights == [] and back.massive == [] and back.layers == none.layers
    assert math.isnan(back.base_perplexity)


def test_merging_keeps_every_record_once(tmp_path):
    a = _records()
    b = Outliers([SuperWeight("blk.0.ffn_down.weight", 400, 1405, 0.203125, 9000.0, 0.98, 0.15, 0.0, True),
                  SuperWeight("blk.5.ffn_down.weight", 163, 584, 0.2176, 4986.0, 1.0, 0.087, 0.0006, True)],
                 [MassiveActivation(0, 400, 3100.0, 6000.0, 0, 2), MassiveActivation(3, 163, 1e4, 5500.0, 0, 2)],
                 [LayerMaxima(0, (1405, 150.0, 2000.0), (400, 2000.0, 8000.0), (400, 3100.0, 6000.0))],
                 Thresholds(), 4, 1.9)
    m = merge([a, None, b])
    keys = [(s.tensor, s.row, s.col) for s in m.super_weights]
    assert sorted(keys) == sorted({*keys}) and len(keys) == 3
    w = next(s for s in m.super_weights if s.col == 1405)
    assert w.spike == 9000.0  # measured on more chunks
    assert {(x.layer, x.channel): x.value for x in m.massive} == {(0, 400): 3100.0, (3, 163): 1e4}
    assert m.layers[0].down_in == (1405, 150.0, 2000.0) and m.layers[0].down_out == (400, 2862.8, 8782.1)
    assert m.confirm_chunks == 4
    assert merge([None, None]) is None


def test_in_file_merges_keep_the_records(tmp_path):
    src = imf.load(DATA / "reference" / "gemma3-270m" / "imatrix-genesis.gguf")
    a = tmp_path / "a.gguf"
    imf.save_gguf(imf.Imatrix(src.entries, src.datasets, src.chunk_count, src.chunk_size, outliers=_records()), a)
    merged = calib.compute(None, None, calib.ImatrixOptions(in_files=(a, DATA / "reference" / "gemma3-270m" /
                                                                      "imatrix-genesis.gguf")))
    assert merged.imatrix.outliers.to_json() == _records().to_json()


def test_malformed_records_name_the_file(tmp_path):
    src = imf.load(DATA / "reference" / "gemma3-270m" / "imatrix-genesis.gguf")
    rec = _records()
    kv = rec.to_kv()
    kv["quantcli.super_weights.row"] = kv["quantcli.super_weights.row"].__class__(
        kv["quantcli.super_weights.row"].type, np.zeros(5, np.uint32), kv["quantcli.super_weights.row"].item_type)
    with pytest.raises(InputError, match="bad.gguf: the super_weights records have arrays of different lengths"):
        Outliers.from_meta(lambda k, d=None: kv[k].value if k in kv else d, "bad.gguf")
    assert src.outliers is None
