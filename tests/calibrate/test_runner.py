"""The calibration runner and its observers: what each observer sees, weight edits before a layer,
checkpoints keyed by the observers, merges, and resume after SIGKILL with the same result."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from quantcli.calibrate.absmax import AbsMaxObserver
from quantcli.calibrate.imatrix import ImatrixObserver
from quantcli.calibrate.runner import Observer, RunOptions, make_observer, observer_names, run_calibration
from quantcli.engine.model import Model, forward
from quantcli.errors import UsageError
from quantcli.formats import open_model
from tests.models import write_model

REPO = Path(__file__).resolve().parents[2]
LINEARS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return write_model(tmp_path / "m.gguf", "llama", n_layer=3, tied=False)


def tokens(n: int = 200, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 275, n)


def _chunks(n_chunks: int, ctx: int, seed: int = 0) -> np.ndarray:
    t = tokens(n_chunks * ctx, seed).reshape(n_chunks, ctx)
    t[:, 0] = 2  # BOS
    return t


def test_registry_lists_the_observers_and_refuses_duplicates():
    assert {"imatrix", "absmax"} <= set(observer_names())
    assert isinstance(make_observer("absmax", outputs=True), AbsMaxObserver)
    with pytest.raises(UsageError, match="unknown observer 'nope'; known: absmax, gptq, imatrix"):
        make_observer("nope")
    with pytest.raises(TypeError, match="observer 'absmax' is registered twice"):
        class Again(Observer, name="absmax"):
            pass


def test_absmax_equals_the_maxima_of_every_matmul_input_and_output(model_path):
    seen_in: dict[str, np.ndarray] = {}
    seen_out: dict[str, np.ndarray] = {}

    def fold(into, name, x):
        m = np.abs(x).max(axis=0)
        into[name] = np.maximum(into[name], m) if name in into else m

    with open_model(model_path) as r:
        m = Model(r)
        run = run_calibration(m, tokens(), RunOptions(ctx=32), [make_observer("absmax", outputs=True)])
        for chunk in _chunks(6, 32):  # the same chunks, whole model at a time, hooks on every matmul
            x = m.embed(chunk)
            for il in range(3):
                x = m.layer(il, m.layer_weights(il), x, lambda n, a: fold(seen_in, n, a),
                            lambda n, a: fold(seen_out, n, a))
    stats = run.observers[0].result()
    assert run.chunks.shape == (6, 32) and sorted(stats.inputs) == sorted(seen_in)
    assert sorted(stats.inputs) == sorted(f"blk.{il}.{w}.weight" for il in range(3) for w in LINEARS)
    for name in seen_in:
        assert np.array_equal(stats.inputs[name], seen_in[name]), name
        assert np.array_equal(stats.outputs[name], seen_out[name]), name
        assert stats.rows[name] == 6 * 32


def test_outputs_are_what_the_weights_make_of_the_inputs(model_path):
    """on_output's y is the matmul of on_input's x (exact without activation rounding)."""
    pairs: dict[str, list] = {}

    class Pairs(Observer, name="test-pairs"):
        wants_outputs = True

        def on_input(self, name, x):
            pairs.setdefault(name, []).append(x.copy())

        def on_output(self, name, y):
            pairs[name][-1] = (pairs[name][-1], y.copy())

    with open_model(model_path) as r:
        m = Model(r, act_quant=False)
        run_calibration(m, tokens(), RunOptions(ctx=32, chunks=1), [Pairs()])
        for name, ((x, y),) in pairs.items():
            w = r.load_f32(name)
            assert np.allclose(y, x @ w.T, rtol=1e-5, atol=1e-5), name


def test_residual_stream_after_each_layer_is_the_layer_output(model_path):
    seen: dict[tuple[int, int], np.ndarray] = {}

    class Residual(Observer, name="test-residual"):
        wants_residual = True

        def on_residual(self, il, chunk, h):
            seen[(il, chunk)] = h.copy()

    with open_model(model_path) as r:
        m = Model(r)
        run_calibration(m, tokens(), RunOptions(ctx=32, chunks=2), [Residual()])
        for c, chunk in enumerate(_chunks(2, 32)):
            x = m.embed(chunk)
            for il in range(3):
                x = m.layer(il, m.layer_weights(il), x)
                assert np.array_equal(seen[(il, c)], x)


def test_weights_edited_before_a_layer_change_what_follows(model_path):
    """An observer that doubles ffn_down of layer 1 (after probing the layer) gives the statistics
    of a model whose ffn_down is doubled: the runner is how smoothing folds scales into weights."""
    probed = []

    class Double(Observer, name="test-double"):
        def prepare_layer(self, il, weights, probe):
            if il == 1:
                probe(lambda n, x: probed.append(n) if n.endswith("ffn_down.weight") else None, None)
                weights["ffn_down"] *= 2

    direct: dict[str, np.ndarray] = {}

    def fold(name, x):
        m = np.abs(x).max(axis=0)
        direct[name] = np.maximum(direct[name], m) if name in direct else m

    with open_model(model_path) as r:
        m = Model(r)
        edited = run_calibration(m, tokens(), RunOptions(ctx=32), [Double(), make_observer("absmax")])
        plain = run_calibration(m, tokens(), RunOptions(ctx=32), [make_observer("absmax")])
        weights = [m.layer_weights(il) for il in range(3)]
        weights[1]["ffn_down"] *= 2
        for chunk in _chunks(6, 32):
            x = m.embed(chunk)
            for il in range(3):
                x = m.layer(il, weights[il], x, fold)
    edited, plain = edited.observers[1].result(), plain.observers[0].result()
    assert probed == ["blk.1.ffn_down.weight"] * 6  # the probe ran every chunk through layer 1
    for name in direct:
        assert np.array_equal(edited.inputs[name], direct[name]), name
    assert not np.array_equal(plain.inputs["blk.2.attn_q.weight"], edited.inputs["blk.2.attn_q.weight"])
    assert np.array_equal(plain.inputs["blk.1.ffn_down.weight"], edited.inputs["blk.1.ffn_down.weight"])


def test_shards_merge_to_the_whole(model_path):
    """Maxima and sums of two halves of the chunks merge into the statistics of all of them."""
    with open_model(model_path) as r:
        m = Model(r)
        whole = run_calibration(m, tokens(256), RunOptions(ctx=32), [ImatrixObserver(), AbsMaxObserver()])
        first = run_calibration(m, tokens(256)[:128], RunOptions(ctx=32), [ImatrixObserver(), AbsMaxObserver()])
        second = run_calibration(m, tokens(256)[128:], RunOptions(ctx=32), [ImatrixObserver(), AbsMaxObserver()])
    for a, b, w in zip(first.observers, second.observers, whole.observers):
        a.merge(b)
    imx, mx = first.observers[0].result(), first.observers[1].result()
    for name, s in whole.observers[0].result().sums.items():
        assert np.allclose(imx.sums[name], s, rtol=1e-12) and imx.counts[name] == whole.observers[0].result().counts[name]
    for name, v in whole.observers[1].result().inputs.items():
        assert np.array_equal(mx.inputs[name], v)


def test_checkpoint_key_covers_observers_and_their_options(model_path, tmp_path):
    ck = tmp_path / "ck"

    class Stop(Exception):
        pass

    def stop_after_first(ev):
        if ev.stage == "layer" and ev.done == 1:
            raise Stop

    with open_model(model_path) as r:
        m = Model(r)
        with pytest.raises(Stop):
            run_calibration(m, tokens(), RunOptions(ctx=32, checkpoint_dir=ck), [AbsMaxObserver()], stop_after_first)
        logs: list[str] = []
        other = run_calibration(m, tokens(), RunOptions(ctx=32, checkpoint_dir=ck, keep_checkpoints=True),
                                [AbsMaxObserver(outputs=True)], log=logs.append)
        assert other.resumed_layers == 0 and any("different observers" in s for s in logs)
        again = run_calibration(m, tokens(), RunOptions(ctx=32, checkpoint_dir=ck),
                                [AbsMaxObserver(outputs=True)], log=logs.append)
        assert again.resumed_layers == 3  # everything was checkpointed by the kept run
    ref = other.observers[0].result()
    got = again.observers[0].result()
    for name in ref.inputs:
        assert np.array_equal(got.inputs[name], ref.inputs[name])
        assert np.array_equal(got.outputs[name], ref.outputs[name])
    assert not ck.exists()


_SCRIPT = """
import sys, numpy as np
from pathlib import Path
from quantcli.calibrate.runner import RunOptions, make_observer, run_calibration
from quantcli.engine.model import Model
from quantcli.formats import open_model
model, out, ck = sys.argv[1:4]
toks = np.random.default_rng(0).integers(0, 275, 40 * 32)
with open_model(model) as r:
    run = run_calibration(Model(r), toks, RunOptions(ctx=32, checkpoint_dir=Path(ck) if ck else None),
                          [make_observer("absmax", outputs=True)])
stats = run.observers[0].result()
arrays = {f"in:{k}": v for k, v in stats.inputs.items()}
arrays.update({f"out:{k}": v for k, v in stats.outputs.items()})
np.savez(out, resumed=np.array(run.resumed_layers), **arrays)
"""


def _stats_units(ck: Path) -> int:
    import json

    try:
        units = json.loads((ck / "manifest.json").read_text())["units"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(u.startswith("stats-") for u in units)


def test_absmax_resumes_after_sigkill_to_the_same_result(tmp_path):
    """SIGKILL the run after a random number of layers, several times; each re-run resumes from
    the layer checkpoints and the final statistics equal an uninterrupted run's exactly."""
    n_layer = 6
    model = write_model(tmp_path / "m.gguf", "llama", n_layer=n_layer, tied=False)
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(script), str(model), str(tmp_path / "ref.npz"), ""], check=True, env=env)
    ck, out = tmp_path / "ck", tmp_path / "got.npz"
    rng = random.Random(7)
    kills = []
    for _attempt in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(model), str(out), str(ck)], env=env)
        target = min(n_layer - 1, _stats_units(ck) + rng.randint(1, 2))
        deadline = time.time() + 120
        while proc.poll() is None and _stats_units(ck) < target and time.time() < deadline:
            time.sleep(0.005)
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(_stats_units(ck))
    subprocess.run([sys.executable, str(script), str(model), str(out), str(ck)], check=True, env=env)
    assert kills and kills[0] >= 1
    ref, got = np.load(tmp_path / "ref.npz"), np.load(out)
    assert int(got["resumed"]) >= 1  # the last run took layers from the checkpoints
    assert sorted(ref.files) == sorted(got.files)
    for key in ref.files:
        if key != "resumed":
            assert np.array_equal(ref[key], got[key]), key
    assert not ck.exists()
