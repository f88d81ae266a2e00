"""Running past one machine: `quantize --ray` and `imatrix --ray` on a Ray cluster.

    cluster = connect("local" | "auto" | "ray://head:10001")   # ray.init; a one-line error without ray
    check_inputs(cluster, [Path("model.gguf")])                  # every node opens the same bytes
    for data in cluster.map_ordered(task, args, window=8): ...   # results in submission order

The coordinator (the process running quantcli) plans, keeps the checkpoint manifest and writes the
output; workers read the input from storage every worker sees (a shared filesystem path) and return
bytes or statistics. Ray retries a task whose worker dies (`max_retries`), so a lost worker costs
only its tasks; a coordinator that dies resumes from its checkpoints like a local run.

Ray is an optional dependency (`pip install 'quantcli[ray]'`); it is imported here only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from quantcli.errors import InputError, QuantcliError, UsageError

TASK_RETRIES = 4  # a task whose worker dies is run again, up to this many times (an actor: restarted)
PROBE_BYTES = 1 << 20  # the head of each input every node hashes: the same file, not only the same name


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'quantcli[ray]'") from None
    return ray


def require_ray(address: str | None) -> None:
    """With a --ray address, Ray must be installed: checked before a run writes anything."""
    if address is not None:
        _ray()


LOST = object()  # Cluster.results' answer for a call whose actor died


@dataclass
class Cluster:
    ray: Any
    address: str
    started: bool  # this process started a local cluster (and shuts it down)

    @property
    def workers(self) -> int:
        """CPUs the cluster offers: the tasks that can run at once."""
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    @property
    def node_cpus(self) -> int:
        """The CPUs of the largest node: the most one task can ask for and still be scheduled."""
        return max([int(n.get("Resources", {}).get("CPU", 1)) for n in self.ray.nodes() if n.get("Alive")] or [1])

    def remote(self, fn: Callable, **options: Any) -> Any:
        return self.ray.remote(max_retries=TASK_RETRIES, **options)(fn)

    def map_ordered(self, task: Any, calls: Iterable[tuple], window: int | None = None) -> Iterator[Any]:
        """task.remote(*args) for each args of `calls`, at most `window` in flight; the results in
        submission order. A task's QuantcliError comes back as itself."""
        window = window or 2 * self.workers
        pending: deque = deque()
        calls = iter(calls)
        done = False
        while pending or not done:
            while not done and len(pending) < window:
                try:
                    args = next(calls)
                except StopIteration:
                    done = True
                    break
                pending.append(task.remote(*args))
            if pending:
                yield self.get(pending.popleft())

    def get(self, ref: Any) -> Any:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, QuantcliError):
                raise type(cause)(cause.message, cause.hint) from None
            raise
        except self.ray.exceptions.WorkerCrashedError:
            raise QuantcliError(f"a Ray worker died {TASK_RETRIES + 1} times running one task; "
                                "giving up (see the Ray logs)") from None

    def put(self, value: Any) -> Any:
        """`value` in the object store once, for many tasks to take as an argument."""
        return self.ray.put(value)

    def actor_class(self, cls: type, **options: Any) -> Any:
        """`cls` as a Ray actor class (`.remote(*args)` starts one). A dead actor is not restarted
        by Ray: its state is the coordinator's to rebuild (see ShardPool)."""
        return self.ray.remote(max_restarts=0, **options)(cls)

    def results(self, refs: list) -> list:
        """The results of actor calls, in order; LOST where the actor died before answering."""
        out = []
        for ref in refs:
            try:
                out.append(self.get(ref))
            except self.ray.exceptions.RayActorError:
                out.append(LOST)
        return out

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def connect(address: str, num_cpus: int | None = None) -> Cluster:
    """`default`: $RAY_ADDRESS's cluster, else one started on this machine (`num_cpus` workers,
    default all cores), as `ray.init()` chooses; `auto`: the cluster `ray start` made on this
    machine; `ray://host:port` (or host:port): that one. A process already connected stays so."""
    ray = _ray()
    if ray.is_initialized():
        return Cluster(ray, address, started=False)
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        if address == "default":
            ray.init(num_cpus=None if os.environ.get("RAY_ADDRESS") else num_cpus, **kwargs)
        else:
            if not (address == "auto" or address.startswith("ray://") or ":" in address):
                raise UsageError(f"--ray {address!r}: give local, auto, ray://HOST:PORT or HOST:PORT")
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(f"--ray {address}: cannot connect to the Ray cluster: {str(exc).splitlines()[0]}") from None
    return Cluster(ray, address, started=True)


def _head_digest(path: str) -> tuple[int, str] | str:
    """(size, sha256 of the first PROBE_BYTES) of a file or of a directory's files, or why not."""
    p = Path(path)
    try:
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
        h, size = hashlib.sha256(), 0
        for f in files:
            st = f.stat()
            size += st.st_size
            with open(f, "rb") as fh:
                h.update(f.name.encode() + b"\0" + fh.read(PROBE_BYTES))
        return size, h.hexdigest()
    except OSError as exc:
        return f"{exc.strerror or exc}"


def _probe(paths: list[str]) -> tuple[str, list[Any]]:
    import socket

    return socket.gethostname(), [_head_digest(p) for p in paths]


def check_inputs(cluster: Cluster, paths: list[Path]) -> None:
    """Every alive node opens `paths` and finds the bytes the coordinator finds; otherwise a
    one-line InputError naming the node and the file."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    names = [str(Path(p).resolve()) for p in paths]
    want = [_head_digest(p) for p in names]
    probe = cluster.ray.remote(num_cpus=0)(_probe)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(names)
            for n in cluster.ray.nodes() if n.get("Alive")]
    for host, got in cluster.ray.get(refs):
        for name, mine, theirs in zip(names, want, got):
            if theirs != mine:
                why = theirs if isinstance(theirs, str) else "it holds other bytes"
                raise InputError(f"{name}: the Ray worker on {host} cannot read it as this machine does ({why})",
                                 hint="--ray needs the input (and adapters, imatrix) on storage every worker "
                                      "sees, at the same path")


_READERS: dict[Any, Any] = {}  # per worker process: inputs opened by earlier tasks, by (path, adapters)


def worker_reader(source: str, lora: tuple) -> Any:
    """The GGUF-shaped model a worker reads (`open_source`, adapters merged), opened once per process."""
    key = (source, lora)
    if key not in _READERS:
        from quantcli.pipelines.common import merge_adapters, open_source

        reader = open_source(Path(source), lambda _m: None)
        _READERS[key], _ = merge_adapters(reader, lora, True, lambda _m: None)
    return _READERS[key]


def _adapters_key(lora: tuple) -> list:
    """What a checkpoint key records of the adapters merged: path, scale and the head digest."""
    return [[str(a.path), a.scale, _head_digest(str(a.path))] for a in lora]


# -- quantize ------------------------------------------------------------------------------------


def encode_task(source: str, lora: tuple, s: Any) -> Any:
    """One slice of `quantize` on a worker: its rows read from the shared input and encoded."""
    from quantcli.pipelines.slices import encode_slice, read_slice

    reader = worker_reader(source, lora)
    return encode_slice(s, read_slice(reader, s))


# -- imatrix -------------------------------------------------------------------------------------


def blas_threads() -> int:
    """The BLAS threads of this process's matmuls (OpenBLAS reads these variables, else uses every
    core): workers run theirs with the same count, so that their sums are the bytes a local run gets."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return os.cpu_count() or 1


def pinned(cluster: Cluster, threads: int) -> dict[str, Any]:
    """Ray options for a task or actor whose matmuls must round as this process's do: `threads`
    BLAS threads (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS) and as many CPUs, at most a node's."""
    env = {"OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    return {"num_cpus": min(threads, cluster.node_cpus), "runtime_env": {"env_vars": env}}


def imatrix_block_task(source: str, lora: tuple, chunks: Any, ctx: int, process_output: bool, kv_f16: bool,
                       act_quant: bool) -> dict:
    """One block of chunks through the whole model on a worker: its imatrix sums and counts."""
    from quantcli.calibrate.imatrix import MIN_ROWS, ImatrixObserver
    from quantcli.calibrate.runner import RunOptions, run_calibration
    from quantcli.engine.model import Model

    model = Model(worker_reader(source, lora), kv_f16=kv_f16, act_quant=act_quant)
    observer = ImatrixObserver(process_output=process_output)
    run_calibration(model, chunks, RunOptions(ctx=ctx, min_ctx=MIN_ROWS, kind="imatrix"), [observer])
    return observer.result().arrays()


def imatrix(source: Path, text: str, options: Any, address: str, progress: Any = None,
            log: Callable[[str], None] | None = None, lora: tuple = (), reader: Any = None) -> Any:
    """`calibrate.imatrix.compute` on a Ray cluster: the chunks in blocks of REDUCTION_BLOCK, one
    task each (the layer-sequential pass over its chunks), the blocks' sums added in block order
    on this process, exactly as a local run adds them. Finished blocks are checkpointed here.
    `lora`: AdapterSpecs the workers merge into the model (on storage they see too); `reader`:
    this process's view of that model, when it has one open (else the input is opened here)."""
    import time

    from quantcli.calibrate import imatrix as calib
    from quantcli.calibrate import imatrix_file as imf
    from quantcli.calibrate.runner import RunOptions, make_chunks, model_fingerprint, npz_bytes, read_npz, versions
    from quantcli.checkpoint import CheckpointStore
    from quantcli.engine.model import Model
    from quantcli.engine.tokenizer import Tokenizer
    from quantcli.progress import Progress, progress_or_noop

    if options.compute_ppl or options.super_weights:
        raise UsageError("--ray gathers the importance sums only: run --super-weights (and perplexity) locally")
    report, log = progress_or_noop(progress), log or (lambda _m: None)
    t0 = time.perf_counter()
    loaded = [imf.load(p) for p in options.in_files]
    with contextlib.ExitStack() as stack:
        if reader is None:  # what the workers open: the input as a GGUF-shaped model
            from quantcli.pipelines.common import open_source

            reader = stack.enter_context(open_source(Path(source), log))
        model = Model(reader, kv_f16=options.kv_f16, act_quant=options.act_quant)
        tokens = Tokenizer.from_model(reader).encode(text, add_special=True, parse_special=options.parse_special)
        chunks = make_chunks(model, tokens, RunOptions(ctx=options.ctx, chunks=options.chunks,
                                                       skip_chunks=options.skip_chunks, min_ctx=calib.MIN_ROWS))
        threads = blas_threads()
        key = {"kind": "imatrix-ray", "model": model_fingerprint(reader),
               "tokens": hashlib.sha256(chunks.astype("<i8").tobytes()).hexdigest(),
               "options": {"ctx": options.ctx, "process_output": options.process_output, "kv_f16": options.kv_f16,
                           "act_quant": options.act_quant, "block": calib.REDUCTION_BLOCK, "blas_threads": threads},
               "lora": _adapters_key(lora), **versions()}
    store = CheckpointStore(options.checkpoint_dir, key, log) if options.checkpoint_dir is not None else None
    blocks = [chunks[i:i + calib.REDUCTION_BLOCK] for i in range(0, len(chunks), calib.REDUCTION_BLOCK)]
    saved = {b: p for b in range(len(blocks)) if store is not None and (p := store.get(f"block-{b}")) is not None}
    if saved:
        log(f"resuming {len(saved)} of {len(blocks)} blocks from {store.dir}")  # type: ignore[union-attr]
    cluster = connect(address)
    try:
        check_inputs(cluster, [Path(source)] + [Path(a.path) for a in lora])
        task = cluster.remote(imatrix_block_task, **pinned(cluster, threads))
        name = str(Path(source).resolve())
        todo = [b for b in range(len(blocks)) if b not in saved]
        results = cluster.map_ordered(task, ((name, tuple(lora), blocks[b], options.ctx, options.process_output, options.kv_f16,
                                              options.act_quant) for b in todo))
        total = calib.Collector()
        for b in range(len(blocks)):
            if b in saved:
                arrays = read_npz(saved[b])  # checked (sha256) once, above
            else:
                arrays = next(results)
                if store is not None:
                    with store.put(f"block-{b}") as fh:
                        fh.write(npz_bytes(**arrays))
            total.add_arrays(arrays)
            report(Progress("block", b + 1, len(blocks), f"chunks {b * calib.REDUCTION_BLOCK}-"
                                                         f"{b * calib.REDUCTION_BLOCK + len(blocks[b]) - 1}"))
    finally:
        cluster.close()
    result = calib.to_imatrix(total, options.ctx, options.dataset)
    if loaded:
        result = calib.merge(result, loaded, options.ctx)
    if store is not None and not options.keep_checkpoints:
        store.remove()
    return calib.ImatrixResult(result, len(chunks), int(chunks.size), time.perf_counter() - t0, 0)


# -- layer-synchronous shards (smooth) -------------------------------------------------------------


class ShardPool:
    """Actors that each hold a shard of the chunks' hidden states and move them on layer by layer,
    in step: `each(method, args)` calls every shard and returns their answers in shard order. A
    shard whose actor dies is started again and brought to where the others are by replaying the
    layers passed (`replay()`: the (layer, scales) list its `advance` takes, which the coordinator
    keeps), then asked again: a lost worker costs its shard's replay, not the run."""

    def __init__(self, cluster: Cluster, actor: Any, shard_args: list[tuple],
                 replay: Callable[[], list], log: Callable[[str], None]) -> None:
        self.cluster, self.actor, self.shard_args = cluster, actor, shard_args
        self.replay, self.log = replay, log
        self.handles: list[Any] = [None] * len(shard_args)
        self._start(list(range(len(shard_args))))

    def _start(self, shards: list[int]) -> None:
        """Start these shards' actors afresh and replay the layers passed, again for any that die."""
        for _ in range(TASK_RETRIES + 1):
            for i in shards:
                self.handles[i] = self.actor.remote(*self.shard_args[i])
            layers = self.replay()
            if not layers:
                return
            answers = self.cluster.results([self.handles[i].advance.remote(layers) for i in shards])
            shards = [i for i, a in zip(shards, answers) if a is LOST]
            if not shards:
                return
        raise QuantcliError(f"the Ray workers holding shard(s) {shards} died {TASK_RETRIES + 1} times; "
                            "giving up (see the Ray logs)")

    def each(self, method: str, *args: Any) -> list:
        return self.each_of(method, [args] * len(self.handles))

    def each_of(self, method: str, args: list[tuple]) -> list:
        """Shard i's `method(*args[i])`, for every shard; the answers in shard order."""
        answers = self.cluster.results([getattr(h, method).remote(*a) for h, a in zip(self.handles, args)])
        for _ in range(TASK_RETRIES + 1):
            lost = [i for i, a in enumerate(answers) if a is LOST]
            if not lost:
                return answers
            self.log(f"the Ray worker(s) holding shard(s) {lost} died; starting them again "
                     f"({len(self.replay())} layer(s) to replay)")
            self._start(lost)
            for i, a in zip(lost, self.cluster.results([getattr(self.handles[i], method).remote(*args[i])
                                                        for i in lost])):
                answers[i] = a
        raise QuantcliError(f"the Ray workers holding shard(s) {lost} died {TASK_RETRIES + 1} times; "
                            "giving up (see the Ray logs)")


def _observer_store(kind: str, model: Any, chunks: Any, observer: Any, checkpoint_dir: Path | None, threads: int,
                    lora: tuple, log: Callable[[str], None]) -> Any:
    """The coordinator's checkpoints of an observer's run on the cluster (None without a
    directory), keyed as the runner keys a local run's, plus the workers' BLAS threads."""
    from quantcli.calibrate.runner import model_fingerprint, versions
    from quantcli.checkpoint import CheckpointStore

    if checkpoint_dir is None:
        return None
    key = {"kind": kind, "model": model_fingerprint(model.reader),
           "tokens": hashlib.sha256(chunks.astype("<i8").tobytes()).hexdigest(),
           "options": {"ctx": int(chunks.shape[1]), "blas_threads": threads}, "observers": [observer.key()],
           "lora": _adapters_key(lora), **versions()}
    return CheckpointStore(checkpoint_dir, key, log)


def bounds_of(n: int, parts: int, i: int) -> slice:
    """Part i of `parts` near-equal contiguous parts of range(n)."""
    return slice(round(i * n / parts), round((i + 1) * n / parts))


class SmoothShard:
    """Chunks [c0, c1) of a `smooth` run on a worker: their hidden states, moved on layer by layer
    with the scales the coordinator chose; `gather(il)` measures layer il's inputs on them."""

    def __init__(self, source: str, chunks: Any, c0: int, c1: int, observer_options: dict) -> None:
        from quantcli.calibrate.smooth import SmoothObserver
        from quantcli.engine.model import Model

        self.model = Model(worker_reader(source, ()))
        self.observer = SmoothObserver(**observer_options)
        self.observer.begin(self.model, chunks)  # the run's sampled rows, over all its chunks
        self.first = c0
        self.hidden = self.model.embed(chunks[c0:c1])  # [c1 - c0, ctx, n_embd]
        self.weights: tuple[int, dict] | None = None  # layer il's weights, between gather and advance

    def _layer(self, il: int) -> dict:
        if self.weights is None or self.weights[0] != il:
            self.weights = (il, self.model.layer_weights(il))
        return self.weights[1]

    def gather(self, il: int) -> Any:
        from quantcli.calibrate.runner import Probe

        return self.observer.gather(il, Probe(self.model, il, self._layer(il), self.hidden), self.first)

    def curves(self, il: int, inputs: Any, alphas: Any) -> dict:
        """`--alpha auto`'s errors of layer il at these alphas (a part of the grid), from the
        merged inputs of all shards and this shard's copy of the layer's weights."""
        if len(alphas) == 0:
            return {}
        return self.observer.curves(il, self._layer(il), inputs, alphas)

    def advance(self, layers: list) -> int:
        """Move the shard through these layers, (il, scales) each, every one smoothed by its scales."""
        from quantcli.calibrate.smooth import fold_layer

        res = self.observer.result()
        for il, scales in layers:
            w = self._layer(il)
            fold_layer(w, scales, res.mappings, res.config)
            for c in range(len(self.hidden)):
                self.hidden[c] = self.model.layer(il, w, self.hidden[c])
            self.weights = None
        return len(self.hidden)


def smooth(source: Path, model: Any, chunks: Any, observer: Any, checkpoint_dir: Path | None, address: str,
           progress: Any = None, log: Callable[[str], None] | None = None) -> int:
    """`smooth`'s statistics on a Ray cluster, into `observer` (a SmoothObserver, begun here): the
    chunks in shards, one actor each holding its shard's hidden states; per layer every shard
    measures its inputs (SmoothObserver.gather), this process merges them in chunk order, decides
    alpha and the scales with the layer's weights (`--alpha auto`: the shards compute the layer's
    alpha curve, a part of the grid each; the W8A8 search's per-mapping pass, which goes from
    one mapping's result to the next, runs here in `decide`), and the shards move on through the
    smoothed layer.
    Maxima merge exactly and rows join in chunk order, so the result is the local run's for any
    number of workers. Layers decided are checkpointed here; returns the layers resumed."""
    import time

    import numpy as np

    from quantcli.calibrate.runner import npz_bytes, read_npz
    from quantcli.calibrate.smooth import LayerInputs
    from quantcli.progress import Progress, progress_or_noop

    report, log = progress_or_noop(progress), log or (lambda _m: None)
    threads = blas_threads()
    n_chunks, n_layer = len(chunks), model.config.n_layer
    observer.begin(model, chunks)
    store = _observer_store("smooth-ray", model, chunks, observer, checkpoint_dir, threads, (), log)
    start = 0
    while store is not None and start < n_layer and (p := store.get(f"stats-{start}")) is not None:
        observer.load_layer_state(start, read_npz(p))
        start += 1
    if start:
        log(f"resuming after layer {start - 1} from {store.dir}")  # type: ignore[union-attr]
    layers_done: list = [(il, observer.result().layers[il].scales) for il in range(start)]

    cluster = connect(address)
    try:
        check_inputs(cluster, [Path(source)])
        options = pinned(cluster, threads)
        cpus = options["num_cpus"]
        actor = cluster.actor_class(SmoothShard, **options)
        n_shards = max(1, min(n_chunks, cluster.workers // cpus))
        name = str(Path(source).resolve())
        args = []
        for i in range(n_shards):
            part = bounds_of(n_chunks, n_shards, i)
            args.append((name, chunks, part.start, part.stop, observer.options))
        pool = ShardPool(cluster, actor, args, lambda: list(layers_done), log)  # resumed: replays start's layers
        for il in range(start, n_layer):
            t0 = time.perf_counter()
            inputs = LayerInputs.merge(pool.each("gather", il))
            curves = None
            if observer.alpha == "auto":  # the grid's alphas split over the shards, each error computed alone
                grid, shared = observer.alpha_grid(), cluster.put(inputs)
                parts = pool.each_of("curves", [(il, shared, grid[bounds_of(len(grid), n_shards, i)])
                                                for i in range(n_shards)])
                curves = {k: np.concatenate([p[k] for p in parts if p]) for k in next(p for p in parts if p)}
            weights = model.layer_weights(il)
            layer = observer.decide(il, weights, inputs, curves)
            del weights, inputs, curves
            if store is not None:
                with store.put(f"stats-{il}") as fh:
                    fh.write(npz_bytes(**observer.layer_state(il)))
            pool.each("advance", [(il, layer.scales)])
            layers_done.append((il, layer.scales))
            report(Progress("layer", il + 1, n_layer, f"blk.{il} ({time.perf_counter() - t0:.1f} s)"))
    finally:
        cluster.close()
    return start


# -- sensitivity (automatic mixes) -------------------------------------------------------------------


def sensitivity_task(source: str, lora: tuple, chunks: Any, options: dict, kind: str, il: int, short: str,
                     inputs: Any, imp: Any) -> tuple[Any, dict]:
    """One piece of the sensitivity measurement on a worker, carried to the head: the quantized
    embedding's streams (kind "embd"), the stream with every input rounded to activation type
    `short` ("act"), or linear `short` of layer il ("tensor": its error table, activation errors
    and streams, from the layer's clean `inputs` [n_chunks, ctx, n_embd]). Returns its
    TensorSensitivity (or None) and its streams at the scored positions."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from quantcli.calibrate.runner import Probe
    from quantcli.calibrate.sensitivity import SensitivityObserver
    from quantcli.engine.model import Model

    model = Model(worker_reader(source, lora), act_quant=False)
    observer = SensitivityObserver(**options)
    observer.begin(model, chunks)
    found = None
    if kind == "embd":
        streams, first = observer.embedding_streams(), 0
    elif kind == "act":
        streams, first = {f"act|{short}": model.embed(chunks)}, 0
    else:
        weights = model.layer_weights(il)
        probe = Probe(model, il, weights, inputs)
        name = f"blk.{il}.{short}.weight"
        act = observer.act_errors(weights, probe, {short: name})
        with ThreadPoolExecutor(observer.threads) as pool:
            measured = observer.measure_tensor(il, short, weights, probe, act.get(name, {}), imp, pool)
        del weights, probe
        if measured is None:
            return None, {}
        (found, streams), first = measured, il + 1
    for j in range(first, model.config.n_layer):
        observer.carry(j, model.layer_weights(j), streams)
    pos = observer.positions_
    return found, {k: np.ascontiguousarray(s[:, pos]) for k, s in streams.items()}


def sensitivity(source: Path, model: Any, chunks: Any, observer: Any, checkpoint_dir: Path | None,
                address: str, progress: Any = None, log: Callable[[str], None] | None = None,
                lora: tuple = (), keep_checkpoints: bool = False) -> None:
    """The sensitivity measurement (calibrate/sensitivity.py) on a Ray cluster, into `observer` (a
    SensitivityObserver, begun here). This process runs the clean pass and hands each layer's
    inputs to one task per linear, which measures it and carries its streams to the head (and one
    task each for the embedding's streams and every activation rounding's); the head's part runs
    here on what they return. Tasks are sent and taken back in the local run's order, each
    computing what the local run computes for it, so the measurement is the local one for any
    number of workers. Finished tasks are checkpointed here."""
    import numpy as np

    from quantcli.calibrate.runner import npz_bytes, read_npz
    from quantcli.calibrate.sensitivity import _pack, _unpack
    from quantcli.engine.model import LINEARS
    from quantcli.progress import Progress, progress_or_noop

    report, log = progress_or_noop(progress), log or (lambda _m: None)
    threads = blas_threads()
    cfg = model.config
    observer.begin(model, chunks)
    store = _observer_store("sensitivity-ray", model, chunks, observer, checkpoint_dir, threads, lora, log)
    pieces = [("embd", 0, "")] + [("act", 0, a) for a in observer._act_types()]
    pieces += [("tensor", il, short) for il in range(cfg.n_layer) for short in LINEARS
               if f"blk.{il}.{short}.weight" in model.reader.tensors]
    unit = {p: "-".join(map(str, p)) for p in pieces}
    saved = {p: path for p in pieces if store is not None and (path := store.get(unit[p])) is not None}
    if saved:
        log(f"resuming {len(saved)} of {len(pieces)} pieces from {store.dir}")  # type: ignore[union-attr]
    hidden = model.embed(chunks)

    cluster = connect(address)
    try:
        check_inputs(cluster, [Path(source)] + [Path(a.path) for a in lora])
        pin = pinned(cluster, threads)
        cpus = pin["num_cpus"]
        task = cluster.remote(sensitivity_task, **pin)
        options = dict(candidates=observer.candidates, references=observer.references,
                       positions=observer.n_positions, threads=cpus, vocab_slice=observer.vocab_slice,
                       top_k=observer.top_k)
        name = str(Path(source).resolve())
        shared_chunks = cluster.put(chunks)

        def calls() -> Iterator[tuple]:
            """The pieces' task arguments in order, with the clean pass run a layer at a time as
            the tasks need its inputs (and to the end: `hidden` is the final states after it)."""
            for kind, il, short in pieces:
                if kind != "tensor" and (kind, il, short) not in saved:
                    yield (name, lora, shared_chunks, options, kind, il, short, None, None)
            for il in range(cfg.n_layer):
                todo = [p for p in pieces if p[0] == "tensor" and p[1] == il and p not in saved]
                inputs = cluster.put(hidden.copy()) if todo else None
                for _, _, short in todo:
                    yield (name, lora, shared_chunks, options, "tensor", il, short, inputs,
                           observer._importance(f"blk.{il}.{short}.weight"))
                w = model.layer_weights(il)
                for c in range(len(hidden)):
                    hidden[c] = model.layer(il, w, hidden[c])
                del w

        results = cluster.map_ordered(task, calls())
        streams: dict[str, np.ndarray] = {}
        for i, p in enumerate(pieces):
            if p in saved:
                data = read_npz(saved[p])  # checked (sha256) once, above
                found = _unpack(str(data.pop("tensor")[0])) if "tensor" in data else None
                order = [str(k) for k in data.pop("order")]
                got = {k: data[f"s{j}"] for j, k in enumerate(order)}
            else:
                found, got = next(results)
                if store is not None:
                    arrays = {f"s{j}": v for j, v in enumerate(got.values())}
                    if found is not None:
                        arrays["tensor"] = np.array([_pack(found)])
                    with store.put(unit[p]) as fh:
                        fh.write(npz_bytes(order=np.array(list(got), dtype=str), **arrays))
            if found is not None:
                observer.tensors_[found.name] = found
            streams.update(got)
            report(Progress("tensor", i + 1, len(pieces), unit[p]))
        if next(results, None) is not None:  # drains the calls: the clean pass to its end
            raise AssertionError("more sensitivity results than pieces")
    finally:
        cluster.close()
    observer.finish(model, hidden[:, observer.positions_], streams)
    if store is not None and not keep_checkpoints:
        store.remove()
