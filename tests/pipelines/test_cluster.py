"""`quantize --ray` and `imatrix --ray`: the same bytes as a local run.

Two layers of tests: the coordinator's logic through a stand-in cluster that runs the tasks in this
process in a shuffled order (no Ray needed: CI always runs these), and a real local Ray cluster of 2
workers (skipped without `ray`): same sha256 per tensor, a worker killed mid-run, the imatrix equal
to a local run's file, inputs the workers cannot read refused."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.formats import open_model
from quantcli.pipelines import cluster
from tests.conftest import DATA
from tests.models import write_model

runner = CliRunner()
EXODUS = DATA / "engine" / "exodus.txt"


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _tensor_sha(path: Path) -> dict[str, str]:
    with open_model(path) as r:
        return {n: hashlib.sha256(r.raw(n).tobytes()).hexdigest() for n in r.tensors}


class _Task:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return (self.fn, args)


class _FakeActor:
    """An actor in this process: each method call runs at once; once `cluster.kill_at` calls have
    been made, the actor dies (that call and every later one answers cluster.LOST)."""

    def __init__(self, fake, obj):
        self.fake, self.obj, self.dead = fake, obj, False

    def __getattr__(self, method):
        actor = self

        class _Method:
            @staticmethod
            def remote(*args):
                actor.fake.calls += 1
                if actor.fake.calls == actor.fake.kill_at:
                    actor.dead = True
                    actor.fake.killed += 1
                if actor.dead:
                    return cluster.LOST
                return getattr(actor.obj, method)(*args)

        return _Method


class FakeCluster:
    """Runs each window of tasks in this process in reverse order, yielding results in submission
    order: what a cluster whose workers finish in any order gives the coordinator. Actors run in
    this process too; `kill_at` makes the actor receiving that call die."""

    workers = 3
    node_cpus = 2

    def __init__(self):
        self.ran = 0
        self.calls, self.kill_at, self.killed, self.actors = 0, None, 0, 0

    def actor_class(self, cls, **options):
        fake = self

        class _Class:
            @staticmethod
            def remote(*args):
                fake.actors += 1
                return _FakeActor(fake, cls(*args))

        return _Class

    def results(self, refs):
        return list(refs)

    def put(self, value):
        return value

    def remote(self, fn, **options):
        return _Task(fn)

    def map_ordered(self, task, calls, window=None):
        calls = list(calls)
        for i in range(0, len(calls), 4):
            batch = [task.remote(*args) for args in calls[i:i + 4]]
            results = {j: fn(*args) for j, (fn, args) in reversed(list(enumerate(batch)))}
            self.ran += len(batch)
            for j in range(len(batch)):
                yield results[j]

    def close(self):
        pass


@pytest.fixture
def fake(monkeypatch):
    c = FakeCluster()
    monkeypatch.setattr(cluster, "connect", lambda address, num_cpus=None: c)
    monkeypatch.setattr(cluster, "check_inputs", lambda cl, paths: None)
    monkeypatch.setattr(cluster, "_READERS", {})
    return c


@pytest.fixture
def model(tmp_path) -> Path:
    return write_model(tmp_path / "m.gguf", "llama", n_layer=3, n_embd=128, n_head=4, n_head_kv=2, n_ff=256,
                       tied=False)


def test_quantize_through_a_cluster_writes_the_local_bytes(model, tmp_path, fake, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    imatrix = tmp_path / "m.imatrix"
    assert _cli("imatrix", model, "-f", EXODUS, "-o", imatrix, "--chunks", "4", "--ctx", "64", "-q").exit_code == 0
    for preset in ("Q4_K_M", "IQ2_XS"):
        local, remote = tmp_path / f"local-{preset}.gguf", tmp_path / f"ray-{preset}.gguf"
        assert _cli("quantize", model, local, "--type", preset, "--imatrix", imatrix, "-q", "--no-check").exit_code == 0
        res = _cli("quantize", model, remote, "--type", preset, "--imatrix", imatrix, "-q", "--no-check", "--ray")
        assert res.exit_code == 0, res.output
        assert local.read_bytes() == remote.read_bytes()
    assert fake.ran > 0


def test_a_coordinator_that_dies_resumes_from_its_manifest(model, tmp_path, fake, monkeypatch):
    """The checkpoint manifest is the coordinator's: units finished before a crash are not sent again."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    out = tmp_path / "out.gguf"
    real = cluster.encode_task
    calls = {"n": 0}

    def dying(*args):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # the coordinator is stopped mid-run
        return real(*args)

    monkeypatch.setattr(cluster, "encode_task", dying)
    res = _cli("quantize", model, out, "--type", "Q8_0", "--ray", "--keep-checkpoints")
    assert res.exit_code == 130 and not out.exists()
    monkeypatch.setattr(cluster, "encode_task", real)
    before = fake.ran
    res = _cli("quantize", model, out, "--type", "Q8_0", "--ray", "--json")
    assert res.exit_code == 0, res.output
    import json

    assert json.loads(res.stdout)["resumed_units"] >= 1
    resumed_slices = fake.ran - before
    before = fake.ran
    assert _cli("quantize", model, tmp_path / "fresh.gguf", "--type", "Q8_0", "-q", "--ray").exit_code == 0
    assert resumed_slices < fake.ran - before  # the resumed run sent only the units left
    assert _cli("quantize", model, tmp_path / "local.gguf", "--type", "Q8_0", "-q").exit_code == 0
    assert out.read_bytes() == (tmp_path / "local.gguf").read_bytes() == (tmp_path / "fresh.gguf").read_bytes()


def test_imatrix_blocks_through_a_cluster_give_the_local_file(model, tmp_path, fake):
    """40 chunks are 3 blocks of 16, 16 and 8; run in any order and added in block order they give
    the local run's sums bit for bit (same process, same BLAS)."""
    local, remote = tmp_path / "local.imatrix", tmp_path / "ray.imatrix"
    args = ["-f", EXODUS, "--chunks", "40", "--ctx", "64", "-q", "--process-output"]
    assert _cli("imatrix", model, "-o", local, *args).exit_code == 0
    res = _cli("imatrix", model, "-o", remote, *args, "--ray")
    assert res.exit_code == 0, res.output
    assert fake.ran == 3
    assert local.read_bytes() == remote.read_bytes()


SMOOTH_CASES = {  # the search: for llama.cpp's kernels (Q8_0: its one chunk's inputs come from shard 0),
    # static and per-token W8A8 (a float output: its 4 chunks' inputs from shards 0 and 1)
    "auto-token": ["--alpha", "auto", "--mappings", "all", "--activations", "dynamic"],
    "auto-static": ["--alpha", "auto", "--mappings", "all", "--activations", "static"],
    "auto-token-f32": ["--alpha", "auto", "--mappings", "all", "--activations", "dynamic", "--type", "F32"],
}
SMOOTH_ARGS = ["--ctx", "64", "--chunks", "7", "-q", "--json", "--scales-out"]


def _smooth(model: Path, out: Path, *args) -> dict:
    import json

    res = _cli("smooth", model, "-o", out, "--calib", EXODUS, *SMOOTH_ARGS, out.with_suffix(".json"), *args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize("case", sorted(SMOOTH_CASES))
def test_smooth_shards_through_a_cluster_give_the_local_file(model, tmp_path, fake, monkeypatch, case):
    """7 chunks in 3 shards (one BLAS thread each): merged in chunk order, the shards' maxima and
    rows give the local run's alphas, scales and GGUF, byte for byte."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    local, remote = tmp_path / "local.gguf", tmp_path / "ray.gguf"
    a = _smooth(model, local, *SMOOTH_CASES[case])
    b = _smooth(model, remote, *SMOOTH_CASES[case], "--ray")
    assert fake.actors == 3
    assert a["alphas"] == b["alphas"] and a["layers"] == b["layers"]
    assert local.read_bytes() == remote.read_bytes()
    assert local.with_suffix(".json").read_bytes() == remote.with_suffix(".json").read_bytes()


@pytest.mark.parametrize("alpha, kill_at", [("0.5", 8), ("auto", 14)])
def test_a_smooth_shard_whose_worker_dies_is_replayed(model, tmp_path, fake, monkeypatch, alpha, kill_at):
    """A shard's actor dies in layer 1 (alpha 0.5: measuring its inputs, the 8th call; auto: its
    part of the alpha search, the 14th): a new one replays layer 0 with the scales chosen for it,
    is asked again, and the run ends with the local file."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    local, remote = tmp_path / "local.gguf", tmp_path / "ray.gguf"
    _smooth(model, local, "--alpha", alpha)
    fake.kill_at = kill_at
    _smooth(model, remote, "--alpha", alpha, "--ray")
    assert fake.killed == 1 and fake.actors == 4
    assert local.read_bytes() == remote.read_bytes()


def test_a_smooth_coordinator_that_dies_resumes_from_its_layers(model, tmp_path, fake, monkeypatch):
    """Stopped while deciding layer 2, the run keeps layers 0 and 1; the next run replays them on
    new shards instead of deciding them again, and writes the local file."""
    from quantcli.calibrate.smooth import SmoothObserver

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    local, remote = tmp_path / "local.gguf", tmp_path / "ray.gguf"
    _smooth(model, local, "--alpha", "auto")
    real = SmoothObserver.decide
    decided = []

    def dying(self, il, weights, inputs, curves=None):
        if il == 2 and not decided.count("stopped"):
            decided.append("stopped")
            raise KeyboardInterrupt
        decided.append(il)
        return real(self, il, weights, inputs, curves)

    monkeypatch.setattr(SmoothObserver, "decide", dying)
    res = _cli("smooth", model, "-o", remote, "--calib", EXODUS, "--alpha", "auto", *SMOOTH_ARGS[:-1], "--ray")
    assert res.exit_code == 130 and not remote.exists()
    summary = _smooth(model, remote, "--alpha", "auto", "--ray")
    assert summary["resumed_layers"] == 2 and decided == [0, 1, "stopped", 2]
    assert local.read_bytes() == remote.read_bytes()


ALLOC_ARGS = ["--target-bpw", "6", "--ctx", "64", "--calib-chunks", "4", "--sensitivity-chunks", "3",
              "--candidates", "Q2_K,Q4_K,Q6_K,Q4_0,Q8_0,F16", "--dry-run", "--json"]


def _measurement(path: Path) -> dict:
    import json

    doc = json.loads(path.read_text())
    doc.pop("seconds")
    return doc


@pytest.fixture
def alloc_model(tmp_path) -> Path:
    return write_model(tmp_path / "a.gguf", "llama", n_layer=3, n_embd=256, n_head=4, n_head_kv=2, n_ff=512)


def test_sensitivity_pieces_through_a_cluster_give_the_local_measurement(alloc_model, tmp_path, fake):
    """The imatrix of --calib and the sensitivity measurement with --ray: one task per linear (and
    for the embedding's and each rounding's streams), taken back in order, give the local run's
    measurement to the last digit, and the same mix."""
    import json

    local, remote = tmp_path / "local.json", tmp_path / "ray.json"
    a = _cli("quantize", alloc_model, tmp_path / "l.gguf", "--calib", EXODUS, "--measurement", local, *ALLOC_ARGS)
    assert a.exit_code == 0, a.output
    b = _cli("quantize", alloc_model, tmp_path / "r.gguf", "--calib", EXODUS, "--measurement", remote, *ALLOC_ARGS,
             "--ray")
    assert b.exit_code == 0, b.output
    assert fake.ran == 1 + 1 + 2 + 3 * 7  # the imatrix's one block; embedding, Q8_0 and Q8_K streams; linears
    assert _measurement(local) == _measurement(remote)
    assert json.loads(a.stdout)["tensors"] == json.loads(b.stdout)["tensors"]


def test_a_sensitivity_coordinator_that_dies_resumes_from_its_pieces(alloc_model, tmp_path, fake, monkeypatch):
    """Stopped at its 14th task, the measurement keeps the pieces taken back before; the next run
    sends only the rest and gives the measurement of an uninterrupted run."""
    full = tmp_path / "full.json"
    assert _cli("quantize", alloc_model, tmp_path / "f.gguf", "--calib", EXODUS, "--measurement", full,
                *ALLOC_ARGS, "--ray").exit_code == 0
    real, calls = cluster.sensitivity_task, {"n": 0}

    def dying(*args):
        calls["n"] += 1
        if calls["n"] == 14:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(cluster, "sensitivity_task", dying)
    out, meas = tmp_path / "o.gguf", tmp_path / "m.json"
    res = _cli("quantize", alloc_model, out, "--calib", EXODUS, "--measurement", meas, *ALLOC_ARGS, "--ray")
    assert res.exit_code == 130 and not meas.exists()
    monkeypatch.setattr(cluster, "sensitivity_task", real)
    before = fake.ran
    res = _cli("quantize", alloc_model, out, "--calib", EXODUS, "--measurement", meas, *ALLOC_ARGS, "--ray")
    assert res.exit_code == 0, res.output
    assert fake.ran - before < 25 - 8  # the pieces of the batches finished before the stop are not sent again
    assert _measurement(meas) == _measurement(full)


def test_without_ray_the_flag_names_the_extra(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    res = _cli("quantize", model, tmp_path / "o.gguf", "--type", "Q8_0", "--ray")
    assert res.exit_code == 2
    assert res.output.splitlines()[0] == "error: --ray needs Ray: pip install 'quantcli[ray]'"
    assert not (tmp_path / "o.gguf").exists()
    res = _cli("quantize", model, tmp_path / "o.gguf", "--type", "Q8_0", "--ray-address", "auto")
    assert res.exit_code == 2 and "pass --ray too" in res.output
    for args in (["smooth", model, "-o", tmp_path / "s.gguf", "--calib", EXODUS, "--ctx", "64", "--chunks", "4"],
                 ["quantize", model, tmp_path / "a.gguf", "--target-bpw", "5", "--calib", EXODUS, "--ctx", "64"]):
        res = _cli(*args, "--ray")
        assert res.exit_code == 2, res.output
        assert res.output.splitlines()[-1] == "error: --ray needs Ray: pip install 'quantcli[ray]'"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # nothing written, no checkpoints


# -- a real local Ray cluster --------------------------------------------------------------------


@pytest.fixture
def one_blas_thread(monkeypatch):
    """One BLAS thread in this process and in what it starts, for the runs compared with a local
    one-thread run. OpenBLAS reads OPENBLAS_NUM_THREADS when it loads, so the variable alone pins
    the children and the workers (cluster.pinned) but leaves this process's own matmuls, the
    coordinator's (smooth's and sensitivity's decisions), on every core, where on some CPUs they
    round otherwise than one thread's (seen on an AMD EPYC: the per-mapping alpha curves differed
    in their 5th digit). threadpoolctl sets the thread count of the BLAS already loaded."""
    from threadpoolctl import threadpool_limits

    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (RuntimeError, ConnectionError, OSError) as exc:  # the machine cannot host a cluster at all
        pytest.skip(f"a local Ray cluster does not start here: {str(exc).splitlines()[0]}")
    yield ray
    ray.shutdown()


def _busy_workers(task: str) -> set[int]:
    """PIDs of Ray workers running `task` now (Ray titles a worker process ray::TASK while it runs)."""
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().startswith(f"ray::{task}".encode()):
                    pids.add(int(d.name))
            except OSError:
                pass
    return pids


def _kill_busy(task: str, thread: threading.Thread, timeout: float = 60) -> int:
    """SIGKILL every worker running `task` as soon as one is (while the run goes on); how many."""
    deadline = time.time() + timeout
    while time.time() < deadline and thread.is_alive():
        busy = _busy_workers(task)
        if busy:
            for pid in busy:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return len(busy)
        time.sleep(0.01)
    return 0


def test_ray_quantize_gives_the_same_sha256_per_tensor(ray_cluster, real_f32, tmp_path, monkeypatch):
    """The example model (Gemma 3 270M, F32 base) to Q4_K_M on 2 Ray workers: every tensor's sha256
    equals the local run's."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    local, remote = tmp_path / "local.gguf", tmp_path / "ray.gguf"
    assert _cli("quantize", real_f32, local, "--type", "Q4_K_M", "-q").exit_code == 0
    res = _cli("quantize", real_f32, remote, "--type", "Q4_K_M", "-q", "--ray")
    assert res.exit_code == 0, res.output
    assert _tensor_sha(local) == _tensor_sha(remote)
    assert hashlib.sha256(local.read_bytes()).digest() == hashlib.sha256(remote.read_bytes()).digest()


def test_ray_worker_killed_mid_run(ray_cluster, real_f32, tmp_path, monkeypatch):
    """SIGKILL the workers running slices while the run is under way: Ray runs their tasks again on
    new workers and the file is the local run's, byte for byte."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    remote, local = tmp_path / "ray.gguf", tmp_path / "local.gguf"
    t, result = _in_background("quantize", real_f32, remote, "--type", "Q8_0", "-q", "--ray")
    time.sleep(1.0)  # into the run
    killed = _kill_busy("encode_task", t)
    t.join(600)
    assert killed >= 1, "no worker was running a slice when the test looked"
    assert result["res"].exit_code == 0, result["res"].output
    assert _cli("quantize", real_f32, local, "--type", "Q8_0", "-q").exit_code == 0
    assert _tensor_sha(local) == _tensor_sha(remote)


def _local_one_thread(*args) -> str:
    """`quantcli ARGS` in a child process with one BLAS thread (the reference for a cluster whose
    workers run one each); its stdout."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "quantcli", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _in_background(*args) -> tuple[threading.Thread, dict]:
    """The CLI run with `args` on a thread (started); its result lands in the dict under "res"."""
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(res=_cli(*args)))
    t.start()
    return t, result


def _kill_once_checkpointed(first: Path, task: str, *args) -> None:
    """The CLI run `args` in the background; once its checkpoint `first` exists, SIGKILL every
    worker running `task` (a task's or an actor's name); the run must still succeed."""
    t, result = _in_background(*args)
    deadline = time.time() + 300
    while time.time() < deadline and not first.exists() and t.is_alive():
        time.sleep(0.02)
    killed = _kill_busy(task, t)
    t.join(600)
    assert killed >= 1, f"no worker was running {task} when the test looked"
    assert result["res"].exit_code == 0, result["res"].output


def test_ray_imatrix_equals_the_local_file(ray_cluster, model, tmp_path, one_blas_thread):
    """imatrix --ray on 2 workers (one BLAS thread each, as the coordinator's environment says)
    equals `imatrix` run locally with one BLAS thread, byte for byte."""
    local, remote = tmp_path / "local.imatrix", tmp_path / "ray.imatrix"
    args = ["-f", EXODUS, "--chunks", "40", "--ctx", "64", "-q"]
    _local_one_thread("imatrix", model, "-o", local, *args)
    res = _cli("imatrix", model, "-o", remote, *args, "--ray")
    assert res.exit_code == 0, res.output
    assert local.read_bytes() == remote.read_bytes()


def test_ray_refuses_an_input_the_workers_read_differently(ray_cluster, model, tmp_path, monkeypatch):
    """Every node hashes the head of each input; a node that finds other bytes (another file under
    the same path: here the coordinator is made to see other bytes) or none stops the run."""
    from quantcli.errors import InputError

    c = cluster.connect("default")
    cluster.check_inputs(c, [model])  # the same file everywhere: accepted
    real = cluster._head_digest
    monkeypatch.setattr(cluster, "_head_digest", lambda p: (0, "another file"))  # the coordinator's view only
    with pytest.raises(InputError, match=rf"{model}: the Ray worker on .* cannot read it as this machine "
                                         r"does \(it holds other bytes\)"):
        cluster.check_inputs(c, [model])
    missing = real("/nonexistent/model.gguf")  # a node without the file says why
    assert isinstance(missing, str) and "No such file" in missing
    assert cluster.blas_threads() >= 1


def test_ray_worker_killed_during_imatrix(ray_cluster, tmp_path, one_blas_thread):
    """SIGKILL the workers running blocks once the first block is checkpointed: their blocks run
    again on new workers and the file still equals the local run's."""
    model = write_model(tmp_path / "m.gguf", "llama", n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=512,
                        tied=False)
    text = tmp_path / "text.txt"
    text.write_text(EXODUS.read_text() * 3)
    local, remote = tmp_path / "local.imatrix", tmp_path / "ray.imatrix"
    args = ["-f", text, "--chunks", "320", "--ctx", "64", "-q"]
    _local_one_thread("imatrix", model, "-o", local, *args)
    _kill_once_checkpointed(tmp_path / "ray.imatrix.checkpoints" / "unit-block-0.bin", "imatrix_block_task",
                            "imatrix", model, "-o", remote, *args, "--ray")
    assert local.read_bytes() == remote.read_bytes()


def test_ray_smooth_equals_the_local_file(ray_cluster, model, tmp_path, one_blas_thread, monkeypatch):
    """smooth --ray (alpha auto, static block search) on 2 workers, one BLAS thread each, writes
    the file and scales of a local run with one BLAS thread, byte for byte."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    local, remote = tmp_path / "local.gguf", tmp_path / "ray.gguf"
    args = ["--calib", EXODUS, *SMOOTH_ARGS]
    _local_one_thread("smooth", model, "-o", local, *args, local.with_suffix(".json"), *SMOOTH_CASES["auto-static"])
    _smooth(model, remote, *SMOOTH_CASES["auto-static"], "--ray")
    assert local.read_bytes() == remote.read_bytes()
    assert local.with_suffix(".json").read_bytes() == remote.with_suffix(".json").read_bytes()


def test_ray_smooth_shard_killed_mid_run(ray_cluster, tmp_path, one_blas_thread, monkeypatch):
    """SIGKILL the actors holding shards while smooth --ray runs: new ones replay the layers passed
    and the file still equals the local run's."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    model = write_model(tmp_path / "m.gguf", "llama", n_layer=6, n_embd=256, n_head=4, n_head_kv=2, n_ff=512,
                        tied=False)
    local, remote = tmp_path / "local.gguf", tmp_path / "ray.gguf"
    args = ["--calib", EXODUS, "--ctx", "64", "--chunks", "12", "--alpha", "auto", "--mappings", "all", "-q"]
    _local_one_thread("smooth", model, "-o", local, *args)
    _kill_once_checkpointed(tmp_path / "ray.gguf.checkpoints" / "calibration" / "unit-stats-0.bin", "SmoothShard",
                            "smooth", model, "-o", remote, *args, "--ray")
    assert local.read_bytes() == remote.read_bytes()


def test_ray_sensitivity_equals_the_local_measurement(ray_cluster, tmp_path, one_blas_thread):
    """The automatic mix's analysis (imatrix and sensitivity) with --ray on 2 workers equals the
    local run's with one BLAS thread, and so does the mix chosen from it."""
    import json

    model = write_model(tmp_path / "a.gguf", "llama", n_layer=3, n_embd=256, n_head=4, n_head_kv=2, n_ff=512)
    local, remote = tmp_path / "local.json", tmp_path / "ray.json"
    a = _local_one_thread("quantize", model, tmp_path / "l.gguf", "--calib", EXODUS, "--measurement", local,
                          *ALLOC_ARGS)
    b = _cli("quantize", model, tmp_path / "r.gguf", "--calib", EXODUS, "--measurement", remote, *ALLOC_ARGS, "--ray")
    assert b.exit_code == 0, b.output
    assert _measurement(local) == _measurement(remote)
    assert json.loads(a)["tensors"] == json.loads(b.stdout)["tensors"]
